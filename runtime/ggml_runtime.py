"""ggml plumbing for the decoder: OpenMP defaults, weight placement (mapped or repacked), the KV cache.

Import ggml only through `load_ggml()`: ggml's CPU backend runs on OpenMP, which reads its settings
once, when the library is loaded. With the default (spinning, unbound) threads a 2-vCPU VM ran a
forward up to 15x slower; binding the threads fixes it. The runtime sets these defaults itself
(the user's environment wins where it says otherwise).

Weights stay in the memory-mapped GGUF (no copy): a CPU buffer is laid over the mapping and each
tensor points into it. Matmul weights that llama.cpp's CPU backend can repack for its SIMD kernels
(Q4_0, Q4_K on x86/ARM; the buffer type is asked per tensor, never assumed) are copied into the
repack buffer instead, and their mapped pages are dropped from memory.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .gguf_file import TYPE_IDS, GGUFFile

# OpenMP settings the runtime wants unless the user set them (see bench/decoder.py --omp).
OMP_DEFAULTS = {"OMP_PROC_BIND": "true"}
PAGE = mmap.PAGESIZE


def load_ggml():
    """Import ggml-python with the runtime's OpenMP defaults in place (they only count before loading)."""
    if "ggml" not in sys.modules:
        for key, value in OMP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    import ggml

    _fix_pointer_returns(ggml)
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = ggml.ggml_log_callback(_log)
        ggml.ggml_log_set(_LOG_CALLBACK, None)
    return ggml


_LOG = logging.getLogger("tinygptv_edge.ggml")
_LOG_CALLBACK = None  # kept alive for as long as ggml may call it
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level


def _log(level: int, text: bytes, user_data) -> None:
    """ggml's messages go to `logging` (its INFO chatter, e.g. each repacked tensor, as DEBUG)."""
    _LOG.log(_LOG_LEVELS.get(level, logging.DEBUG), (text or b"").decode(errors="replace").rstrip())


def _fix_pointer_returns(ggml) -> None:
    """ggml-python 0.0.45 declares some pointer returns with a `NewType` (a plain callable), which
    ctypes treats as "call this with the C int": the pointer is cut to 32 bits. Return void* instead."""
    for name in dir(ggml):
        fn = getattr(ggml, name)
        if isinstance(fn, ctypes._CFuncPtr) and callable(fn.restype) and not isinstance(fn.restype, type):
            fn.restype = ctypes.c_void_p


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def new_context(ggml, n_tensors: int, graph_size: int = 0):
    """A metadata-only ggml context for `n_tensors` tensors (and one graph of `graph_size` nodes)."""
    size = ggml.ggml_tensor_overhead() * n_tensors
    if graph_size:
        size += ggml.ggml_graph_overhead_custom(graph_size, False)
    params = ggml.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True)
    ctx = ggml.ggml_init(params)
    if not ctx:
        raise MemoryError(f"ggml_init failed for a context of {size} bytes")
    return ctx


def extra_buffer_types(ggml, dev) -> list[int]:
    """The CPU device's extra buffer types (llama.cpp's repack buffer), through the registry."""
    reg = ggml.ggml_backend_dev_backend_reg(dev)
    addr = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return []
    fn = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
    arr = fn(dev)
    out, i = [], 0
    while arr and arr[i]:
        out.append(arr[i])
        i += 1
    return out


def buft_supports_matmul(ggml, ctx, dev, buft, w) -> bool:
    """Ask the device whether a matmul with weight `w` placed in `buft` is supported (as llama.cpp does)."""
    x = ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F32, w.contents.ne[0], 8)
    op = ggml.ggml_mul_mat(ctx, w, x)
    dummy = ggml.ggml_backend_buft_alloc_buffer(buft, 0)
    if not dummy:
        return False
    try:
        w.contents.buffer = dummy
        return bool(ggml.ggml_backend_dev_supports_op(dev, op))
    finally:
        w.contents.buffer = None
        ggml.ggml_backend_buffer_free(dummy)


@dataclass
class Weights:
    """Every GGUF tensor as a ggml tensor: `mapped` ones point into the file, `repacked` ones live apart."""

    tensors: dict[str, object]
    mapped: list[str]
    repacked: list[str]
    ctx: int
    buffers: list[int] = field(default_factory=list)
    repacked_bytes: int = 0


