"""PrefixCache (runtime/prefix_cache.py) on a numpy stand-in decoder: what it keeps, what it evaluates."""

from __future__ import annotations

import numpy as np
import pytest

from tinygptv_edge.runtime.errors import ConfigError
from tinygptv_edge.runtime.interfaces import KVDecoder, KVSnapshots
from tinygptv_edge.runtime.prefix_cache import LOGITS_KEPT, PrefixCache

H, V = 4, 16


class ListDecoder:
    """Holds its 'KV cache' as a list of rows; logits say how many rows it holds and the last row's sum.
    A `KVDecoder` (runtime/interfaces.py); SnapshotDecoder below is a `KVSnapshots`."""

    def __init__(self):
        self.rows: list[np.ndarray] = []
        self.evaluated = 0
        self.closed = False
        self.fail_next = False
        self.fail_reset = False

    def embed_tokens(self, ids):
        return np.array([[float(i)] * H for i in ids], dtype=np.float32)

    def eval_embeddings(self, embeds):
        if self.fail_next:
            self.fail_next = False
            self.rows.append(embeds[0])  # half-done work, as a crashed batch might leave
            raise RuntimeError("boom")
        self.rows.extend(embeds)
        self.evaluated += len(embeds)
        logits = np.zeros(V, np.float32)
        logits[len(self.rows) % V] = 1 + float(self.rows[-1].sum())
        return logits

    def eval_tokens(self, ids):
        return self.eval_embeddings(self.embed_tokens(ids))

    def truncate(self, n):
        del self.rows[n:]

    def reset(self):
        if self.fail_reset:
            raise RuntimeError("reset failed")
        self.rows = []

    def close(self):
        self.closed = True


IMG = {"k": np.full((3, H), 7.0, np.float32)}


def test_prefill_evaluates_only_what_the_cache_lacks():
    dec = ListDecoder()
    cache = PrefixCache(decoder=dec)
    first = [1, 2, ("k", 0), ("k", 1), ("k", 2), 3]
    pre = cache.prefill(first, IMG)
    assert pre.evaluated == 6 and cache.held == tuple(first) and len(dec.rows) == 6
    np.testing.assert_array_equal(dec.rows[2], IMG["k"][0])  # image rows spliced in order
    longer = [*first, 4, 5]
    pre = cache.prefill(longer, IMG)
    assert pre.evaluated == 2 and dec.evaluated == 8 and len(cache) == 8
    # the same positions again: nothing evaluated, the logits are the ones kept from the first time
    n = dec.evaluated
    again = cache.prefill(longer, IMG)
    assert again.evaluated == 0 and dec.evaluated == n and np.array_equal(again.logits, pre.logits)
    again.logits[:] = -1  # the caller's copy
    assert np.array_equal(cache.prefill(longer, IMG).logits, pre.logits)
    # a prompt whose logits are not known: its last two are evaluated, even when cached
    cache._logits.clear()
    assert cache.prefill(longer, IMG).evaluated == 2
    # a branch: kept up to where they differ
    branch = [1, 2, ("k", 0), ("k", 1), 9]
    assert cache.shared(branch) == 3
    assert cache.prefill(branch, IMG).evaluated == 2 and cache.held == tuple(branch) and len(dec.rows) == 5
    assert cache.shared([1, 2, ("k", 0), ("k", 1)]) == 2  # never the last two, even when cached
    assert cache.shared([1]) == 0


def test_kept_logits_are_bounded_and_need_the_whole_prompt_cached():
    dec = ListDecoder()
    cache = PrefixCache(decoder=dec)
    prompts = [[1, k, 2] for k in range(LOGITS_KEPT + 1)]
    for p in prompts:
        cache.prefill(p, {})
    assert cache.prefill(prompts[-1], {}).evaluated == 0
    assert cache.prefill(prompts[0], {}).evaluated == 2  # the oldest was forgotten
    assert cache.prefill(prompts[2], {}).evaluated == 2  # known logits, but the cache holds only [1]
    cache.step(5)
    assert cache.prefill(prompts[2], {}).evaluated == 0  # a prefix of what the cache holds


