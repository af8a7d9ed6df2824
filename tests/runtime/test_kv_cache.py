"""The decoder's KV cache: starts at zero without making fresh pages resident; quantized rows pad each
head to whole blocks; positions copy to a grown cache."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from tinygptv_edge.runtime.language import ggml_runtime as G
from tinygptv_edge.runtime.memory import rss_bytes


@pytest.fixture(scope="module")
def ggml():
    return G.load_ggml()


def _buffer(ggml, kv) -> np.ndarray:
    base = ggml.ggml_backend_buffer_get_base(kv.buffer)
    return np.ctypeslib.as_array((ctypes.c_uint8 * kv.nbytes).from_address(base))


def _rss_mib() -> float:
    return rss_bytes() / 2**20


@pytest.mark.parametrize("n_ctx", [8, 2048])  # small: heap memory that may be dirty; large: fresh pages
def test_new_cache_reads_as_zero(ggml, n_ctx):
    kv = G.new_kv_cache(ggml, 2, 4, 16, n_ctx, "f16")
    assert kv.nbytes >= 2 * 2 * 64 * n_ctx * 2
    assert not _buffer(ggml, kv).any()


def test_reads_as_zero_sees_a_dirty_buffer(ggml):
    kv = G.new_kv_cache(ggml, 1, 4, 16, 64, "f32")
    assert G._reads_as_zero(ggml, kv.buffer)
    _buffer(ggml, kv)[-1] = 7  # the last byte, past the 8-byte words
    assert not G._reads_as_zero(ggml, kv.buffer)
    _buffer(ggml, kv)[-1] = 0
    _buffer(ggml, kv)[0] = 1
    assert not G._reads_as_zero(ggml, kv.buffer)


def test_a_large_fresh_cache_is_not_made_resident(ggml):
    before = _rss_mib()
    kv = G.new_kv_cache(ggml, 8, 16, 64, 2048, "f16")  # 64 MiB
    grown = _rss_mib() - before
    assert kv.nbytes == 64 * 2**20
    assert grown < 16, f"RSS grew by {grown:.0f} MiB for a {kv.nbytes / 2**20:.0f} MiB cache"


@pytest.mark.parametrize(
    ("kv_type", "head_dim", "padded", "row"),
    [
        ("f16", 80, 80, 32 * 80 * 2),
        ("q8_0", 80, 96, 32 * 3 * 34),  # Phi-2: 80 -> 3 blocks of 32 per head
        ("q4_0", 80, 96, 32 * 3 * 18),
        ("q8_0", 64, 64, 32 * 2 * 34),
    ],
)
def test_quantized_rows_pad_each_head_to_whole_blocks(ggml, kv_type, head_dim, padded, row):
    assert G.kv_head_dim(kv_type, head_dim) == padded
    assert G.kv_row_nbytes(kv_type, 32, head_dim) == row
    kv = G.new_kv_cache(ggml, 1, 32, head_dim, 4, kv_type)
    try:
        assert kv.k[0].contents.nb[1] == row and kv.quantized == (kv_type != "f16")
    finally:
        G.free_kv_cache(ggml, kv)


def test_copy_rows_to_a_grown_cache(ggml):
    small, big = (G.new_kv_cache(ggml, 2, 4, 16, n, "q8_0") for n in (8, 32))
    try:
        row = small.k[0].contents.nb[1]
        rng = np.random.default_rng(0)
        data = [rng.integers(0, 256, 8 * row, dtype=np.uint8) for _ in range(4)]
        for t, d in zip((*small.k, *small.v), data, strict=True):
            ggml.ggml_backend_tensor_set(t, d.ctypes.data, 0, d.nbytes)
        G.copy_kv_rows(ggml, small, big, 5)
        for t, d in zip((*big.k, *big.v), data, strict=True):
            got = np.empty(8 * row, dtype=np.uint8)
            ggml.ggml_backend_tensor_get(t, got.ctypes.data, 0, got.nbytes)
            assert np.array_equal(got[: 5 * row], d[: 5 * row]) and not got[5 * row :].any()
        with pytest.raises(ValueError):
            G.copy_kv_rows(ggml, big, small, 9)
    finally:
        G.free_kv_cache(ggml, small)
        G.free_kv_cache(ggml, big)
