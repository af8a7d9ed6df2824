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


def test_openmp_defaults_spin_briefly_then_sleep_unless_the_user_chose(tmp_path):
    """Before ggml loads, the runtime asks libgomp for a short spin, then passive waiting (a futex sleep
    at each of a step's ~740 barriers cost a third of an idle step; a long spin collapses under load:
    docs/benchmarks.md, OpenMP settings); an OpenMP variable the user set leaves all of them alone."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, os; from tinygptv_edge.runtime.language.ggml_runtime import load_ggml; load_ggml(); "
        "keys = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'OMP_PROC_BIND'); "
        "print(json.dumps({k: os.environ.get(k) for k in keys}))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    for extra, want in (
        ({}, {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "1000", "OMP_PROC_BIND": None}),
        (
            {"OMP_PROC_BIND": "true"},
            {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, "OMP_PROC_BIND": "true"},
        ),
    ):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**clean, **extra}, capture_output=True, text=True, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == want
