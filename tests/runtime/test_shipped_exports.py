"""The runtime on the committed exports of the shipped model (tests/data, `make test-data`) against the
PyTorch reference's goldens. Torch-free: the same checks run on x86 and on (emulated) aarch64.

Tolerances. The reference runs F32 everywhere; the runtime's kernels differ by CPU:
- vision FP32: onnxruntime's MLAS SGEMM (AVX2/AVX-512 on x86, NEON on aarch64) vs torch's: float
  rounding only (x86: cosine 1 - 1e-12, max diff 2e-6 of the largest value).
- vision INT8: QDQ graphs. x86-vnni (u8 activations x s8 weights, VNNI on x86) and arm (s8 x s8,
  symmetric; the sdot kernels on aarch64): the exporter's bar, cosine >= 0.99 per image vs the
  reference (x86: 0.9996 at worst for both).
- language: ggml's dot products quantize activations to Q8_0 / Q8_K; on aarch64 with dotprod the Q4_0
  weights are repacked (q4_0_4x4) and run other kernels. LOGIT_TOL is max |diff| over the reference's
  logit range, about twice the largest value measured (Q8_0 0.004, Q4_0 0.024, Q4_K_M 0.024; the
  small levels on x86, 2026-12-07: Q3_K_S 0.057, Q2_K 0.135, IQ4_XS 0.020).
- greedy answers: identical to the reference's for every question, at every level.
"""

from __future__ import annotations

import hashlib

import pytest
from helpers import shipped_data as S

pytest.importorskip("tinygptv_edge.runtime.language.decoder")

LOGIT_TOL = {"Q8_0": 0.01, "Q4_0": 0.06, "Q4_K_M": 0.07, "Q3_K_S": 0.12, "Q2_K": 0.27, "IQ4_XS": 0.05}
INT8_MIN_COSINE = 0.99


def test_committed_files_are_intact():
    assert S.check_files() == []


def test_goldens_match_the_shipped_model():
    """tests/data lags behind export/default_model/ until `make test-data` runs again."""
    from tinygptv_edge.export.checkpoints.default import default_model_dir

    weights = default_model_dir() / "model.safetensors"
    if not weights.is_file():
        pytest.skip(f"no shipped model at {weights}")
    got = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert got == S.manifest()["model_sha256"], "the shipped model changed: run `make test-data`"


def test_fp32_vision_matches_the_reference():
    r = S.vision("vision.fp32.onnx")
    print(f"vision.fp32.onnx vs reference: {r}")
    assert r["images"] >= 16
    assert r["min_row_cosine"] >= 0.99999 and r["max_rel_diff"] <= 1e-4, r


@pytest.mark.parametrize("name", ["vision.int8.onnx", "vision.int8-arm.onnx"])
def test_int8_vision_within_cosine_of_the_reference(name):
    """Held-out images (test split: neither trained on nor calibrated on)."""
    r = S.vision(name)
    print(f"{name} vs reference ({S.cpu_features()['machine']}): {r}")
    assert r["min_cosine"] >= INT8_MIN_COSINE, r


@pytest.mark.parametrize("level", S.GGUF_LEVELS)
def test_last_logits_within_tolerance(level):
    r = S.logits(level)
    print(f"{level} vs reference: {r}")
    assert r["prompt_lengths_match"], "the runtime's prompt layout differs from the reference's"
    assert r["top1_agree"] == 1.0, r
    assert r["max_rel_diff"] <= LOGIT_TOL[level], r


@pytest.mark.parametrize(("vision", "level"), S.ANSWER_PAIRS, ids=[f"{v}+{lvl}" for v, lvl in S.ANSWER_PAIRS])
def test_greedy_answers_equal_the_reference(vision, level):
    r = S.answers(vision, level)
    assert r["total"] == len(S.manifest()["questions"]) >= 13
    assert r["wrong"] == [], r["wrong"]


def test_demo_check_rejects_another_answer(tmp_path, capsys):
    """The CI's demo check (shipped_data --check-demo) accepts the golden answer only."""
    import json

    run = tmp_path / "run.json"
    run.write_text(json.dumps({"answer": S.demo()["answer"]}) + "\n")
    assert S.main(["--check-demo", str(run)]) == 0
    run.write_text(json.dumps({"answer": S.demo()["answer"] + "x"}) + "\n")
    assert S.main(["--check-demo", str(run)]) == 1
    assert "DIFFERENT" in capsys.readouterr().out
