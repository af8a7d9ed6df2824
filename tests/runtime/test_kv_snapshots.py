"""KV snapshots (runtime/prefix_cache.py over Decoder.read_kv/write_kv) on the committed shipped-model
exports (tests/data): torch-free, so they run on x86 and emulated aarch64 alike."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import shipped_data as S

pytest.importorskip("tinygptv_edge.runtime.language.decoder")
from tinygptv_edge.runtime.errors import ConfigError  # noqa: E402
from tinygptv_edge.runtime.language.decoder import Decoder  # noqa: E402
from tinygptv_edge.runtime.pipeline import Pipeline  # noqa: E402
from tinygptv_edge.runtime.sampling import GREEDY  # noqa: E402

A = [50, 7, 300, 12, 99, 4, 250, 31, 8, 77, 140, 3]
B = [*A[:2], 30, 112, 9]  # shares A's first two positions


@pytest.mark.parametrize("kv_type", ["f16", "f32", "q8_0", "q4_0"])
def test_written_back_rows_continue_as_the_original(kv_type):
    with Decoder(S.language_file("Q4_0"), n_ctx=64, n_threads=2, kv_type=kv_type) as dec:
        dec.eval_tokens(A)
        want = dec.eval_tokens([5])
        rows = dec.read_kv(0, len(A))
        assert rows.shape == (dec.hparams.n_layer, 2, len(A), dec.kv_row_bytes // (2 * dec.hparams.n_layer))
        dec.reset()
        dec.eval_tokens(B)  # other rows from slot 2 on
        dec.truncate(2)
        with pytest.raises(ConfigError, match="start"):
            dec.write_kv(rows, 3)  # the cache holds 2 positions: it cannot vouch for a third
        dec.write_kv(rows[:, :, 2:], 2)
        assert dec.n_past == len(A)
        got = dec.eval_tokens([5])  # slots 0, 1 were computed in B's batch: equal up to rounding
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * (want.max() - want.min()))
        dec.truncate(0)
        dec.write_kv(rows, 0)
        np.testing.assert_array_equal(dec.eval_tokens([5]), want)  # every row A's: bit for bit
        with pytest.raises(ConfigError, match="shape"):
            dec.write_kv(rows[:, :1], 0)
        with pytest.raises(ConfigError, match="stop"):
            dec.read_kv(0, dec.n_past + 1)
        np.testing.assert_array_equal(dec.read_kv(3, 7), rows[:, :, 3:7])


def test_pipeline_answers_are_unchanged_and_repeats_are_restored():
    """Image A, image B, A with another question, the first request again: equal answers with and
    without snapshots; with them, A's rows are restored instead of evaluated."""
    qs = S.manifest()["questions"]
    a, b = qs[0]["image"], qs[2]["image"]
    asks = [(qs[0]["question"], a), (qs[2]["question"], b), (qs[1]["question"], a), (qs[0]["question"], a)]
    greedy = GREEDY.replace(max_new_tokens=8)
    runs = {}
    for mib in (0, 64):
        with Pipeline(S.DATA / "vision.int8.onnx", S.language_file("Q4_0"), n_ctx=256, n_threads=2,
                      cache_ram_mib=mib) as pipe:  # fmt: skip
            runs[mib] = [pipe.ask(q, S.DATA / img, greedy) for q, img in asks]
            image_tokens = pipe.image_tokens
            if mib:
                assert pipe.prefix.snapshots, "nothing was saved"
    assert [r.text for r in runs[64]] == [r.text for r in runs[0]]
    assert [r.token_ids for r in runs[64]] == [r.token_ids for r in runs[0]]
    off, on = runs[0][2].timings, runs[64][2].timings
    assert off.prefill_restored == 0 and on.prefill_restored >= image_tokens
    assert on.prefill_tokens == off.prefill_tokens - on.prefill_restored
    same = runs[64][3].timings  # the first request again: restored whole, its logits kept
    assert same.prefill_tokens == 0 and same.prefill_restored > 0


def test_cache_ram_is_checked():
    with pytest.raises(ConfigError, match="cache_ram_mib"):
        Pipeline(None, S.language_file("Q4_0"), n_ctx=64, cache_ram_mib=-1)


def test_host_buffers_are_writable_own_mappings_from_a_huge_page_on():
    import mmap
    import sys

    from tinygptv_edge.runtime.memory import HUGE_PAGE, host_buffer

    for n in (1000, HUGE_PAGE, 3 * HUGE_PAGE + 5):
        b = host_buffer(n)
        assert b.dtype == np.uint8 and b.shape == (n,) and b.flags.writeable
        b[:] = 7
        assert int(b[0]) == int(b[-1]) == 7
        own = isinstance(getattr(b.base, "obj", None), mmap.mmap)  # frombuffer: a memoryview of it
        assert own == (n >= HUGE_PAGE and sys.platform.startswith("linux")), (n, type(b.base))
