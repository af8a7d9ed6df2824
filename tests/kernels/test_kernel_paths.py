"""runtime/language/kernels/ on CPUs this machine is not, under qemu-user emulation: every op on
every path. The ops: the matmul of Q4_0 (plain rows, and ggml's x86 8-row repack), Q4_K, Q5_K and
Q6_K; the bias + GELU epilogue; prompt attention.

- aarch64: tests/kernels/harness.c and the folder's .c files (all but module.c, the Python glue)
  cross-compiled (gcc-aarch64-linux-gnu, static) and run as a Cortex-A76 (Raspberry Pi 5: dotprod,
  so the NEON path) and a Cortex-A72 (Pi 4: no dotprod, so the plain path, chosen at run time by the
  same binary). Each op runs on kq_plain and on the dispatch table the CPU filled.
- x86-64: this very build (AVX512-VNNI compiled in) imported by Python on an emulated Haswell (no
  AVX-512): it loads, reports the plain path, refuses the fast one for every op and computes the same
  outputs.

Every path must give the plain path's output bit for bit, and aarch64's plain path x86-64's (native.h
says why they can). Needs `apt-get install gcc-aarch64-linux-gnu qemu-user-static` (`.ci/run` does);
skipped with that message where absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.decoder_gguf import quantize
from kernel_cases import attention_inputs, fp16_grid, run, x8_layout

from tinygptv_edge.runtime.language.kernels import ops

_native = pytest.importorskip("tinygptv_edge.runtime.language.kernels._native")
pytestmark = pytest.mark.emulation

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "runtime" / "language" / "kernels"
CROSS_CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU_A64 = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
QEMU_X86 = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
APT = "apt-get install gcc-aarch64-linux-gnu qemu-user-static"
OPS = ("matmul", "epilogue", "attention")  # harness.c's op numbers 0, 1, 2

# (type, rows, columns, tokens): one token; one 16-token block; pairs of blocks with tails. Q4_0_X8:
# ggml's 8-row repack (its own AVX-512 kernel: 16-row stripes, one and a half or three; passes of up to
# 8 tokens)
MATMUL = [("Q4_K", 8, 512, 37), ("Q5_K", 24, 512, 16), ("Q6_K", 8, 768, 1), ("Q6_K", 12, 256, 40),
          ("Q5_K", 4, 256, 33), ("Q4_K", 4, 1024, 20), ("Q4_0", 24, 320, 22), ("Q4_0", 8, 512, 1),
          ("Q4_0_X8", 24, 320, 22), ("Q4_0_X8", 48, 320, 9), ("Q4_0_X8", 8, 256, 1),
          ("Q4_0_X8", 48, 320, 37)]  # fmt: skip
EPILOGUE = [(0, True), (1, True), (1, False)]  # (act: 1 GELU, with a bias)
ATTENTION = [(80, "f16"), (80, "f32"), (20, "f16"), (20, "f32")]  # Phi-2's head; a masked AVX-512 tail


def type_id(type_name: str) -> int:
    return _native.Q4_0_X8 if type_name == "Q4_0_X8" else ops.TYPE_IDS[type_name]


def build_cases() -> list[dict]:
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
        params = {"type_id": type_id(type_name), "n": n, "k": k}
        header = [0, type_id(type_name), n, k, t]
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
    for c in cases:
        c["ref"] = {p: run(_native, c["op"], c["params"], c["arrays"], p) for p in _native.SUPPORTED}
    return cases


@pytest.fixture(scope="module")
def cases():
    return build_cases()


def write_cases(path: Path, cases) -> None:
    """harness.c's input: per case 8 int32 and its inputs, in the order harness.c reads them."""
    with open(path, "wb") as f:
        for c in cases:
            f.write(np.array(c["header"] + [0] * (8 - len(c["header"])), "<i4").tobytes())
            a = c["arrays"]
            if c["op"] == "attention":
                f.write(np.float32(c["params"]["scale"]).tobytes())
                parts = [a["qk"], a["k"], a["v"], a["mask"]]
            elif c["op"] == "matmul":
                parts = [a["raw"], a["x"]]
            else:
                parts = [a["y"], a["bias"]] if "bias" in a else [a["y"]]
            for p in parts:
                f.write(np.ascontiguousarray(p).tobytes())


