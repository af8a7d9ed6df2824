"""The Python side of the native kernels (runtime/language/kernels/*.c, the `_native` module): the
batched Q4_0 / K-quant matmul and the prompt attention as ggml custom ops, for prompt batches.

ggml-python 0.0.45 has no batched kernel for the K-quants on x86 (it repacks only Q4_0/Q4_K), so a
Q4_K_M prefill spent most of its time re-unpacking the Q5_K/Q6_K rows for every token. A graph node
made by `KQuantOps.matmul` runs the C kernel (matmul.c) on ggml's own threads instead; its arguments
(data pointers) are bound once the graph's buffers are allocated. Used only where the CPU runs one of
the kernels' fast paths (`active_path()`: AVX512-VNNI on x86-64, NEON dotprod on aarch64, chosen once
when the module loads: dispatch.c), for batches of at least MIN_TOKENS, and for every prompt batch of
Q4_0 in ggml's x86 layout (`takes`); elsewhere ggml's mul_mat runs. The node adds the layer's bias and
applies GELU where asked (epilogue.c). A second op, `KQuantOps.attention` (attention.c), computes a
prompt's attention on x86 with AVX-512 (`attention_available`), each query alone and unpadded, in
place of ggml's flash attention; with `decode=True` it is a decode step's one query, on every path
with its own SIMD version of it (`decode_attention_available`: AVX-512, NEON dotprod). The C side's
map: native.h.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from .. import ggml_types

try:
    from . import _native
except ImportError:  # not built (e.g. a source tree without the editable install)
    _native = None  # type: ignore[assignment]  # available() is then False

TYPE_IDS = {name: ggml_types.TYPE_IDS[name] for name in (*ggml_types.K_QUANTS, "Q4_0")}  # ggml_type
Q4_0 = ggml_types.GGML_TYPES[TYPE_IDS["Q4_0"]]  # 32 columns in 18 bytes
MIN_TOKENS = 16  # below one 16-token block the tile would compute padding


class KQArgs(ctypes.Structure):
    """kq_args in native.h."""

    _fields_ = [
        ("type", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
        ("t", ctypes.c_int32),
        ("w", ctypes.c_void_p),
        ("x", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("ldx", ctypes.c_int64),
        ("ldo", ctypes.c_int64),
        ("status", ctypes.c_int32),
        ("bias", ctypes.c_void_p),
        ("act", ctypes.c_int32),
    ]


class KQAttnArgs(ctypes.Structure):
    """kq_attn_args in native.h."""

    _fields_ = [
        ("D", ctypes.c_int32),
        ("H", ctypes.c_int32),
        ("T", ctypes.c_int32),
        ("n_kv", ctypes.c_int32),
        ("kv_f16", ctypes.c_int32),
        ("q", ctypes.c_void_p),
        ("q_nb1", ctypes.c_int64),
        ("q_nb2", ctypes.c_int64),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("k_nb1", ctypes.c_int64),
        ("k_nb2", ctypes.c_int64),
        ("v_nb1", ctypes.c_int64),
        ("v_nb2", ctypes.c_int64),
        ("mask", ctypes.c_void_p),
        ("m_nb1", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("scale", ctypes.c_float),
        ("status", ctypes.c_int32),
    ]


def active_path() -> str | None:
    """The path the kernel runs on this CPU: 'avx512vnni', 'neon-dotprod' or 'plain'; None if unbuilt."""
    return None if _native is None else _native.PATH


def available() -> bool:
    """Whether the decoder sends batches here: only a fast path beats ggml's own kernels."""
    return active_path() not in (None, "plain")


def takes(kind: int, tokens: int, prompt: bool) -> bool:
    """Whether a batch of `tokens` (of a prompt or not) goes through the kernel for weights of `kind`.

    Q4_0 in ggml's x86 layout runs a kernel whose cost follows the token count (kq_q40x8_avx512 in
    x86_avx512.c), faster than ggml's at every prompt batch size measured (docs/benchmarks.md), so
    every prompt batch takes it, its last one of 1 position too: a prompt position then gets the same
    logits in any batch (what a prompt restored from the prefix cache evaluates). Decode steps keep
    ggml's gemv, which reads the weights as fast. The other kinds run the 16-token tile from MIN_TOKENS."""
    return tokens >= MIN_TOKENS or (prompt and _native is not None and kind == _native.Q4_0_X8)


