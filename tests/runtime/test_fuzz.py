"""Fuzzing (hypothesis): mutated GGUF, ONNX-metadata, config and image bytes end in a typed error or a
valid result, within a fixed example budget, a per-example deadline, a 1 GiB address-space cap and a
timeout per target (tests/helpers/fuzz_worker.py runs each target in its own capped process)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz

pytest.importorskip("hypothesis")
pytest.importorskip("tinygptv_edge.runtime.language.decoder")

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "fuzz_worker.py"
ROOT = WORKER.parents[2]
MEMORY = 1 << 30  # RLIMIT_AS: address space, so it also bounds what a hostile input could allocate
EXAMPLES = {"gguf": 120, "onnx-meta": 60, "config": 200, "image": 200}


@pytest.fixture(scope="module")
def seeds(tiny, tmp_path_factory):
    from tinygptv_edge.export.gguf.export import export_gguf
    from tinygptv_edge.export.onnx.export import export_vision

    out = tmp_path_factory.mktemp("fuzz")
    gguf = export_gguf(tiny.model, tiny.tokenizer, out / "language.q8_0.gguf", "Q8_0").path
    onnx = export_vision(tiny.model, out).path
    config = out / "config.json"
    tiny.cfg.save(config)
    return {"gguf": gguf, "onnx-meta": onnx, "config": config, "image": config}


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


@pytest.mark.parametrize("target", sorted(EXAMPLES))
def test_fuzz(seeds, target):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    res = subprocess.run(
        [sys.executable, str(WORKER), target, str(seeds[target]), str(EXAMPLES[target])],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_cap,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 0, f"{target}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    line = res.stdout.strip().splitlines()[-1]
    counts = dict(kv.split("=") for kv in line.split())
    print(target, counts, res.stderr[-3000:])
    assert int(counts["typed"]) + int(counts["accepted"]) >= EXAMPLES[target] // 2
    assert int(counts["typed"]) > 0  # the mutations do reach the checks
