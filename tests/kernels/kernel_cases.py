"""Inputs for the native kernels' tests (test_kernels.py on this CPU, test_kernel_paths.py under
emulation), each op called through `_native` with a named path, and tests/kernels/harness.c's cases:
every op, written for the harness, with this machine's outputs to hold its outputs to."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from helpers.decoder_gguf import quantize

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


def attention(native, a: dict, path: str, decode: bool = False) -> np.ndarray:
    """The prompt attention of `attention_inputs` (or with `decode` the decode step's, T = 1) on one
    thread through `path`: (T, H, D)."""
    out = np.full((a["T"], a["H"], a["D"]), np.nan, np.float32)
    args = attention_args(a, out)
    (native.attention1 if decode else native.attention)(ctypes.addressof(args), path)
    return out


def run(native, op: str, params: dict, arrays: dict, path: str) -> np.ndarray:
    """One case of test_kernel_paths.py (op 'matmul', 'epilogue', 'attention', 'attention1') through
    `path`."""
    if op == "matmul":
        return matmul(native, params["type_id"], arrays["raw"], params["n"], params["k"], arrays["x"], path)
    if op == "epilogue":
        return epilogue(native, arrays["y"], arrays.get("bias"), params["act"], path)
    return attention(native, {**params, **arrays}, path, decode=op == "attention1")


# ---- harness.c's cases -------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "runtime" / "language" / "kernels"
OPS = ("matmul", "epilogue", "attention", "attention1")  # harness.c's op numbers 0, 1, 2, 3

# (type, rows, columns, tokens): one token; one 16-token block; pairs of blocks with tails. Q4_0_X8:
# ggml's 8-row repack (its own AVX-512 kernel: 16-row stripes, one and a half or three; passes of up to
# 8 tokens)
MATMUL = [("Q4_K", 8, 512, 37), ("Q5_K", 24, 512, 16), ("Q6_K", 8, 768, 1), ("Q6_K", 12, 256, 40),
          ("Q5_K", 4, 256, 33), ("Q4_K", 4, 1024, 20), ("Q4_0", 24, 320, 22), ("Q4_0", 8, 512, 1),
          ("Q4_0_X8", 24, 320, 22), ("Q4_0_X8", 48, 320, 9), ("Q4_0_X8", 8, 256, 1),
          ("Q4_0_X8", 48, 320, 37)]  # fmt: skip
EPILOGUE = [(0, True), (1, True), (1, False)]  # (act: 1 GELU, with a bias)
ATTENTION = [(80, "f16"), (80, "f32"), (20, "f16"), (20, "f32")]  # Phi-2's head; a masked AVX-512 tail
# decode attention (one query): (D, kv, n_kv, cached positions p0; the query sees p0 + 1 slots):
# 16-slot tails of 5 and 0, a head with a masked tail, a long context
ATTENTION1 = [(80, "f16", 256, 100), (80, "f32", 256, 100), (20, "f16", 256, 47), (20, "f32", 128, 15),
              (80, "f16", 1536, 1499)]  # fmt: skip


def kernel_type(native, type_name: str) -> int:
    """The kernel's type id: the ggml type, or Q4_0_X8 for ggml's x86 Q4_0 repack."""
    return native.Q4_0_X8 if type_name == "Q4_0_X8" else ops.TYPE_IDS[type_name]


def build_cases(native) -> list[dict]:
    """Inputs with some structure (zeros, one huge value, ties at .5 after scaling; every fp16 value and
    rounding tie for the GELU) as {op, label, params, arrays, header, ref}: ref is this machine's output
    on each path it runs."""
    rng = np.random.default_rng(11)
    cases = []
    for type_name, n, k, t in MATMUL:
        w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 1.0, k).astype(np.float32)
        x = rng.standard_normal((t, k)).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero 32-block: dx = 0
        if t > 2:
            x[1, 40] = 1e4  # one outlier dominating its block
            x[2, 64:96] = np.arange(32, dtype=np.float32) - 15.5  # codes landing on .5 ties
        raw = quantize(w, "Q4_0" if type_name == "Q4_0_X8" else type_name)
        if type_name == "Q4_0_X8":
            raw = x8_layout(raw, n, k)
        params = {"type_id": kernel_type(native, type_name), "n": n, "k": k}
        header = [0, kernel_type(native, type_name), n, k, t]
        arrays = {"raw": raw, "x": x}
        cases.append({"op": "matmul", "label": f"{type_name} {n}x{k} t={t}", "params": params,
                      "arrays": arrays, "header": header})  # fmt: skip
    grid = fp16_grid()
    n = 16 * 5 + 3  # a masked tail on AVX-512
    y = np.resize(grid, (-(-len(grid) // n) * n,)).reshape(-1, n)
    bias = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    for act, with_bias in EPILOGUE:
        arrays = {"y": y, "bias": bias} if with_bias else {"y": y}
        header = [1, y.shape[0], n, act, int(with_bias)]
        cases.append({"op": "epilogue", "label": f"epilogue act={act} bias={with_bias}",
                      "params": {"act": act}, "arrays": arrays, "header": header})  # fmt: skip
    for D, kv in ATTENTION:
        a = attention_inputs(D, kv)
        params = {key: a[key] for key in ("D", "H", "T", "n_kv", "scale")}
        arrays = {key: a[key] for key in ("qk", "k", "v", "mask")}
        header = [2, D, a["H"], a["T"], a["n_kv"], int(kv == "f16"), a["qk"].shape[1], a["mask"].shape[0]]
        cases.append({"op": "attention", "label": f"attention D={D} {kv}", "params": params, "arrays": arrays,
                      "header": header})  # fmt: skip
    for D, kv, n_kv, p0 in ATTENTION1:
        a = attention_inputs(D, kv, H=4, T=1, n_kv=n_kv, p0=p0)
        params = {key: a[key] for key in ("D", "H", "T", "n_kv", "scale")}
        arrays = {key: a[key] for key in ("qk", "k", "v", "mask")}
        header = [3, D, a["H"], 1, n_kv, int(kv == "f16"), a["qk"].shape[1], a["mask"].shape[0]]
        cases.append({"op": "attention1", "label": f"decode attention D={D} {kv} {p0 + 1} slots",
                      "params": params, "arrays": arrays, "header": header})  # fmt: skip
    for c in cases:
        c["ref"] = {p: run(native, c["op"], c["params"], c["arrays"], p) for p in native.SUPPORTED}
    return cases


def write_cases(path: Path, cases) -> None:
    """harness.c's input: per case 8 int32 and its inputs, in the order harness.c reads them."""
    with open(path, "wb") as f:
        for c in cases:
            f.write(np.array(c["header"] + [0] * (8 - len(c["header"])), "<i4").tobytes())
            a = c["arrays"]
            if c["op"] in ("attention", "attention1"):
                f.write(np.float32(c["params"]["scale"]).tobytes())
                parts = [a["qk"], a["k"], a["v"], a["mask"]]
            elif c["op"] == "matmul":
                parts = [a["raw"], a["x"]]
            else:
                parts = [a["y"], a["bias"]] if "bias" in a else [a["y"]]
            for p in parts:
                f.write(np.ascontiguousarray(p).tobytes())


def compile_harness(cc: str, exe: Path, *flags: str) -> Path:
    """harness.c linked with the folder's .c files, all but module.c (the Python glue)."""
    import subprocess

    c_files = [str(p) for p in sorted(KERNELS.glob("*.c")) if p.name != "module.c"]
    cmd = [cc, "-O2", "-Wall", "-Werror", *flags, "-I", str(KERNELS), str(ROOT / "tests/kernels/harness.c"),
           *c_files, "-o", str(exe), "-lm"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def harness_outputs(out: Path, cases) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """harness.c's OUT: per case (plain, detected path, detected path on threads as ggml runs it)."""
    got = np.fromfile(out, "<f4")
    res, off = [], 0
    for c in cases:
        shape = c["ref"]["plain"].shape
        size = c["ref"]["plain"].size
        res.append(tuple(got[off + i * size : off + (i + 1) * size].reshape(shape) for i in range(3)))
        off += 3 * size
    assert off == got.size, (off, got.size)
    return res
