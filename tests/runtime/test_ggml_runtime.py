"""ggml plumbing (runtime/language/ggml_runtime.py): which of ggml's extra buffers holds repacked weights."""

from __future__ import annotations

from tinygptv_edge.runtime.language.ggml_runtime import (
    REPACK_BUFT,
    extra_buffer_types,
    load_ggml,
    repack_buffer_type,
)


def test_repacked_weights_go_to_the_repack_buffer_whatever_comes_first():
    """On a CPU with AMX ggml lists its AMX buffer before the repack buffer; the weights must not go there
    (the native kernels read the repack layout, and ggml's AMX matmul crashed on these models)."""
    ggml = load_ggml()
    dev = ggml.ggml_backend_dev_by_type(ggml.GGML_BACKEND_DEVICE_TYPE_CPU)
    names = [ggml.ggml_backend_buft_name(b) for b in extra_buffer_types(ggml, dev)]
    buft = repack_buffer_type(ggml, dev)
    if REPACK_BUFT in names:
        assert buft is not None and ggml.ggml_backend_buft_name(buft) == REPACK_BUFT
    else:
        assert buft is None