def eligible(ggml, w) -> bool:
    """A weight in plain rows the kernel takes: Q4_0/Q4_K/Q5_K/Q6_K, whole (super-)blocks per row, rows
    in tiles of ROWS."""
    c = w.contents
    return (
        _native is not None
        and c.type in TYPE_IDS.values()
        and c.ne[0] % ggml_types.GGML_TYPES[c.type].block == 0
        and c.ne[1] % _native.ROWS == 0
        and ggml.ggml_is_contiguous(w)
    )


def interleave_q4_0x8(rows: bytes, k: int) -> bytes:
    """Eight Q4_0 rows of `k` columns as ggml's x86 repack lays them out (make_block_q4_0x8 in
    ggml-cpu/repack.cpp): per block of 32 columns the 8 fp16 scales, then the 8 rows' 16 bytes of
    nibbles in 8-byte chunks (chunk i: row i % 8, bytes 8 * (i // 8)...), each byte XOR 0x88."""
    nb = k // Q4_0.block
    b = np.frombuffer(rows, np.uint8).reshape(8, nb, Q4_0.nbytes).transpose(1, 0, 2)  # (block, row, 18)
    qs = b[..., 2:]
    chunks = np.concatenate([qs[..., :8].reshape(nb, 64), qs[..., 8:].reshape(nb, 64)], axis=1) ^ 0x88
    return np.concatenate([b[..., :2].reshape(nb, 16), chunks], axis=1).tobytes()


def repacked_q4_0(ggml, file_rows, tensors: dict[str, Any], repacked: list[str]) -> dict[str, int]:
    """The repacked Q4_0 weights whose layout is ggml's x86 8-row interleave, as {name: kernel type}.

    The layout is confirmed on the first such weight: its first 8 rows as the repack buffer holds them
    must equal `interleave_q4_0x8` of the file's bytes (`file_rows(name, nbytes)`); on any other
    layout (aarch64's 4-row ones) nothing is returned and ggml's own kernels keep the batches."""
    if _native is None:
        return {}
    shapes = {n: tensors[n].contents for n in repacked}
    q40 = [n for n, c in shapes.items() if c.type == TYPE_IDS["Q4_0"] and not (c.ne[1] % 8 or c.ne[0] % 32)]
    if not q40:
        return {}
    t = tensors[q40[0]].contents
    nbytes = 8 * Q4_0.row_nbytes(t.ne[0])
    if ctypes.string_at(t.data, nbytes) != interleave_q4_0x8(file_rows(q40[0], nbytes), t.ne[0]):
        return {}
    return dict.fromkeys(q40, _native.Q4_0_X8)


_OP = None  # the C functions as ggml_custom_op_t, kept alive with the module
_ATTN_OP = None
_ATTN1_OP = None


def attention_available() -> bool:
    """Whether prompt attention runs attention.c's op (AVX-512: its plain C path is a reference only)."""
    return active_path() == "avx512vnni"


def decode_attention_available() -> bool:
    """Whether a decode step's attention runs attention.c's one-query op: where this CPU's path has its
    own SIMD version (AVX-512, NEON dotprod); elsewhere ggml's flash attention keeps it."""
    return _native is not None and bool(_native.ATTENTION1_OWN)