def test_step_appends():
    dec = ListDecoder()
    cache = PrefixCache(decoder=dec)
    cache.prefill([1, 2], {})
    cache.step(5)
    assert cache.held == (1, 2, 5) and len(dec.rows) == 3


def test_failure_resyncs_and_next_call_starts_over():
    dec = ListDecoder()
    cache = PrefixCache(decoder=dec)
    cache.prefill([1, 2, 3], {})
    dec.fail_next = True
    with pytest.raises(RuntimeError, match="boom"):
        cache.prefill([1, 2, 3, 4, 5], {})
    assert cache.held == () and dec.rows == []
    assert cache.prefill([1, 2, 3], {}).evaluated == 3
    dec.fail_next = True
    with pytest.raises(RuntimeError):
        cache.step(4)
    assert cache.held == () and dec.rows == []


def test_failed_reset_reopens_through_the_factory():
    made = []

    def factory():
        made.append(ListDecoder())
        return made[-1]

    cache = PrefixCache(factory)
    cache.prefill([1, 2], {})
    made[0].fail_next = made[0].fail_reset = True
    with pytest.raises(RuntimeError):
        cache.step(3)
    assert not cache.is_open and len(made) == 1
    assert cache.prefill([1, 2], {}).evaluated == 2 and len(made) == 2


def test_release_closes_and_reopens_empty():
    made = []
    cache = PrefixCache(lambda: made.append(ListDecoder()) or made[-1])
    cache.prefill([1, 2, 3], {})
    assert cache.release() and made[0].closed and not cache.is_open and cache.held == ()
    assert cache.prefill([1, 2, 3], {}).evaluated == 3 and len(made) == 2
    fixed = PrefixCache(decoder=ListDecoder())
    assert not fixed.release() and fixed.is_open  # a given decoder cannot be reopened: kept


def test_bad_arguments():
    with pytest.raises(ConfigError, match="give a decoder"):
        PrefixCache()
    with pytest.raises(ConfigError, match="at least one position"):
        PrefixCache(decoder=ListDecoder()).prefill([], {})


class SnapshotDecoder(ListDecoder):
    """ListDecoder with runtime/language/decoder.py's read_kv/write_kv: rows as (1, 2, T, H * 4) bytes."""

    kv_row_bytes = 2 * H * 4
    saved: list

    def __init__(self):
        super().__init__()
        self.saved = []  # (start, stop) of each read_kv

    @property
    def n_past(self):
        return len(self.rows)

    def read_kv(self, start, stop, out=None):
        self.saved.append((start, stop))
        rows = np.asarray(self.rows[start:stop], dtype=np.float32).reshape(stop - start, H)
        got = np.stack([rows, rows])[None].view(np.uint8)
        if out is None:
            return got
        view = out[: got.nbytes].reshape(got.shape)  # as the decoder: into the buffer's first bytes
        view[...] = got
        return view

    def write_kv(self, rows, start):
        assert start <= len(self.rows), "write_kv past what the cache holds"
        floats = np.ascontiguousarray(rows).view(np.float32)[0, 0]
        self.rows = self.rows[:start] + [r.copy() for r in floats]


def test_stand_ins_satisfy_the_protocols():
    assert isinstance(ListDecoder(), KVDecoder) and not isinstance(ListDecoder(), KVSnapshots)
    assert isinstance(SnapshotDecoder(), KVSnapshots)


