"""bench/vision.py's floor inputs: the FLOP count of the tower and the GEMM peak micro-graphs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "vision.py"
    spec = importlib.util.spec_from_file_location("bench_vision", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("size", ["tiny"])
def test_flop_count_matches_torch_flop_counter(bench, size):
    from torch.utils.flop_counter import FlopCounterMode

    model, cfg = bench._tower(size, 0)
    x = torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    with FlopCounterMode(display=False) as counter:
        model.vision(x)
    assert bench.vision_flops(cfg) == counter.get_total_flops()


def test_full_size_flops_are_the_issue_s_figures(bench):
    # ~0.5 TFLOP per 224 px image, ~2 TFLOP at stage 4's 448 px (issue #17)
    assert 0.5e12 < bench.vision_flops(bench._config("full")) < 0.56e12
    assert 2.2e12 < bench.vision_flops(bench._config("full448")) < 2.4e12


def test_gemm_micro_graphs_compute_the_product(bench, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(bench, "GEMM_SHAPE", (8, 16, 4))
    rng = np.random.default_rng(0)
    from onnx import load_from_string, numpy_helper

    for kind in ("int8", "fp32"):
        blob = bench._gemm_graph(kind)
        w = numpy_helper.to_array(load_from_string(blob).graph.initializer[0]).astype(np.int64)
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        if kind == "int8":
            x = rng.integers(0, 256, (8, 16), dtype=np.uint8)
            np.testing.assert_array_equal(sess.run(None, {"x": x})[0], (x.astype(np.int64) - 128) @ w)
        else:
            x = rng.standard_normal((8, 16)).astype(np.float32)
            w = numpy_helper.to_array(load_from_string(blob).graph.initializer[0])
            np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-5)
    peaks = bench._gemm_peaks(1, 3)
    assert peaks["int8"] > 0 and peaks["fp32"] > 0