@pytest.fixture(scope="module")
def arm_harness(tmp_path_factory) -> Path:
    if not (CROSS_CC and QEMU_A64):
        pytest.skip(f"needs aarch64-linux-gnu-gcc and qemu-aarch64-static ({APT})")
    exe = tmp_path_factory.mktemp("arm") / "harness"
    c_files = [str(p) for p in sorted(KERNELS.glob("*.c")) if p.name != "module.c"]  # all but the Python glue
    cmd = [CROSS_CC, "-O2", "-Wall", "-Werror", "-static", "-I", str(KERNELS),
           str(ROOT / "tests/kernels/harness.c"), *c_files, "-o", str(exe), "-lm"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def test_the_harness_links_every_kernel_file_pyproject_builds():
    """harness.c runs what the module runs: pyproject's sources are the folder's .c files."""
    import tomllib

    ext = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["ext-modules"][0]
    assert sorted(ext["sources"]) == sorted(str(p.relative_to(ROOT)) for p in KERNELS.glob("*.c"))


@pytest.mark.parametrize(("cpu", "expected"), [("cortex-a76", "neon-dotprod"), ("cortex-a72", "plain")])
def test_aarch64_paths_match_plain_bit_for_bit(arm_harness, cases, tmp_path, cpu, expected):
    write_cases(tmp_path / "in.bin", cases)
    proc = subprocess.run(
        [QEMU_A64, "-cpu", cpu, str(arm_harness), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = dict(line.split("=", 1) for line in proc.stdout.split())
    assert info["path"] == expected and info["cases"] == str(len(cases)), proc.stdout
    assert info["compiled"].split(",") == ["plain", "neon-dotprod"]
    for op in OPS:  # every op ran
        assert info[op] == str(sum(c["op"] == op for c in cases)) != "0", (op, proc.stdout)
    got = np.fromfile(tmp_path / "out.bin", "<f4")
    off = 0
    for c in cases:
        want = c["ref"]["plain"]
        plain = got[off : off + want.size].reshape(want.shape)
        active = got[off + want.size : off + 2 * want.size].reshape(want.shape)
        off += 2 * want.size
        label = f"{c['label']} on {cpu}"
        np.testing.assert_array_equal(active, plain, err_msg=f"{expected} vs plain, {label}")
        np.testing.assert_array_equal(plain, want, err_msg=f"aarch64 vs x86-64 plain, {label}")
    assert off == got.size


CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[3])
from kernel_cases import run
from tinygptv_edge.runtime.language.kernels import _native, ops
d = np.load(sys.argv[1])
meta = json.loads(str(d["meta"]))
outs, refused = [], {}
path = ops.active_path()
for i, (op, params, names) in enumerate(meta):
    arrays = {name: d[f"{i}_{name}"] for name in names}
    outs.append(run(_native, op, params, arrays, path))
    if op not in refused:
        try:
            run(_native, op, params, arrays, "avx512vnni")
            refused[op] = None
        except ValueError as e:
            refused[op] = str(e)
np.savez(sys.argv[2], *outs)
print(json.dumps({"path": path, "available": ops.available(), "compiled": list(_native.COMPILED),
                  "refused": refused}))
"""


def test_x86_build_falls_back_without_avx512(cases, tmp_path):
    if "avx512vnni" not in _native.COMPILED:
        pytest.skip(f"this build has no AVX-512 path to fall back from (compiled: {_native.COMPILED})")
    if not QEMU_X86:
        pytest.skip(f"needs qemu-x86_64-static ({APT})")
    meta = [(c["op"], c["params"], list(c["arrays"])) for c in cases]
    arrays = {f"{i}_{name}": v for i, c in enumerate(cases) for name, v in c["arrays"].items()}
    np.savez(tmp_path / "in.npz", meta=np.array(json.dumps(meta)), **arrays)
    proc = subprocess.run(
        [QEMU_X86, "-cpu", "Haswell", sys.executable, "-c", CHILD, str(tmp_path / "in.npz"),
         str(tmp_path / "out.npz"), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.splitlines()[-1])
    assert info["path"] == "plain" and info["available"] is False and "avx512vnni" in info["compiled"]
    assert set(info["refused"]) == set(OPS)
    assert info["refused"]["matmul"] and "kernel path" in info["refused"]["matmul"]
    for op in ("epilogue", "attention"):
        assert info["refused"][op] and "unknown path 'avx512vnni'" in info["refused"][op]
    got = np.load(tmp_path / "out.npz")
    for i, c in enumerate(cases):
        for path, want in c["ref"].items():  # this machine's plain and (if it has one) AVX-512 outputs
            np.testing.assert_array_equal(got[f"arr_{i}"], want, err_msg=f"{c['label']} vs {path}")