def test_snapshots_give_back_an_overwritten_prefix():
    dec = SnapshotDecoder()
    cache = PrefixCache(decoder=dec, snapshot_bytes=1 << 20)
    img = {"a": np.full((3, H), 7.0, np.float32), "b": np.full((3, H), 5.0, np.float32)}
    a = [1, 2, ("a", 0), ("a", 1), ("a", 2), 3, 4]
    b = [1, 2, ("b", 0), ("b", 1), ("b", 2), 3, 4]
    first = cache.prefill(a, img)
    cache.step(9)
    assert cache.snapshots == []  # nothing overwritten yet
    cache.prefill(b, img)  # overwrites a's rows: they are saved first (from position 2: b shares 1, 2)
    assert cache.snapshots == [(*a, 9)] and dec.saved == [(2, 8)]
    other = [*a[:5], 6, 4]  # image a again, another question
    pre = cache.prefill(other, img)
    assert (pre.restored, pre.evaluated) == (3, 2)  # a's image rows restored, the question evaluated
    assert cache.held == tuple(other)
    fresh = ListDecoder()
    ref = PrefixCache(decoder=fresh).prefill(other, img)
    np.testing.assert_array_equal(pre.logits, ref.logits)
    np.testing.assert_array_equal(np.asarray(dec.rows), np.asarray(fresh.rows))
    again = cache.prefill(a, img)  # the first request again: 5 positions live, 2 restored, logits kept
    assert (again.restored, again.evaluated) == (2, 0)
    np.testing.assert_array_equal(again.logits, first.logits)


def test_snapshots_respect_their_budget_and_survive_a_release():
    made = []

    def factory():
        made.append(SnapshotDecoder())
        return made[-1]

    row = SnapshotDecoder.kv_row_bytes
    cache = PrefixCache(factory, snapshot_bytes=9 * row)  # room for 9 positions: one 5-position prefix
    seqs = [[k, 1, 2, 3, 4] for k in (10, 11, 12)]  # nothing shared: saved whole
    for s in seqs:
        cache.prefill(s, {})
    # each overwritten 5-position prefix was saved; the oldest went when the third did not fit
    assert cache.snapshots == [tuple(seqs[1])]
    long = list(range(20, 32))  # 12 positions: never fits, never saved
    cache.prefill(long, {})
    cache.prefill(seqs[0], {})
    assert tuple(long) not in cache.snapshots
    # low-memory mode closes the decoder: what it held is saved, the reopened one starts from it
    assert cache.release()
    pre = cache.prefill([*seqs[0], 13], {})
    assert len(made) == 2 and (pre.restored, pre.evaluated) == (4, 2)


def test_snapshot_buffers_are_reserved_ahead_and_recycled():
    dec = SnapshotDecoder()
    row = dec.kv_row_bytes
    cache = PrefixCache(decoder=dec, snapshot_bytes=30 * row)
    assert cache.reserve(8, buffers=1) == 8 * row and cache.reserve(8, buffers=1) == 0  # not more
    (reserved,) = cache._spare
    a, b, c = [10, 1, 2, 3, 4], [11, 1, 2, 3, 4], [12, 5, 6]
    cache.prefill(a, {})
    cache.prefill(b, {})  # a saved, into the reserved buffer
    assert cache.snapshots == [tuple(a)] and cache._snapshots[tuple(a)][2] is reserved
    assert cache.prefill(a, {}).restored == 5  # b saved into a new buffer; a back from its snapshot
    cache.prefill([*a, 7, 8], {})  # a continued
    cache.prefill(c, {})  # saves a + 7, 8: a's snapshot is superseded, and its buffer takes the new one
    assert cache.snapshots == [tuple(b), (*a, 7, 8)] and cache._snapshots[(*a, 7, 8)][2] is reserved
    want = [*a, 7, 8, 9]
    ref = PrefixCache(decoder=ListDecoder()).prefill(want, {})
    np.testing.assert_array_equal(cache.prefill(want, {}).logits, ref.logits)
    assert cache._bytes_held() <= cache.snapshot_bytes
    small = PrefixCache(decoder=SnapshotDecoder(), snapshot_bytes=20 * row)
    assert small.reserve(8) == 16 * row and small.reserve(8, buffers=3) == 0  # the third would not fit


def test_no_snapshots_without_a_budget_or_without_read_kv():
    for dec, budget in ((SnapshotDecoder(), 0), (ListDecoder(), 1 << 20)):
        cache = PrefixCache(decoder=dec, snapshot_bytes=budget)
        cache.prefill([1, 2, 3], {})
        cache.prefill([4, 5, 6], {})
        assert cache.snapshots == [] and cache.prefill([1, 2, 3], {}).restored == 0
    with pytest.raises(ConfigError, match="snapshot_bytes"):
        PrefixCache(decoder=ListDecoder(), snapshot_bytes=-1)
