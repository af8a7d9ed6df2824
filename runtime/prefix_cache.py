r"""The decoder's KV cache as a prefix of positions: what it holds, how to make it hold more.

    positions wanted:  [bos, t1, t2, (img,0), (img,1), ..., t9, t10]
    cache holds:       [bos, t1, t2, (img,0), (img,1), ..., t9, x ]
                        \______________ kept _______________/ \ evaluated: t10 (x is dropped)

A position is a token id or (image key, embedding row). `prefill` keeps the longest common prefix,
truncates the decoder there and evaluates the rest, always at least the last two positions: the
decoder runs a call of two or more as a prompt, whose positions come out the same however many are
evaluated with them, while a single position would take its decode-step kernel. So the last
position's logits do not depend on what was cached, wherever the matmuls do not depend on the batch
size either: ggml's own kernels, and Q4_0 on x86, whose every prompt batch runs runtime/language/kernels/; its
K-quant tile takes batches of 16 or more and rounds its activations differently from ggml (KL ~1e-4
between the two at full size). `step` appends one token.
A failure inside the decoder leaves nothing trusted: `resync` empties the cache (and drops the
decoder when it can be reopened), so the next call starts over.

The last position's logits of recent prompts are kept too (LOGITS_KEPT of them, 0.2 MiB each at
full size): the same prompt again, while the cache or a snapshot still holds all of it, evaluates
nothing and returns the logits the first evaluation gave, so it answers exactly as the first time.

Snapshots (llama-server's `--cache-ram`, in spirit): before the KV cache's contents are overwritten
by another prompt, or lost when the decoder is released, they are copied to host memory (about
0.3 MiB per position at full size), from the first position the next prompt does not share (the
shared ones, e.g. the system prompt, stay live; a snapshot is used only while they do). `prefill`
then starts from whichever holds the longest prefix of what it wants: a second question on an image
seen a few requests ago, or the same request again, evaluates only what follows the shared part.
Least recently used snapshots go first past `snapshot_bytes`; a decoder without `read_kv`/`write_kv`
(test stand-ins) gets none. Their host memory is recycled: a dropped snapshot's buffer takes the next
one that fits, and `reserve` touches one ahead of need (the pipeline's `warm`), because the first touch
of fresh memory is most of what a save costs on a VM whose host backs guest pages lazily, far more
than the copy into touched memory (docs/benchmarks.md, figures behind decisions in code).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import numpy as np

from .errors import ConfigError
from .interfaces import KVDecoder, KVSnapshots
from .memory import host_buffer

Position = int | tuple[str, int]  # a token id, or (image key, embedding row)


@dataclass(frozen=True)
class Prefill:
    logits: np.ndarray  # (V,) of the last position
    evaluated: int  # positions run through the decoder (the rest were already cached)
    ms: float
    restored: int = 0  # positions copied back from a snapshot instead of evaluated


def common_prefix(a: Sequence[Position], b: Sequence[Position]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


EVALUATED = 2  # positions a prefill evaluates unless it knows the prompt's logits (module docstring)
LOGITS_KEPT = 8  # prompts whose last logits are kept

D = TypeVar("D", bound=KVDecoder)  # the decoder type `decoder` gives back (Pipeline's: LanguageDecoder)


class PrefixCache(Generic[D]):
    """A decoder (runtime/interfaces.py's `KVDecoder`) and the positions its KV cache holds.

    `factory` makes a decoder; with one, `release()` may close it (low-memory mode) and the next
    call reopens it with an empty cache. Without one, `decoder` is used as given and never reopened.
    A decoder that is also a `KVSnapshots` (has `read_kv`/`write_kv`) gets snapshots.
    """

    def __init__(
        self, factory: Callable[[], D] | None = None, decoder: D | None = None, snapshot_bytes: int = 0
    ):
        if factory is None and decoder is None:
            raise ConfigError("PrefixCache: give a decoder or a factory that makes one")
        if not isinstance(snapshot_bytes, int) or snapshot_bytes < 0:
            raise ConfigError(f"snapshot_bytes: expected an integer >= 0, got {snapshot_bytes!r}")
        self._factory = factory
        if decoder is None and factory is not None:
            decoder = factory()
        self._decoder: D | None = decoder
        self._held: list[Position] = []
        self.snapshot_bytes = snapshot_bytes
        # positions held -> (base, KV rows of positions base.., the buffer holding them): see _save
        self._snapshots: OrderedDict[tuple[Position, ...], tuple[int, np.ndarray, np.ndarray]] = OrderedDict()
        self._spare: list[np.ndarray] = []  # flat uint8 buffers of dropped snapshots, touched already
        self._logits: OrderedDict[tuple[Position, ...], np.ndarray] = OrderedDict()  # prompt -> its last

    # -- state ---------------------------------------------------------------------------------
    @property
    def decoder(self) -> D:
        """The open decoder, reopened (with an empty cache) after `release`."""
        if self._decoder is None:
            if self._factory is None:
                raise ConfigError("the decoder was closed and there is no factory to reopen it")
            self._decoder = self._factory()
            self._held = []
        return self._decoder

    @property
    def is_open(self) -> bool:
        return self._decoder is not None

    @property
    def reopenable(self) -> bool:
        return self._factory is not None

    @property
    def held(self) -> tuple[Position, ...]:
        """What the KV cache holds, position by position."""
        return tuple(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def shared(self, positions: Sequence[Position]) -> int:
        """How many leading positions the cache can keep for `positions`: all of them when their logits
        are known, else never the last two."""
        return common_prefix(self._held, self._keepable(positions))

    def _keepable(self, positions: Sequence[Position]) -> Sequence[Position]:
        """The part of a prompt that may come from the cache (see EVALUATED)."""
        if tuple(positions) in self._logits:
            return positions
        return positions[: max(len(positions) - EVALUATED, 0)]

    @property
    def snapshots(self) -> list[tuple[Position, ...]]:
        """The positions each snapshot holds, least recently used first."""
        return list(self._snapshots)

    # -- snapshots -------------------------------------------------------------------------------
    def _can_snapshot(self) -> bool:
        return self.snapshot_bytes > 0 and hasattr(self._decoder, "read_kv")

    @property
    def _kv(self) -> KVSnapshots:
        """The decoder as KVSnapshots (where `_can_snapshot`, or `write_kv` for a restore, said it is one)."""
        return cast(KVSnapshots, self._decoder)

    def _save(self, base: int) -> None:
        """Copy what the live cache holds from position `base` on to a snapshot (the positions before
        `base` stay live: the prompt about to run shares them), unless a snapshot already holds it."""
        held = tuple(self._held)
        if len(held) <= base or not self._can_snapshot():
            return
        if any(key[: len(held)] == held and b <= base for key, (b, *_) in self._snapshots.items()):
            return
        need = (len(held) - base) * self._kv.kv_row_bytes
        if need > self.snapshot_bytes:
            return
        for key in [k for k, (b, *_) in self._snapshots.items() if held[: len(k)] == k and b >= base]:
            self._drop(key)  # superseded
        buf = self._take(need)
        self._snapshots[held] = (base, self._kv.read_kv(base, len(held), out=buf), buf)
        self._fit()

    def _fit(self) -> None:
        """Within `snapshot_bytes`: spare buffers go first (the largest), then the least recently used
        snapshots (the one just saved is the most recent and fits alone)."""
        while self._bytes_held() > self.snapshot_bytes:
            if self._spare:
                self._spare.pop(max(range(len(self._spare)), key=lambda i: self._spare[i].nbytes))
            else:
                self._snapshots.popitem(last=False)

    def _bytes_held(self) -> int:
        return sum(buf.nbytes for *_, buf in self._snapshots.values()) + sum(b.nbytes for b in self._spare)

    def _take(self, nbytes: int) -> np.ndarray:
        """The smallest spare buffer of at least `nbytes`, or a new one."""
        fits = [i for i, b in enumerate(self._spare) if b.nbytes >= nbytes]
        if not fits:
            return host_buffer(nbytes)
        return self._spare.pop(min(fits, key=lambda i: self._spare[i].nbytes))

    def _drop(self, key: tuple[Position, ...]) -> None:
        """Forget a snapshot; its buffer becomes a spare."""
        *_, buf = self._snapshots.pop(key)
        self._spare.append(buf)

    def reserve(self, positions: int, buffers: int = 2) -> int:
        """Touch `buffers` spare buffers for snapshots of `positions` now (within `snapshot_bytes`),
        so that the saves that first need them do not wait on page faults; bytes touched. Two: one for
        each of two conversations taking turns, before dropped snapshots' buffers come back."""
        touched, nbytes = 0, positions * self._kv.kv_row_bytes if self._can_snapshot() else 0
        while nbytes and len(self._spare) < buffers and self._bytes_held() + nbytes <= self.snapshot_bytes:
            buf = host_buffer(nbytes)
            buf.fill(0)
            self._spare.append(buf)
            touched += nbytes
        return touched

    def _restore(self, positions: Sequence[Position], keep: int) -> int:
        """Extend the live prefix `keep` from the snapshot sharing most of `positions`; the new keep.
        A snapshot taken from position `base` on needs the live cache to hold the first `base`."""
        if not self._snapshots or not hasattr(self._decoder, "write_kv"):
            return keep
        want = self._keepable(positions)
        usable = [(k, common_prefix(k, want)) for k, (base, *_) in self._snapshots.items() if base <= keep]
        best, n = max(usable, key=lambda kn: kn[1], default=((), 0))
        if n <= keep:
            return keep
        base, rows, _ = self._snapshots[best]
        self._snapshots.move_to_end(best)  # the last to go, should the save below need room
        self._save(keep)  # what the live cache holds beyond `keep` is about to be overwritten
        self._kv.truncate(keep)
        self._kv.write_kv(rows[:, :, keep - base : n - base], keep)  # read before any reuse of it
        self._held = list(positions[:n])
        return n

    # -- evaluation ----------------------------------------------------------------------------
    def prefill(self, positions: Sequence[Position], images: Mapping[str, np.ndarray]) -> Prefill:
        """Make the cache hold `positions`, evaluating only what it lacks; `images[key]` is (Q, H)."""
        if not positions:
            raise ConfigError("prefill: expected at least one position, got none")
        dec = self.decoder
        keep = self.shared(positions)
        t0 = time.perf_counter()
        try:
            live = keep
            keep = self._restore(positions, keep)
            if keep == live and keep < len(self._held):
                self._save(keep)  # about to be overwritten
            dec.truncate(keep)
            del self._held[keep:]
            rest = list(positions[keep:])
            if not rest:  # all of it cached, and its logits known (_keepable)
                logits = self._logits[tuple(positions)]
            elif all(isinstance(p, int) for p in rest):
                logits = dec.eval_tokens(cast(list[int], rest))
            else:
                logits = dec.eval_embeddings(self.embeddings(rest, images))
        except BaseException:
            self.resync()
            raise
        self._held = list(positions)
        self._logits[tuple(positions)] = logits
        self._logits.move_to_end(tuple(positions))
        while len(self._logits) > LOGITS_KEPT:
            self._logits.popitem(last=False)
        return Prefill(logits.copy(), len(rest), (time.perf_counter() - t0) * 1e3, keep - live)

    def step(self, token: int) -> np.ndarray:
        """Append one token; its logits."""
        try:
            logits = self.decoder.eval_tokens([token])
        except BaseException:
            self.resync()
            raise
        self._held.append(token)
        return logits

    def embeddings(self, positions: Sequence[Position], images: Mapping[str, np.ndarray]) -> np.ndarray:
        """Positions -> (T, n_embd) rows: token embeddings from the decoder, image rows as given."""
        dec = self.decoder
        parts, run = [], []
        for p in positions:
            if isinstance(p, int):
                run.append(p)
                continue
            if run:
                parts.append(dec.embed_tokens(run))
                run = []
            parts.append(images[p[0]][p[1]][None])
        if run:
            parts.append(dec.embed_tokens(run))
        return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)

    # -- recovery and lifetime -------------------------------------------------------------------
    def resync(self) -> None:
        """After a failure inside the decoder: trust nothing, start from an empty cache."""
        self._held = []
        if self._decoder is not None:
            try:
                self._decoder.reset()
            except Exception:
                if self._factory is not None:
                    self._decoder = None

    def release(self) -> bool:
        """Close the decoder to free its memory (reopened on next use); False when it cannot be."""
        if self._factory is None or self._decoder is None:
            return False
        self._save(0)  # the reopened decoder starts from it instead of evaluating it again
        self._decoder.close()
        self._decoder, self._held = None, []
        return True

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._held = []
        self._snapshots.clear()
        self._spare.clear()
        self._logits.clear()
