"""runtime/language/kernels/ on CPUs this machine is not, under qemu-user emulation.

- aarch64: tests/kernels/kquant_harness.c + kquant.c cross-compiled (gcc-aarch64-linux-gnu, static) and run as
  a Cortex-A76 (Raspberry Pi 5: dotprod, so the NEON path) and a Cortex-A72 (Pi 4: no dotprod, so the
  plain path, chosen at run time by the same binary).
- x86-64: this very build (AVX512-VNNI compiled in) imported by Python on an emulated Haswell (no
  AVX-512): it loads, reports the plain path, refuses the fast one and computes the same outputs.

Every path must give the plain path's output bit for bit, on either architecture (kquant.c's header
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

from tinygptv_edge.runtime.language.kernels import ops as kquant

pytestmark = pytest.mark.emulation

_kquant = pytest.importorskip("tinygptv_edge.runtime.language.kernels._native")

ROOT = Path(__file__).resolve().parents[2]
CROSS_CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU_A64 = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
QEMU_X86 = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
APT = "apt-get install gcc-aarch64-linux-gnu qemu-user-static"

# (type, rows, columns, tokens): one token; one 16-token block; pairs of blocks with tails
SHAPES = [("Q4_K", 8, 512, 37), ("Q5_K", 24, 512, 16), ("Q6_K", 8, 768, 1), ("Q6_K", 12, 256, 40),
          ("Q5_K", 4, 256, 33), ("Q4_K", 4, 1024, 20)]  # fmt: skip


def run_path(type_name, raw, n, k, x, path) -> np.ndarray:
    out = np.full((x.shape[0], n), np.nan, np.float32)
    _kquant.matmul(kquant.TYPE_IDS[type_name], raw.ctypes.data, n, k, x.ctypes.data, x.shape[0], k,
                   out.ctypes.data, n, path)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def cases():
    """Inputs with some structure (zeros, one huge value, ties at .5 after scaling) and this machine's
    output for each path it runs."""
    rng = np.random.default_rng(11)
    out = []
    for type_name, n, k, t in SHAPES:
        w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 1.0, k).astype(np.float32)
        x = rng.standard_normal((t, k)).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero 32-block: dx = 0
        if t > 2:
            x[1, 40] = 1e4  # one outlier dominating its block
            x[2, 64:96] = np.arange(32, dtype=np.float32) - 15.5  # codes landing on .5 ties
        raw = quantize(w, type_name)
        ref = {p: run_path(type_name, raw, n, k, x, p) for p in _kquant.SUPPORTED}
        out.append((type_name, n, k, t, raw, x, ref))
    return out


def write_cases(path: Path, cases) -> None:
    with open(path, "wb") as f:
        for type_name, n, k, t, raw, x, _ in cases:
            f.write(np.array([kquant.TYPE_IDS[type_name], n, k, t], "<i4").tobytes())
            f.write(raw.tobytes())
            f.write(np.ascontiguousarray(x, "<f4").tobytes())


@pytest.fixture(scope="module")
def arm_harness(tmp_path_factory) -> Path:
    if not (CROSS_CC and QEMU_A64):
        pytest.skip(f"needs aarch64-linux-gnu-gcc and qemu-aarch64-static ({APT})")
    exe = tmp_path_factory.mktemp("arm") / "kquant_harness"
    src = ROOT / "runtime" / "language" / "kernels"
    c_files = [str(p) for p in sorted(src.glob("*.c")) if p.name != "module.c"]  # all but the Python glue
    cmd = [CROSS_CC, "-O2", "-Wall", "-static", "-I", str(src), str(ROOT / "tests/kernels/kquant_harness.c"),
           *c_files, "-o", str(exe), "-lm"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


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
    got = np.fromfile(tmp_path / "out.bin", "<f4")
    off = 0
    for type_name, n, k, t, _, _, ref in cases:
        plain, active = got[off : off + t * n].reshape(t, n), got[off + t * n : off + 2 * t * n].reshape(t, n)
        off += 2 * t * n
        label = f"{type_name} {n}x{k} t={t} on {cpu}"
        np.testing.assert_array_equal(active, plain, err_msg=f"{expected} vs plain, {label}")
        np.testing.assert_array_equal(plain, ref["plain"], err_msg=f"aarch64 vs x86-64 plain, {label}")
    assert off == got.size


CHILD = """
import json, sys
import numpy as np
from tinygptv_edge.runtime.language.kernels import _native as _kquant, ops as kquant
d = np.load(sys.argv[1])
outs, refused = [], None
for i in range(int(d["count"])):
    tid, n, k, t = (int(v) for v in d[f"head{i}"])
    raw, x = d[f"raw{i}"], d[f"x{i}"]
    out = np.full((t, n), np.nan, np.float32)
    _kquant.matmul(tid, raw.ctypes.data, n, k, x.ctypes.data, t, k, out.ctypes.data, n, kquant.active_path())
    outs.append(out)
try:
    _kquant.matmul(tid, raw.ctypes.data, n, k, x.ctypes.data, t, k, out.ctypes.data, n, "avx512vnni")
except ValueError as e:
    refused = str(e)
np.savez(sys.argv[2], *outs)
print(json.dumps({"path": kquant.active_path(), "available": kquant.available(),
                  "compiled": list(_kquant.COMPILED), "refused": refused}))
"""


def test_x86_build_falls_back_without_avx512(cases, tmp_path):
    if "avx512vnni" not in _kquant.COMPILED:
        pytest.skip(f"this build has no AVX-512 path to fall back from (compiled: {_kquant.COMPILED})")
    if not QEMU_X86:
        pytest.skip(f"needs qemu-x86_64-static ({APT})")
    arrays = {"count": np.array(len(cases))}
    for i, (type_name, n, k, t, raw, x, _) in enumerate(cases):
        arrays |= {f"head{i}": np.array([kquant.TYPE_IDS[type_name], n, k, t]), f"raw{i}": raw, f"x{i}": x}
    np.savez(tmp_path / "in.npz", **arrays)
    proc = subprocess.run(
        [QEMU_X86, "-cpu", "Haswell", sys.executable, "-c", CHILD, str(tmp_path / "in.npz"),
         str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.splitlines()[-1])
    assert info["path"] == "plain" and info["available"] is False and "avx512vnni" in info["compiled"]
    assert info["refused"] and "kernel path" in info["refused"]
    got = np.load(tmp_path / "out.npz")
    for i, (type_name, _, _, t, _, _, ref) in enumerate(cases):
        for path, want in ref.items():  # this machine's plain and (if it has one) AVX-512 outputs
            np.testing.assert_array_equal(got[f"arr_{i}"], want, err_msg=f"{type_name} t={t} vs {path}")
