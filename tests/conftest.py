"""Shared fixtures: one tiny random TinyGPT-V, synthesized in the official formats and loaded once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@dataclass
class Tiny:
    synth: object  # export.synth.SynthResult (with kept tensors)
    model: object  # export.model.tinygptv.TinyGPTV, LoRA merged
    tokenizer: object  # runtime.tokenizer.Tokenizer
    cfg: object  # runtime.config.TinyGPTVConfig


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    from tinygptv_edge.export.loaders import load_tinygptv
    from tinygptv_edge.export.synth import synth_preset, synthesize
    from tinygptv_edge.runtime.tokenizer import Tokenizer

    cfg, dtype = synth_preset("tiny")
    out = tmp_path_factory.mktemp("tiny")
    res = synthesize(out, cfg, seed=0, dtype=dtype, keep=True)
    model, _ = load_tinygptv(phi2=res.phi2, eva=res.eva, blip2=res.blip2, stage=res.stage, cfg=cfg)
    return Tiny(res, model, Tokenizer.from_file(res.phi2), cfg)


@pytest.fixture(scope="session")
def tiny_single(tiny, tmp_path_factory) -> Path:
    """The tiny model written as the project's single checkpoint folder."""
    from tinygptv_edge.export.single import save_single

    return save_single(tiny.model, tiny.synth.phi2, tmp_path_factory.mktemp("single") / "model")
