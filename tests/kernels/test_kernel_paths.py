"""runtime/language/kernels/ on CPUs this machine is not, under qemu-user emulation: every op on
every path. The ops: the matmul of Q4_0 (plain rows, and ggml's x86 8-row repack), Q4_K, Q5_K and
Q6_K; the bias + GELU epilogue; prompt attention; decode (one-query) attention.

- aarch64: tests/kernels/harness.c and the folder's .c files (all but module.c, the Python glue)
  cross-compiled (gcc-aarch64-linux-gnu, static) and run as a Cortex-A76 (Raspberry Pi 5: dotprod,
  so the NEON path) and a Cortex-A72 (Pi 4: no dotprod, so the plain path, chosen at run time by the
  same binary). Each op runs on kq_plain and on the dispatch table the CPU filled, the latter also
  split over 3 threads as ggml runs the custom ops.
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
from kernel_cases import KERNELS, OPS, ROOT, build_cases, compile_harness, harness_outputs, write_cases

_native = pytest.importorskip("tinygptv_edge.runtime.language.kernels._native")
pytestmark = pytest.mark.emulation

CROSS_CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU_A64 = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
QEMU_X86 = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
APT = "apt-get install gcc-aarch64-linux-gnu qemu-user-static"


@pytest.fixture(scope="module")
def cases():
    return build_cases(_native)


@pytest.fixture(scope="module")
def arm_harness(tmp_path_factory) -> Path:
    if not (CROSS_CC and QEMU_A64):
        pytest.skip(f"needs aarch64-linux-gnu-gcc and qemu-aarch64-static ({APT})")
    return compile_harness(CROSS_CC, tmp_path_factory.mktemp("arm") / "harness", "-static")


def test_the_harness_links_every_kernel_file_pyproject_builds():
    """harness.c runs what the module runs: pyproject's sources are the folder's .c files."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
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
    for c, (plain, active, threads) in zip(cases, harness_outputs(tmp_path / "out.bin", cases), strict=True):
        label = f"{c['label']} on {cpu}"
        np.testing.assert_array_equal(active, plain, err_msg=f"{expected} vs plain, {label}")
        np.testing.assert_array_equal(plain, c["ref"]["plain"], err_msg=f"aarch64 vs x86-64 plain, {label}")
        np.testing.assert_array_equal(threads, active, err_msg=f"the op on 3 threads vs 1, {label}")


CHILD = """
import json, sys
import numpy as np
sys.path[:0] = [sys.argv[3], sys.argv[3] + '/..']  # tests/kernels (kernel_cases), tests (helpers)
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