def place_weights(ggml, gf: GGUFFile, dev, matmul_weights: set[str], repack: bool = True) -> Weights:
    """Create the tensors, map them onto the file, and repack the matmul weights the CPU kernels accept."""
    n = len(gf.tensors)
    ctx = new_context(ggml, 3 * n + 8)  # tensors + the probe ops of `buft_supports_matmul`
    tensors = {}
    for name, info in gf.tensors.items():
        ne = (ctypes.c_int64 * len(info.shape))(*info.shape)
        t = ggml.ggml_new_tensor(ctx, TYPE_IDS[info.type.name], len(info.shape), ne)
        ggml.ggml_set_name(t, name.encode())
        if ggml.ggml_nbytes(t) != info.nbytes:  # the parser's type table must agree with ggml's
            raise RuntimeError(f"{name}: ggml computes {ggml.ggml_nbytes(t)} bytes, the file {info.nbytes}")
        tensors[name] = t

    to_repack: list[str] = []
    extras = extra_buffer_types(ggml, dev) if repack else []
    for buft in extras[:1]:
        to_repack = [n for n in matmul_weights if buft_supports_matmul(ggml, ctx, dev, buft, tensors[n])]
    mapped = [n for n in tensors if n not in to_repack]

    base = gf.base_address
    buffers = []
    host = ggml.ggml_backend_cpu_buffer_from_ptr(base, gf.data.nbytes)
    buffers.append(host)
    for name in mapped:
        status = ggml.ggml_backend_tensor_alloc(host, tensors[name], base + gf.tensors[name].offset)
        if status != 0:
            raise RuntimeError(f"ggml_backend_tensor_alloc failed for {name} (status {status})")
    if to_repack:
        buf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(ctx, extras[0])
        if not buf:
            raise MemoryError("cannot allocate the repack buffer")
        buffers.append(buf)
        for name in sorted(to_repack, key=lambda n: gf.tensors[n].offset):
            info = gf.tensors[name]
            ggml.ggml_backend_tensor_set(tensors[name], base + info.offset, 0, info.nbytes)
            _drop_pages(gf, info.offset, info.nbytes)
    nbytes = sum(gf.tensors[n].nbytes for n in to_repack)
    return Weights(tensors, mapped, to_repack, ctx, buffers, nbytes)


def _drop_pages(gf: GGUFFile, offset: int, nbytes: int) -> None:
    """Release the mapped pages wholly inside [offset, offset + nbytes): their data now lives repacked."""
    start = -(-offset // PAGE) * PAGE
    end = (offset + nbytes) // PAGE * PAGE
    if end > start and gf._mm is not None and hasattr(gf._mm, "madvise"):
        gf._mm.madvise(mmap.MADV_DONTNEED, start, end - start)


@dataclass
class KVCache:
    """Per layer: K as (n_embd, n_ctx) rows by position, V transposed as (n_ctx, n_embd)."""

    k: list[object]
    v: list[object]
    ctx: int
    buffer: int
    type_id: int
    n_ctx: int

    nbytes: int = 0


KV_TYPES = {"f16": "F16", "f32": "F32"}


def new_kv_cache(ggml, n_layer: int, n_embd: int, n_ctx: int, kv_type: str) -> KVCache:
    type_id = TYPE_IDS[KV_TYPES[kv_type]]
    ctx = new_context(ggml, 2 * n_layer)
    k = [ggml.ggml_new_tensor_2d(ctx, type_id, n_embd, n_ctx) for _ in range(n_layer)]
    v = [ggml.ggml_new_tensor_2d(ctx, type_id, n_ctx, n_embd) for _ in range(n_layer)]
    for i in range(n_layer):
        ggml.ggml_set_name(k[i], f"cache_k.{i}".encode())
        ggml.ggml_set_name(v[i], f"cache_v.{i}".encode())
    buf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml.ggml_backend_cpu_buffer_type())
    if not buf:
        raise MemoryError(f"cannot allocate a KV cache of {n_layer} x 2 x {n_embd} x {n_ctx} {kv_type}")
    ggml.ggml_backend_buffer_clear(buf, 0)  # masked slots are read (times 0): they must be finite
    return KVCache(k, v, ctx, buf, type_id, n_ctx, int(ggml.ggml_backend_buffer_get_size(buf)))


def tensor_to_numpy(ggml, t, shape: tuple[int, ...]) -> np.ndarray:
    """Copy an F32 ggml tensor out (numpy order `shape`)."""
    out = np.empty(shape, dtype=np.float32)
    ggml.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
    return out
