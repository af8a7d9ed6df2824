"""ggml plumbing for the decoder: OpenMP defaults, weight placement (mapped or repacked), the KV cache.

Import ggml only through `load_ggml()`: ggml's CPU backend runs on OpenMP, which reads its settings
once, when the library is loaded. ggml waits at an OpenMP barrier after every graph node (about 740 in
a full-size decode step). Threads that sleep there at once (OMP_WAIT_POLICY=passive) pay a futex
wake-up per node: a third of a step's time on an idle machine. Threads that spin long (OpenMP's
default, or active) collapse when the cores are shared with other jobs. The runtime's default is
passive waiting after a short spin (GOMP_SPINCOUNT=1000, libgomp's; other OpenMP runtimes see
passive): on the 2-core machine, as fast as spinning when idle and as fast as passive when other jobs
load both cores (docs/benchmarks.md, OpenMP settings). It is set unless the user set any OpenMP
wait/bind variable (then theirs stand).

Weights stay in the memory-mapped GGUF (no copy): a CPU buffer is laid over the mapping and each
tensor points into it. Matmul weights that llama.cpp's CPU backend can repack for its SIMD kernels
(Q4_0, Q4_K on x86/ARM; the buffer type is asked per tensor, never assumed) are read into the
repack buffer instead, and norms/biases (small) are copied; neither is touched through the mapping.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from _ctypes import CFuncPtr  # ctypes._CFuncPtr, the class of every foreign function
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .ggml_types import GGML_TYPES, TYPE_IDS
from .gguf_file import GGUFFile, TensorInfo

if TYPE_CHECKING:
    from ggml import ggml_tensor_p  # ctypes pointer to a ggml_tensor (ggml is imported on use)

# OpenMP settings the runtime wants unless the user set one of OMP_KEYS (see bench/decoder.py --omp).
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "1000"}
OMP_KEYS = ("OMP_WAIT_POLICY", "OMP_PROC_BIND", "GOMP_SPINCOUNT", "OMP_PLACES")
SMALL_TENSOR = 1 << 20  # bytes: copied instead of mapped


def load_ggml():
    """Import ggml-python with the runtime's OpenMP defaults in place (they only count before loading)."""
    if "ggml" not in sys.modules and not any(k in os.environ for k in OMP_KEYS):
        os.environ.update(OMP_DEFAULTS)
    import ggml

    _fix_pointer_returns(ggml)
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = ggml.ggml_log_callback(_log)
        ggml.ggml_log_set(_LOG_CALLBACK, None)
    return ggml


_LOG = logging.getLogger("tinygptv_edge.ggml")
_LOG_CALLBACK: Callable[..., None] | None = None  # kept alive for as long as ggml may call it
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level


def _log(level: int, text: bytes, user_data) -> None:
    """ggml's messages go to `logging` (its INFO chatter, e.g. each repacked tensor, as DEBUG)."""
    _LOG.log(_LOG_LEVELS.get(level, logging.DEBUG), (text or b"").decode(errors="replace").rstrip())


def _fix_pointer_returns(ggml) -> None:
    """ggml-python 0.0.45 declares some pointer returns with a `NewType` (a plain callable), which
    ctypes treats as "call this with the C int": the pointer is cut to 32 bits. Return void* instead."""
    for name in dir(ggml):
        fn = getattr(ggml, name)
        if isinstance(fn, CFuncPtr) and callable(fn.restype) and not isinstance(fn.restype, type):
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


REPACK_BUFT = b"CPU_REPACK"  # ggml-cpu's repack buffer; the native kernels read its layout


