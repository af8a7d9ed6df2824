"""Shared fixtures: one tiny random TinyGPT-V, synthesized in the official formats and loaded once.

Torch-free at import: the torch tier's fixtures import torch (and the export toolchain) when first
used and skip their tests where it is missing, so the runtime's tests run with `pip install .` alone
(the torch-free tier; tests/helpers/shipped_data.py holds its exports of the shipped model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

MEASURE_OUT = (
    "TINYGPTV_MEASURE_OUT"  # .ci/aarch64.sh: write tests/helpers/shipped_data.py's measurements here
)


def pytest_sessionfinish(session, exitstatus):
    """With $TINYGPTV_MEASURE_OUT set, write the measurements on the committed exports (the same ones
    tests/runtime/test_shipped_exports.py asserts on, computed once and cached in shipped_data) as JSON."""
    out = os.environ.get(MEASURE_OUT)
    if out:
        import json

        from helpers import shipped_data

        Path(out).write_text(json.dumps(shipped_data.measure(), indent=1) + "\n")


# The test tiers, selectable with `pytest -m` (markers registered in pyproject.toml):
#   torch      needs the export extra (torch, onnx, gguf, transformers): marked by module, or here for every
#              test that uses a fixture built by the exporters
#   slow       full-size or long end-to-end checks (deselected by default; `make test-slow`)
#   emulation  runs code under qemu-user (tests/kernels/)
#   fuzz       hypothesis-driven fuzzing in capped subprocesses
EXPORTED_FIXTURES = {"tiny", "tiny_single", "wide"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if EXPORTED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.torch)


def need_torch():
    """torch, or skip the calling test (the export extra is not installed)."""
    return pytest.importorskip("torch", reason="the export extra (torch) is not installed")


@dataclass
class Tiny:
    synth: object  # export.synth.SynthResult (with kept tensors)
    model: object  # export.model.tinygptv.TinyGPTV, LoRA merged
    tokenizer: object  # runtime.tokenizer.Tokenizer
    cfg: object  # runtime.config.TinyGPTVConfig


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    need_torch()
    from tinygptv_edge.export.checkpoints.loaders import load_tinygptv
    from tinygptv_edge.export.checkpoints.synth import synth_preset, synthesize
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    cfg, dtype = synth_preset("tiny")
    out = tmp_path_factory.mktemp("tiny")
    res = synthesize(out, cfg, seed=0, dtype=dtype, keep=True)
    model, _ = load_tinygptv(phi2=res.phi2, eva=res.eva, blip2=res.blip2, stage=res.stage, cfg=cfg)
    return Tiny(res, model, Tokenizer.from_file(res.phi2), cfg)


@pytest.fixture(scope="session")
def tiny_single(tiny, tmp_path_factory) -> Path:
    """The tiny model written as the project's single checkpoint folder."""
    from tinygptv_edge.export.checkpoints.single import save_single

    return save_single(tiny.model, tiny.synth.phi2, tmp_path_factory.mktemp("single") / "model")


# in tests/helpers/wide.py (a test module importing them from `conftest` may get tests/serve/'s)
from helpers.wide import WIDE_LEVELS, wide_source  # noqa: E402


@pytest.fixture(scope="session")
def wide(tiny, tmp_path_factory):
    """`wide_source` exported at WIDE_LEVELS (Q4_K_M as llama.cpp's mix: Q5_K attn_qkv, Q6_K in half
    the ffn_down)."""
    from tinygptv_edge.export.gguf.export import export_source

    model, src = wide_source(tiny, seed=0)
    out = tmp_path_factory.mktemp("wide")
    files = {t: export_source(src, out / f"wide.{t}.gguf", t, pure=t != "Q4_K_M").path for t in WIDE_LEVELS}
    return model, files