class KQuantOps:
    """The custom matmul nodes of one graph: make them, bind their pointers, check their status."""

    def __init__(self, ggml):
        global _OP, _ATTN_OP, _ATTN1_OP
        if _OP is None:
            _OP = ggml.ggml_custom_op_t(_native.op_address())
            _ATTN_OP = ggml.ggml_custom_op_t(_native.attn_op_address())
            _ATTN1_OP = ggml.ggml_custom_op_t(_native.attn1_op_address())
        self.ggml = ggml
        self.nodes: list[tuple[KQArgs, Any, Any, Any, Any]] = []  # (args, w, x, out, bias): ggml tensors
        self.attn: list[tuple[KQAttnArgs, Any, Any, Any, Any, Any]] = []  # (args, q, k, v, mask, out)

    def matmul(self, ctx, w, x, kind: int, bias=None, gelu: bool = False):
        """W x (+ bias, then GELU) for x (K, T) F32 with contiguous rows: an F32 (N, T) node, like
        ggml_mul_mat (+ ggml_add, ggml_gelu: the same numbers, in the op's own pass). `kind`: the
        weight's layout as the kernel names it (its ggml type, or Q4_0_X8 for ggml's x86 Q4_0 repack);
        `bias`: an F32 (N,) tensor or None."""
        ggml = self.ggml
        n, k, t = w.contents.ne[1], w.contents.ne[0], x.contents.ne[1]
        if bias is not None and (bias.contents.type != ggml.GGML_TYPE_F32 or bias.contents.ne[0] != n):
            raise RuntimeError(f"k-quant matmul: expected an F32 bias of {n}")
        args = KQArgs(type=kind, n=n, k=k, t=t, act=_native.ACT_GELU if gelu else 0)
        operands = (w, x) if bias is None else (w, x, bias)
        srcs = (ctypes.POINTER(ggml.ggml_tensor) * len(operands))(*operands)
        user = ctypes.cast(ctypes.pointer(args), ctypes.c_void_p)
        out = ggml.ggml_custom_4d(ctx, ggml.GGML_TYPE_F32, n, t, 1, 1, srcs, len(operands), _OP, -1, user)
        self.nodes.append((args, w, x, out, bias))
        return out

    def attention(self, ctx, q, k, v, mask, scale: float, decode: bool = False):
        """softmax(scale q K^T + mask) V for a prompt's queries, each computed alone (kq_attention in
        attention.c), or with `decode` a decode step's one query (kq_attention1: T must be 1): q F32
        (D, H, T) with contiguous heads; k, v (D, n_kv, H) F16 or F32 cache views; mask F16 (n_kv, T),
        0 or -inf. An F32 (D, H, T) node, contiguous."""
        ggml = self.ggml
        qc, kc, vc, mc = (t.contents for t in (q, k, v, mask))
        D, H, T, n_kv = qc.ne[0], qc.ne[1], qc.ne[2], kc.ne[1]
        f16 = kc.type == ggml.GGML_TYPE_F16
        ok = (
            qc.type == ggml.GGML_TYPE_F32
            and qc.nb[0] == 4
            and kc.type == vc.type
            and kc.type in (ggml.GGML_TYPE_F16, ggml.GGML_TYPE_F32)
            and (kc.ne[0], kc.ne[2], vc.ne[0], vc.ne[1], vc.ne[2]) == (D, H, D, n_kv, H)
            and mc.type == ggml.GGML_TYPE_F16
            and (mc.ne[0], mc.ne[1]) == (n_kv, T)
            and (T == 1 or not decode)
        )
        if not ok:
            raise RuntimeError("native attention: unexpected operand shapes or types")
        args = KQAttnArgs(D=D, H=H, T=T, n_kv=n_kv, kv_f16=int(f16), scale=scale)
        srcs = (ctypes.POINTER(ggml.ggml_tensor) * 4)(q, k, v, mask)
        user = ctypes.cast(ctypes.pointer(args), ctypes.c_void_p)
        op = _ATTN1_OP if decode else _ATTN_OP
        out = ggml.ggml_custom_4d(ctx, ggml.GGML_TYPE_F32, D, H, T, 1, srcs, 4, op, -1, user)
        self.attn.append((args, q, k, v, mask, out))
        return out

    def bind(self) -> None:
        """Data pointers and row strides, once the graph allocator placed every tensor."""
        for at, q, k, v, m, out in self.attn:
            qc, kc, vc, mc = (t.contents for t in (q, k, v, m))
            at.q, at.k, at.v, at.mask = qc.data, kc.data, vc.data, mc.data
            at.out = out.contents.data
            at.q_nb1, at.q_nb2 = qc.nb[1], qc.nb[2]
            at.k_nb1, at.k_nb2, at.v_nb1, at.v_nb2 = kc.nb[1], kc.nb[2], vc.nb[1], vc.nb[2]
            at.m_nb1 = mc.nb[1]
            if not all((at.q, at.k, at.v, at.mask, at.out)):
                raise RuntimeError("native attention: unallocated operands")
        for mm, w, x, out, bias in self.nodes:
            mm.w, mm.x, mm.out = w.contents.data, x.contents.data, out.contents.data
            mm.bias = bias.contents.data if bias is not None else None
            mm.ldx, mm.ldo = x.contents.nb[1] // 4, out.contents.nb[1] // 4
            unbound = not all((mm.w, mm.x, mm.out)) or (bias is not None and not mm.bias)
            if x.contents.nb[0] != 4 or unbound:
                raise RuntimeError("k-quant matmul: unallocated or non-contiguous operands")

    def check(self) -> None:
        for at, *_ in self.attn:
            if at.status:
                status, at.status = at.status, 0
                if status == -1:
                    raise MemoryError("native attention: out of memory for its work buffers")
                raise RuntimeError(f"native attention failed with status {status}")
        for mm, *_ in self.nodes:
            if mm.status:
                status, mm.status = mm.status, 0
                if status == -1:
                    raise MemoryError("k-quant matmul: out of memory for its work buffers")
                raise RuntimeError(f"k-quant matmul failed with status {status}")