def repack_buffer_type(ggml, dev) -> int | None:
    """The CPU device's repack buffer type, by name, or None where ggml has none.

    Not simply the first extra buffer type: on a CPU with AMX, ggml lists its AMX buffer first, whose
    layout differs from the repack buffer's (the native kernels read the latter) and whose matmul
    crashed on this project's models in the ggml that ggml-python 0.0.45 bundles."""
    for buft in extra_buffer_types(ggml, dev):
        if ggml.ggml_backend_buft_name(buft) == REPACK_BUFT:
            return buft
    return None


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

    tensors: dict[str, ggml_tensor_p]
    mapped: list[str]
    repacked: list[str]
    ctx: int
    buffers: list[int] = field(default_factory=list)
    repacked_bytes: int = 0
    qk_norms: list[tuple[object, object]] = field(default_factory=list)  # per layer (weight, bias) (D, 2H)
    qk_ctx: int = 0
    kquant: dict[str, int] = field(default_factory=dict)  # batches through the native kernels: layout
    kquant_attention: bool = False  # prompts' attention through the native kernels (x86 with AVX-512)
    kquant_decode_attention: bool = False  # decode steps' attention too (AVX-512, NEON dotprod)


def place_weights(ggml, gf: GGUFFile, dev, matmul_weights: set[str], repack: bool = True) -> Weights:
    """Create the tensors, map them onto the file, and repack the matmul weights the CPU kernels accept.

    Whatever fails frees what was allocated and propagates.
    """
    ctx = new_context(ggml, len(gf.tensors) + 8)
    buffers: list[int] = []
    try:
        return _place(ggml, gf, dev, matmul_weights, repack, ctx, buffers)
    except BaseException:
        for buf in buffers:
            ggml.ggml_backend_buffer_free(buf)
        ggml.ggml_free(ctx)
        raise


def _place(ggml, gf, dev, matmul_weights, repack, ctx, buffers) -> Weights:
    tensors = {}
    for name, info in gf.tensors.items():
        ne = (ctypes.c_int64 * len(info.shape))(*info.shape)
        t = ggml.ggml_new_tensor(ctx, TYPE_IDS[info.type.name], len(info.shape), ne)
        ggml.ggml_set_name(t, name.encode())
        if ggml.ggml_nbytes(t) != info.nbytes:  # the parser's type table must agree with ggml's
            raise RuntimeError(f"{name}: ggml computes {ggml.ggml_nbytes(t)} bytes, the file {info.nbytes}")
        tensors[name] = t

    to_repack: list[str] = []
    repack_buft = repack_buffer_type(ggml, dev) if repack else None
    if repack_buft:  # probe ops live in their own context: the repack buffer below takes all of `ctx`
        probe = new_context(ggml, 2 * len(matmul_weights) + 8)
        try:
            to_repack = [
                n for n in matmul_weights if buft_supports_matmul(ggml, probe, dev, repack_buft, tensors[n])
            ]
        finally:
            ggml.ggml_free(probe)
    # small tensors (norms, biases) are copied: touching them through the mapping would fault in the
    # page cache's large folios around them, i.e. megabytes of the neighbouring (repacked) weights
    copied = [n for n in tensors if n not in to_repack and gf.tensors[n].nbytes < SMALL_TENSOR]
    mapped = [n for n in tensors if n not in to_repack and n not in copied]

    base = gf.base_address
    host = ggml.ggml_backend_cpu_buffer_from_ptr(base, gf.data.nbytes)
    buffers.append(host)
    for name in mapped:
        _check(ggml.ggml_backend_tensor_alloc(host, tensors[name], base + gf.tensors[name].offset), name)

    cpu = ggml.ggml_backend_cpu_buffer_type()
    align = ggml.ggml_backend_buft_get_alignment(cpu)
    offsets, size = {}, 0
    for name in copied:
        offsets[name] = size
        size += -(-gf.tensors[name].nbytes // align) * align
    with open(gf.path, "rb") as f:
        if copied:
            small = ggml.ggml_backend_buft_alloc_buffer(cpu, size)
            if not small:
                raise MemoryError(f"cannot allocate {size} bytes for the small tensors")
            buffers.append(small)
            sbase = ggml.ggml_backend_buffer_get_base(small)
            for name in copied:
                _check(ggml.ggml_backend_tensor_alloc(small, tensors[name], sbase + offsets[name]), name)
                _set_from_file(ggml, f, tensors[name], gf.tensors[name])
        if to_repack:
            buf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(ctx, repack_buft)
            if not buf:
                raise MemoryError("cannot allocate the repack buffer")
            buffers.append(buf)
            for name in sorted(to_repack, key=lambda n: gf.tensors[n].offset):
                _set_from_file(ggml, f, tensors[name], gf.tensors[name])
    nbytes = sum(gf.tensors[n].nbytes for n in to_repack)
    return Weights(tensors, mapped, to_repack, ctx, buffers, nbytes)


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"ggml_backend_tensor_alloc failed for {name} (status {status})")


