"""The decoder's KV cache starts at zero without making fresh pages resident."""

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
    kv = G.new_kv_cache(ggml, 2, 64, n_ctx, "f16")
    assert kv.nbytes >= 2 * 2 * 64 * n_ctx * 2
    assert not _buffer(ggml, kv).any()


def test_reads_as_zero_sees_a_dirty_buffer(ggml):
    kv = G.new_kv_cache(ggml, 1, 64, 64, "f32")
    assert G._reads_as_zero(ggml, kv.buffer)
    _buffer(ggml, kv)[-1] = 7  # the last byte, past the 8-byte words
    assert not G._reads_as_zero(ggml, kv.buffer)
    _buffer(ggml, kv)[-1] = 0
    _buffer(ggml, kv)[0] = 1
    assert not G._reads_as_zero(ggml, kv.buffer)


def test_a_large_fresh_cache_is_not_made_resident(ggml):
    before = _rss_mib()
    kv = G.new_kv_cache(ggml, 8, 1024, 2048, "f16")  # 64 MiB
    grown = _rss_mib() - before
    assert kv.nbytes == 64 * 2**20
    assert grown < 16, f"RSS grew by {grown:.0f} MiB for a {kv.nbytes / 2**20:.0f} MiB cache"
