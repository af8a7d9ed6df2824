"""The TinyGPT-V language decoder on ggml: a `tinygptv-phi2` GGUF in, logits out (no torch).

    with Decoder("language.q4_0.gguf", n_ctx=2048, n_threads=2) as dec:
        logits = dec.eval_tokens([dec.tokenizer.bos_id, *dec.tokenizer.encode("Hello")])
        logits = dec.eval_embeddings(image_embeds)   # (T, n_embd) float32, appended to the cache
        dec.truncate(3)                              # forget positions >= 3

Calls append to the KV cache. Long inputs are evaluated in batches of `n_batch` positions. A call of
two or more positions is a prompt (tiled attention, the same result per position whatever the batch),
one of a single position a decode step (runtime/language/ggml_graph.py). The interface is documented in
docs/decoder.md (the pipeline codes against it).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np

from ..checks import check_memory, check_threads, cpu_count
from ..config import PromptConfig
from ..contract import MATMUL, language_tensors
from ..errors import BackendError, ClosedError, ConfigError, ContextOverflowError
from ..memory import host_buffer
from ..text.tokenizer import Tokenizer
from .decoder_model import (
    HParams,
    check_tensors,
    read_format_version,
    read_hparams,
    read_image_tokens,
    read_prompt,
    read_tokenizer,
)
from .ggml_graph import Graph, build_graph, free_graph, mask_rows
from .ggml_runtime import (
    KV_TYPES,
    add_qk_norms,
    copy_kv_rows,
    free_kv_cache,
    kv_row_nbytes,
    load_ggml,
    new_kv_cache,
    place_weights,
    pread_exact,
)
from .gguf_file import GGUFFile
from .gguf_values import check_values
from .kernels import ops as kq

KV_PAD = 256  # attended slots are rounded up to this, so one graph serves 256 decode steps
GRAPH_CACHE = 6  # built graphs kept (LRU)


_CHECKED: set[tuple[int, ...]] = set()  # identities of the GGUF files whose values were checked


def _kv_positions(n: int, n_ctx: int) -> int:
    """Positions to allocate for `n`: whole KV_PAD steps (so the attended slots, n_kv, are those of a
    cache allocated in full: the same graphs, the same numbers), at most n_ctx."""
    return min(n_ctx, -(-n // KV_PAD) * KV_PAD)


def _kv_label(n: int, n_ctx: int) -> str:
    return (
        f"a KV cache of n_ctx={n} positions" if n == n_ctx else f"a KV cache of {n} positions (n_ctx={n_ctx})"
    )


def _identity(path: Path) -> tuple[int, ...]:
    """The file as it is now: a rewrite changes its inode, size or modification time."""
    st = Path(path).stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Decoder:
    """Modified Phi-2 over a memory-mapped GGUF, with a KV cache of up to `n_ctx` positions.

    `kv_type`: f16 (default), f32, or q8_0 / q4_0 (ggml's quantized blocks; the KL they cost is in
    docs/decoder.md). `n_ctx_alloc`: positions allocated at load (default: all of n_ctx); the cache
    grows by doubling, in whole KV_PAD steps, up to n_ctx when a call or `write_kv` needs more (the
    positions held are copied over; the graphs are rebuilt), so a short conversation holds a short
    cache.

    Safe to share between threads: calls are serialised by a lock (ggml's graphs and the KV cache
    are not reentrant). Weights are checked for NaN/inf (and K-quant scales for their sign) as they
    are loaded, before any output.
    """

    tokenizer: Tokenizer
    prompt: PromptConfig
    hparams: HParams

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        kv_type: str = "f16",
        n_batch: int = 256,
        repack: bool = True,
        kquant: bool = True,
        n_ctx_alloc: int | None = None,
    ):
        if kv_type not in KV_TYPES:
            raise ConfigError(f"kv_type: expected one of {sorted(KV_TYPES)}, got {kv_type!r}")
        n_ctx_alloc = n_ctx if n_ctx_alloc is None else n_ctx_alloc
        for label, v in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_ctx_alloc", n_ctx_alloc)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{label}: expected a positive integer, got {v!r}")
        check_threads(n_threads)
        self._lock = threading.Lock()
        self._closed = True
        self._graphs: OrderedDict[tuple, Graph] = OrderedDict()
        self._backend = None
        self._gf = GGUFFile.open(path)
        try:
            self.hparams = hp = read_hparams(self._gf)  # checks the format version first
            self.format_version = read_format_version(self._gf)
            check_tensors(self._gf, hp)
            self.tokenizer = read_tokenizer(self._gf, hp.n_vocab)
            self.prompt = read_prompt(self._gf)
            self.image_tokens = read_image_tokens(self._gf)
        except BaseException:
            self._gf.close()
            raise
        try:
            if n_ctx > hp.n_ctx_train:
                raise ConfigError(
                    f"n_ctx: expected at most the model's trained context of {hp.n_ctx_train} "
                    f"({self._gf.path}), got {n_ctx}"
                )
            self._row = kv_row_nbytes(kv_type, hp.n_head, hp.head_dim)  # one layer's K (or V) position
            self._n_alloc = _kv_positions(min(n_ctx_alloc, n_ctx), n_ctx)
            check_memory(2 * hp.n_layer * self._row * self._n_alloc, _kv_label(self._n_alloc, n_ctx))
            self.n_embd, self.n_vocab, self.n_ctx = hp.n_embd, hp.n_vocab, n_ctx
            self.n_threads = n_threads or cpu_count()
            self.n_batch, self.kv_type, self.n_past = n_batch, kv_type, 0
            self._load(repack, kquant)
        except BaseException:
            self._free()
            raise
        self._closed = False

    def _load(self, repack: bool, kquant: bool) -> None:
        hp = self.hparams
        self._ggml = ggml = load_ggml()
        self._dev = ggml.ggml_backend_dev_by_type(ggml.GGML_BACKEND_DEVICE_TYPE_CPU)
        self._backend = ggml.ggml_backend_dev_init(self._dev, None)
        ggml.ggml_backend_cpu_set_n_threads(self._backend, self.n_threads)
        matmul = {t.gguf for t in language_tensors(hp.n_layer) if t.role == MATMUL}
        # weights are checked for NaN/inf (and K-quant scale signs) before anything is allocated or
        # repacked, with `pread` into one small buffer per thread: a refused file costs no memory;
        # once per file and process (low-memory mode reopens the decoder for every image turn)
        identity = _identity(self._gf.path)
        if identity not in _CHECKED:
            check_values(self._gf, threads=min(2, self.n_threads))
            _CHECKED.add(identity)
        self._w = place_weights(ggml, self._gf, self._dev, matmul, repack=repack)
        if kquant and kq.available():  # batches through runtime/language/kernels/ (see kquant.py)
            mapped = matmul - set(self._w.repacked)
            w = self._w.tensors
            self._w.kquant = {n: w[n].contents.type for n in mapped if kq.eligible(ggml, w[n])}
            tensors = cast(dict[str, object], w)  # the type kernels/ops.py declares (it only reads)
            self._w.kquant |= kq.repacked_q4_0(ggml, self._file_bytes, tensors, self._w.repacked)
            self._w.kquant_attention = kq.attention_available()
            self._w.kquant_decode_attention = kq.decode_attention_available()
        add_qk_norms(ggml, self._w, hp.n_layer, hp.n_head, hp.head_dim)
        self._kv = new_kv_cache(ggml, hp.n_layer, hp.n_head, hp.head_dim, self._n_alloc, self.kv_type)

    def _reserve(self, n: int) -> None:
        """Make the cache hold at least `n` positions (n <= n_ctx): a new cache of twice the positions
        (whole KV_PAD steps, at most n_ctx), the n_past positions copied over, the graphs rebuilt."""
        kv = self._kv
        if n <= kv.n_ctx:
            return
        hp, ggml = self.hparams, self._ggml
        size = _kv_positions(max(n, 2 * kv.n_ctx), self.n_ctx)
        check_memory(2 * hp.n_layer * self._row * size, _kv_label(size, self.n_ctx))
        new = new_kv_cache(ggml, hp.n_layer, hp.n_head, hp.head_dim, size, self.kv_type)
        copy_kv_rows(ggml, kv, new, self.n_past)
        for g in self._graphs.values():
            free_graph(ggml, g)
        self._graphs.clear()
        self._kv = new
        free_kv_cache(ggml, kv)

    def _file_bytes(self, name: str, nbytes: int) -> bytes:
        """The first `nbytes` of a tensor as the file holds them (pread: the mapping stays untouched)."""
        with open(self._gf.path, "rb") as f:
            return pread_exact(f, nbytes, self._gf.tensors[name].offset)

    # ------------------------------------------------------------------------------------------
    @property
    def repacked(self) -> list[str]:
        """Names of the weights living in llama.cpp's repacked CPU buffer."""
        return list(self._w.repacked)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self._gf.tensors.values())

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache as allocated now (it grows up to n_ctx positions)."""
        return self._kv.nbytes

    @property
    def n_ctx_alloc(self) -> int:
        """Positions the KV cache holds room for now."""
        return self._kv.n_ctx

    def eval_tokens(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append token ids to the cache; logits (n_vocab,) of the last one, or (T, n_vocab)."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"ids: expected a non-empty 1-D sequence of integers, got shape {arr.shape}")
        bad = arr[(arr < 0) | (arr >= self.n_vocab)]
        if bad.size:
            raise ConfigError(f"token id {int(bad[0])} is outside the vocabulary of {self.n_vocab}")
        return self._eval(arr.astype(np.int32), False, all_logits)

    def eval_embeddings(self, embeds: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append (T, n_embd) float32 embeddings (e.g. image tokens); same return as `eval_tokens`."""
        arr = np.asarray(embeds)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != self.n_embd:
            raise ConfigError(f"embeds: expected shape (T > 0, {self.n_embd}), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ConfigError(f"embeds: expected floating point values, got {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        if bad.size:
            rows = ", ".join(map(str, bad[:8])) + (", ..." if bad.size > 8 else "")
            raise ConfigError(f"embeds: expected finite values, {bad.size} row(s) hold NaN or inf: {rows}")
        return self._eval(arr, True, all_logits)

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """(T, n_embd) float32 rows of token_embd, dequantized by ggml."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"ids: expected a non-empty 1-D sequence of integers, got shape {arr.shape}")
        if ((arr < 0) | (arr >= self.n_vocab)).any():
            raise ConfigError(f"token ids must be in [0, {self.n_vocab}), got {arr.min()}..{arr.max()}")
        with self._lock:
            self._check_open()
            return self._embed(arr.astype(np.int32))

    def truncate(self, n_past: int) -> None:
        """Forget cache positions >= n_past."""
        with self._lock:
            self._check_open()
            if not isinstance(n_past, int) or not 0 <= n_past <= self.n_past:
                raise ConfigError(f"truncate: expected 0 <= n_past <= {self.n_past}, got {n_past!r}")
            self.n_past = n_past

    def reset(self) -> None:
        self.truncate(0)

    @property
    def kv_row_bytes(self) -> int:
        """Bytes one position takes in the cache (K and V, every layer)."""
        return 2 * self.hparams.n_layer * self._row

    def read_kv(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Copy cache positions [start, stop) out: uint8 (n_layer, 2, stop - start, row bytes), into the
        first bytes of `out` (a flat uint8 buffer, e.g. a recycled one) when given."""
        with self._lock:
            self._check_open()
            if not all(isinstance(v, int) for v in (start, stop)) or not 0 <= start <= stop <= self.n_past:
                raise ConfigError(
                    f"read_kv: expected 0 <= start <= stop <= {self.n_past}, got {start!r}, {stop!r}"
                )
            row = self._row
            shape = (self.hparams.n_layer, 2, stop - start, row)
            need = math.prod(shape)
            if out is None:
                out = host_buffer(need)
            elif out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous or out.nbytes < need:
                raise ConfigError(
                    f"read_kv: expected a flat uint8 buffer of at least {need} bytes, "
                    f"got {out.dtype} {out.shape}"
                )
            out = out[:need].reshape(shape)
            get = self._ggml.ggml_backend_tensor_get
            for i, pair in enumerate(zip(self._kv.k, self._kv.v, strict=True)):
                for j, t in enumerate(pair):
                    get(t, out[i, j].ctypes.data, start * row, out[i, j].nbytes)
            return out

    def write_kv(self, rows: np.ndarray, start: int) -> None:
        """Write rows read by `read_kv` at positions start.., and make the cache end after them: the
        caller vouches that the `start` positions before them are the ones the rows were computed on."""
        with self._lock:
            self._check_open()
            row, n = self._row, rows.shape[2] if rows.ndim == 4 else -1
            want = (self.hparams.n_layer, 2, n, row)
            if not isinstance(start, int) or not 0 <= start <= self.n_past:
                raise ConfigError(f"write_kv: expected 0 <= start <= {self.n_past}, got {start!r}")
            if rows.dtype != np.uint8 or rows.shape != want or start + n > self.n_ctx:
                raise ConfigError(
                    f"write_kv: expected uint8 rows of shape {want} ending at most at n_ctx={self.n_ctx}, "
                    f"got {rows.dtype} {rows.shape} from position {start}"
                )
            self._reserve(start + n)
            set_ = self._ggml.ggml_backend_tensor_set
            for i, pair in enumerate(zip(self._kv.k, self._kv.v, strict=True)):
                for j, t in enumerate(pair):
                    block = np.ascontiguousarray(rows[i, j])  # a view when `rows` was cut on axis 2
                    set_(t, block.ctypes.data, start * row, block.nbytes)
            self.n_past = start + n

    def close(self) -> None:
        """Free the weights, the cache and the graphs (waits for a call in progress)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._free()

    def _free(self) -> None:
        """Free whatever exists (also after a failed load)."""
        ggml = self.__dict__.get("_ggml")
        if ggml is not None:
            for g in self._graphs.values():
                free_graph(ggml, g)
            self._graphs.clear()
            kv, w, backend = self.__dict__.pop("_kv", None), self.__dict__.pop("_w", None), self._backend
            if kv is not None:
                free_kv_cache(ggml, kv)
            if w is not None:
                for buf in w.buffers:
                    ggml.ggml_backend_buffer_free(buf)
                ggml.ggml_free(w.ctx)
                if w.qk_ctx:
                    ggml.ggml_free(w.qk_ctx)
            if backend:
                ggml.ggml_backend_free(backend)
            self._backend = None
        self._gf.close()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the decoder of {self._gf.path} is closed")

    def _eval(self, inp: np.ndarray, embeddings: bool, all_logits: bool) -> np.ndarray:
        with self._lock:  # one call at a time: graphs, cache and n_past are shared state
            self._check_open()
            T = len(inp)
            if self.n_past + T > self.n_ctx:
                raise ContextOverflowError(self.n_past, T, self.n_ctx)
            self._reserve(self.n_past + T)
            outs, prompt = [], T > 1  # every batch of a prompt, its last one of 1 position too
            for s in range(0, T, self.n_batch):
                chunk = inp[s : s + self.n_batch]
                outs.append(self._run(chunk, embeddings, all_logits, prompt))
            return np.concatenate(outs) if all_logits else outs[-1][-1]

    def _graph(self, T: int, n_kv: int, embeddings: bool, all_logits: bool, prompt: bool) -> Graph:
        key = (T, n_kv, embeddings, all_logits, prompt)
        g = self._graphs.get(key)
        if g is None:
            g = build_graph(self._ggml, self.hparams, self._w, self._kv, *key)
            self._graphs[key] = g
            while len(self._graphs) > GRAPH_CACHE:
                free_graph(self._ggml, self._graphs.popitem(last=False)[1])
        else:
            self._graphs.move_to_end(key)
        return g

    def _run(self, inp: np.ndarray, embeddings: bool, all_logits: bool, prompt: bool) -> np.ndarray:
        """One batch of T positions at n_past..n_past+T-1 -> logits (R, n_vocab). `prompt`: attention
        through ggml's tiled kernel whatever T (runtime/language/ggml_graph.py)."""
        ggml, T, p0 = self._ggml, len(inp), self.n_past
        n_kv = min(self._kv.n_ctx, -(-(p0 + T) // KV_PAD) * KV_PAD)  # as with the whole cache allocated
        all_logits = all_logits and T > 1
        g = self._graph(T, n_kv, embeddings, all_logits, prompt)

        pos = np.arange(p0, p0 + T, dtype=np.int32)
        mask = np.full((mask_rows(T, prompt), n_kv), -np.inf, dtype=np.float16)  # query t sees slots 0..p0+t
        mask[:T][np.arange(n_kv)[None, :] <= pos[:, None]] = 0.0
        for t, a in ((g.inp, inp), (g.pos, pos), (g.k_idx, pos.astype(np.int64)), (g.mask, mask)):
            ggml.ggml_backend_tensor_set(t, a.ctypes.data, 0, a.nbytes)
        status = ggml.ggml_backend_graph_compute(self._backend, g.gf)
        if status != 0:
            raise BackendError(f"{self._gf.path}: ggml graph compute failed with status {status}")
        if g.kq is not None:
            g.kq.check()
        self.n_past = p0 + T
        out = np.empty((g.rows, self.n_vocab), dtype=np.float32)
        ggml.ggml_backend_tensor_get(g.out, out.ctypes.data, 0, out.nbytes)
        return out

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        from .ggml_runtime import new_context

        ggml, T = self._ggml, len(ids)
        ctx = new_context(ggml, 4, 8)
        galloc = None
        try:
            inp = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I32, T)
            ggml.ggml_set_input(inp)
            rows = ggml.ggml_get_rows(ctx, self._w.tensors["token_embd.weight"], inp)
            ggml.ggml_set_output(rows)
            gf = ggml.ggml_new_graph_custom(ctx, 8, False)
            ggml.ggml_build_forward_expand(gf, rows)
            galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_cpu_buffer_type())
            if not ggml.ggml_gallocr_alloc_graph(galloc, gf):
                raise MemoryError("cannot allocate the embedding lookup")
            ggml.ggml_backend_tensor_set(inp, ids.ctypes.data, 0, ids.nbytes)
            status = ggml.ggml_backend_graph_compute(self._backend, gf)
            if status != 0:
                raise BackendError(f"{self._gf.path}: ggml embedding lookup failed with status {status}")
            out = np.empty((T, self.n_embd), dtype=np.float32)
            ggml.ggml_backend_tensor_get(rows, out.ctypes.data, 0, out.nbytes)
            return out
        finally:
            if galloc is not None:
                ggml.ggml_gallocr_free(galloc)
            ggml.ggml_free(ctx)