def _set_from_file(ggml, f, tensor, info: TensorInfo) -> None:
    """Read the bytes with pread (not through the mapping, so none of it stays resident) and hand them
    to the tensor's buffer (the repack buffer converts them to its layout)."""
    data = pread_exact(f, info.nbytes, info.offset)
    ggml.ggml_backend_tensor_set(tensor, data, 0, info.nbytes)


def pread_exact(f, nbytes: int, offset: int) -> bytes:
    """`nbytes` of the open file `f` at `offset`, read with pread (the file's mapping stays untouched)."""
    data = os.pread(f.fileno(), nbytes, offset)
    if len(data) != nbytes:
        raise OSError(f"short read of {nbytes} bytes at {offset}: the file changed on disk")
    return data


def add_qk_norms(ggml, w: Weights, n_layer: int, n_head: int, head_dim: int) -> None:
    """Per layer, q_norm's and k_norm's weight and bias tiled over the heads: (D, 2H) F32, so that one
    LayerNorm op serves q and k (ggml broadcasts a (D,) weight over all rows, not over half)."""
    ctx = new_context(ggml, 2 * n_layer)
    pairs = [
        tuple(ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F32, head_dim, 2 * n_head) for _ in range(2))
        for _ in range(n_layer)
    ]
    buf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml.ggml_backend_cpu_buffer_type())
    if not buf:
        raise MemoryError("cannot allocate the q/k norm tables")
    for i, pair in enumerate(pairs):
        for t, kind in zip(pair, ("weight", "bias"), strict=True):
            rows = []
            for which in ("q", "k"):
                src = np.empty(head_dim, dtype=np.float32)
                ggml.ggml_backend_tensor_get(
                    w.tensors[f"blk.{i}.attn_{which}_norm.{kind}"], src.ctypes.data, 0, src.nbytes
                )
                rows.append(np.tile(src, (n_head, 1)))
            table = np.ascontiguousarray(np.concatenate(rows))  # (2H, D)
            ggml.ggml_backend_tensor_set(t, table.ctypes.data, 0, table.nbytes)
    w.qk_norms, w.qk_ctx = pairs, ctx
    w.buffers.append(buf)


@dataclass
class KVCache:
    """Per layer: K and V as (n_head * head_dim_kv, n_ctx), one row per position.

    A quantized cache (Q8_0, Q4_0: blocks of 32) pads each head from head_dim to `head_dim_kv`, the
    next multiple of the block, with zeros: ggml's flash attention reads K and V per head, so a head
    must be whole blocks (Phi-2's head_dim 80 -> 96). Zero dims add nothing to q.k, and the padded
    dims of the output are dropped (runtime/language/ggml_graph.py).
    """

    k: list[object]
    v: list[object]
    ctx: int
    buffer: int
    type_id: int
    n_ctx: int  # positions allocated (the decoder grows the cache up to its n_ctx)
    head_dim_kv: int = 0
    nbytes: int = 0
    quantized: bool = False


# Decoder kv_type -> ggml type; the quantized ones go through ggml's flash attention only
KV_TYPES = {"f16": "F16", "f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0"}
QUANTIZED_KV = ("q8_0", "q4_0")


