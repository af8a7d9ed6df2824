"""Inputs for the native kernels' tests (test_kernels.py on this CPU, test_kernel_paths.py under
emulation), and each op called through `_native` with a named path."""

from __future__ import annotations

import ctypes

import numpy as np

from tinygptv_edge.runtime.language.kernels import ops


def fp16_grid() -> np.ndarray:
    """Every finite fp16 value, every midpoint between neighbours (ties of the fp16 rounding) and the
    floats just beside each midpoint, and the GELU's edges."""
    h = np.sort(np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32))
    h = h[np.isfinite(h)]
    mid = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)
    edges = [-10, 10, np.nextafter(-10, 0), np.nextafter(10, 0), np.nan, np.inf, -np.inf]
    edges = np.array(edges, np.float32)
    return np.concatenate([h, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf), edges])


def x8_layout(raw: np.ndarray, n: int, k: int) -> np.ndarray:
    """Q4_0 rows as ggml's x86 repack holds them, 8 rows at a time."""
    rows = raw.reshape(n // 8, -1)
    return np.frombuffer(b"".join(ops.interleave_q4_0x8(r.tobytes(), k) for r in rows), np.uint8)


def matmul(native, type_id: int, raw: np.ndarray, n: int, k: int, x: np.ndarray, path: str) -> np.ndarray:
    """out = x @ dequant(raw).T on one thread through `path`; x rows may have a stride."""
    out = np.full((x.shape[0], n), np.nan, np.float32)
    ldx = x.strides[0] // 4
    native.matmul(type_id, raw.ctypes.data, n, k, x.ctypes.data, x.shape[0], ldx, out.ctypes.data, n, path)
    return out


def epilogue(native, y: np.ndarray, bias: np.ndarray | None, act: int, path: str) -> np.ndarray:
    """y (t x n) + bias, then GELU if act, through `path` (on a copy)."""
    o = np.ascontiguousarray(y, np.float32).copy()
    b = 0 if bias is None else bias.ctypes.data
    native.epilogue(o.ctypes.data, o.shape[1], o.shape[0], o.shape[1], b, act, path)
    return o


def attention_inputs(D: int, kv: str, H: int = 3, T: int = 9, n_kv: int = 256, p0: int = 30) -> dict:
    """Cache-like views: query heads interleaved with key heads (q rows of 2H heads), slots of all heads
    in a row, a causal mask after p0 cached positions over n_kv slots, with spare rows (as the graph
    has)."""
    rng = np.random.default_rng(D)
    dt = np.float16 if kv == "f16" else np.float32
    qk = rng.standard_normal((T, 2 * H, D)).astype(np.float32)
    k, v = (rng.standard_normal((n_kv, H * D)).astype(dt) for _ in range(2))
    mask = np.full((T + 3, n_kv), -np.inf, np.float16)
    for t in range(T):
        mask[t, : p0 + t + 1] = 0
    return {"D": D, "H": H, "T": T, "n_kv": n_kv, "qk": qk, "k": k, "v": v, "mask": mask, "scale": D**-0.5}


def attention_args(a: dict, out: np.ndarray) -> ops.KQAttnArgs:
    D, k, v = a["D"], a["k"], a["v"]
    return ops.KQAttnArgs(
        D=D,
        H=a["H"],
        T=a["T"],
        n_kv=a["n_kv"],
        kv_f16=int(k.dtype == np.float16),
        q=a["qk"].ctypes.data,
        q_nb1=D * 4,
        q_nb2=a["qk"].strides[0],
        k=k.ctypes.data,
        v=v.ctypes.data,
        k_nb1=k.strides[0],
        k_nb2=D * k.itemsize,
        v_nb1=v.strides[0],
        v_nb2=D * v.itemsize,
        mask=a["mask"].ctypes.data,
        m_nb1=a["mask"].strides[0],
        out=out.ctypes.data,
        scale=a["scale"],
    )


def attention(native, a: dict, path: str) -> np.ndarray:
    """The prompt attention of `attention_inputs` on one thread through `path`: (T, H, D)."""
    out = np.full((a["T"], a["H"], a["D"]), np.nan, np.float32)
    args = attention_args(a, out)
    native.attention(ctypes.addressof(args), path)
    return out


def run(native, op: str, params: dict, arrays: dict, path: str) -> np.ndarray:
    """One case of test_kernel_paths.py (op 'matmul', 'epilogue' or 'attention') through `path`."""
    if op == "matmul":
        return matmul(native, params["type_id"], arrays["raw"], params["n"], params["k"], arrays["x"], path)
    if op == "epilogue":
        return epilogue(native, arrays["y"], arrays.get("bias"), params["act"], path)
    return attention(native, {**params, **arrays}, path)