def kv_head_dim(kv_type: str, head_dim: int) -> int:
    """Elements one head takes in a cache row: head_dim, padded to whole blocks of a quantized type."""
    block = GGML_TYPES[TYPE_IDS[KV_TYPES[kv_type]]].block
    return -(-head_dim // block) * block


def kv_row_nbytes(kv_type: str, n_head: int, head_dim: int) -> int:
    """Bytes one position takes in one layer's K (or V) cache."""
    t = GGML_TYPES[TYPE_IDS[KV_TYPES[kv_type]]]
    return n_head * t.row_nbytes(kv_head_dim(kv_type, head_dim))


def _reads_as_zero(ggml, buf) -> bool:
    """Whether a fresh buffer already holds zeros, checked by reading only.

    A large buffer comes from fresh anonymous pages: reading them maps the kernel's shared zero page
    and adds nothing to the resident set, while clearing them would make the whole KV cache resident
    at load time (640 MiB in F16 at full size, n_ctx 2048) instead of as positions fill. Reused heap
    memory is cleared.
    """
    size = int(ggml.ggml_backend_buffer_get_size(buf))
    base = ggml.ggml_backend_buffer_get_base(buf)
    if not base or size == 0:
        return False
    words = np.ctypeslib.as_array((ctypes.c_uint64 * (size // 8)).from_address(base))
    tail = np.ctypeslib.as_array((ctypes.c_uint8 * (size % 8)).from_address(base + size - size % 8))
    step = 1 << 20  # 8 MiB at a time: no big temporary
    return not any(words[i : i + step].any() for i in range(0, len(words), step)) and not tail.any()


def new_kv_cache(ggml, n_layer: int, n_head: int, head_dim: int, n_ctx: int, kv_type: str) -> KVCache:
    type_id = TYPE_IDS[KV_TYPES[kv_type]]
    dk = kv_head_dim(kv_type, head_dim)
    ctx = new_context(ggml, 2 * n_layer)
    k = [ggml.ggml_new_tensor_2d(ctx, type_id, n_head * dk, n_ctx) for _ in range(n_layer)]
    v = [ggml.ggml_new_tensor_2d(ctx, type_id, n_head * dk, n_ctx) for _ in range(n_layer)]
    for i in range(n_layer):
        ggml.ggml_set_name(k[i], f"cache_k.{i}".encode())
        ggml.ggml_set_name(v[i], f"cache_v.{i}".encode())
    buf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml.ggml_backend_cpu_buffer_type())
    if not buf:
        ggml.ggml_free(ctx)
        raise MemoryError(f"cannot allocate a KV cache of {n_layer} x 2 x {n_head * dk} x {n_ctx} {kv_type}")
    if not _reads_as_zero(ggml, buf):  # masked slots are read (times 0): they must be finite
        ggml.ggml_backend_buffer_clear(buf, 0)
    size = int(ggml.ggml_backend_buffer_get_size(buf))
    return KVCache(k, v, ctx, buf, type_id, n_ctx, dk, size, kv_type in QUANTIZED_KV)


def free_kv_cache(ggml, kv: KVCache) -> None:
    ggml.ggml_backend_buffer_free(kv.buffer)
    ggml.ggml_free(kv.ctx)


def copy_kv_rows(ggml, src: KVCache, dst: KVCache, n: int) -> None:
    """Positions [0, n) of every layer's K and V from `src` to `dst` (same type and row layout)."""
    if (src.type_id, src.head_dim_kv) != (dst.type_id, dst.head_dim_kv) or n > min(src.n_ctx, dst.n_ctx):
        raise ValueError("copy_kv_rows: caches of different layouts, or too few positions")
    for a, b in zip((*src.k, *src.v), (*dst.k, *dst.v), strict=True):
        ta, tb = cast(Any, a).contents, cast(Any, b).contents  # ggml_tensor pointers
        nbytes = n * ta.nb[1]
        if nbytes:
            ctypes.memmove(tb.data, ta.data, nbytes)
