"""INT8 of the vision graph: calibration images, presets, each calibration method, diagnostics, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from helpers.images import write_images  # noqa: E402

from tinygptv_edge.export.onnx import calib_data as R  # noqa: E402
from tinygptv_edge.export.onnx import quant as Q  # noqa: E402
from tinygptv_edge.export.onnx.export import export_vision, read_metadata  # noqa: E402
from tinygptv_edge.export.onnx.presets import PRESETS, QuantPreset, get_preset  # noqa: E402
from tinygptv_edge.runtime.contract import ONNX_META, VISION_FILE_INT8  # noqa: E402
from tinygptv_edge.runtime.errors import (  # noqa: E402
    CalibrationError,
    ConfigError,
    ImageError,
    OutputPathError,
    QuantizationError,
)


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory):
    return export_vision(tiny.model, tmp_path_factory.mktemp("q")).path


@pytest.fixture(scope="module")
def pixels(tiny, tmp_path_factory):
    folder = write_images(tmp_path_factory.mktemp("calib"), 6)
    return R.load_folder(folder, tiny.cfg.preprocess)


def _dq_fed(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """op type -> names of nodes reading an activation through DequantizeLinear."""
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    out: dict[str, list[str]] = {}
    for n in graph.node:
        if any(i in dq for i in n.input):
            out.setdefault(n.op_type, []).append(n.name)
    return out


# -- calibration reader -----------------------------------------------------------------------


def test_reader_uses_the_shared_preprocessing(tiny, tmp_path):
    from PIL import Image

    from tinygptv_edge.runtime.vision.preprocess import preprocess

    folder = write_images(tmp_path / "imgs", 3)
    x = R.load_folder(folder, tiny.cfg.preprocess)
    S = tiny.cfg.vision.image_size
    assert x.shape == (3, 3, S, S) and x.dtype == np.float32
    with Image.open(folder / "img01.png") as im:
        np.testing.assert_array_equal(x[1], preprocess(im, tiny.cfg.preprocess))
    reader = R.ArrayReader(R.load_folder(folder, tiny.cfg.preprocess, max_images=2), S)
    feeds = list(reader)
    assert len(feeds) == 2 and feeds[0]["pixel_values"].shape == (1, 3, S, S)
    reader.rewind()
    assert len(list(reader)) == 2


def test_reader_bad_inputs(tiny, tmp_path):
    cfg = tiny.cfg.preprocess
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("x")
    with pytest.raises(CalibrationError, match="at least one image"):
        R.load_folder(tmp_path / "empty", cfg)
    with pytest.raises(CalibrationError, match="expected a folder"):
        R.load_folder(tmp_path / "missing", cfg)

    folder = write_images(tmp_path / "text", 2)
    (folder / "notes.txt").write_text("these are not pixels")
    with pytest.raises(ImageError, match=r"notes\.txt: expected an image"):
        R.load_folder(folder, cfg, max_images=1)  # checked even past max_images

    folder = write_images(tmp_path / "cut", 2)
    data = (folder / "img01.png").read_bytes()
    (folder / "img01.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"img01\.png: expected a complete image"):
        R.load_folder(folder, cfg)


def test_array_reader_refuses_non_finite_and_bad_shapes(tiny):
    S = tiny.cfg.vision.image_size
    x = np.zeros((2, 3, S, S), np.float32)
    x[1, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="1 NaN/inf"):
        R.ArrayReader(x, S)
    with pytest.raises(CalibrationError, match=r"expected pixels of shape \(N, 3"):
        R.ArrayReader(np.zeros((2, 3, S + 1, S), np.float32), S)
    with pytest.raises(CalibrationError, match="float"):
        R.ArrayReader(np.zeros((1, 3, S, S), np.int64), S)


# -- presets ----------------------------------------------------------------------------------


def test_presets():
    assert (PRESETS["x86-vnni"].activation_type, PRESETS["x86-vnni"].weight_type) == ("uint8", "int8")
    assert (PRESETS["arm"].activation_type, PRESETS["arm"].weight_type) == ("int8", "int8")
    assert PRESETS["x86-avx2"].reduce_range and not PRESETS["x86-vnni"].reduce_range
    assert get_preset("arm", method="entropy").method == "entropy"
    for bad in ({"method": "kl"}, {"op_types": ("Softmax",)}, {"fallback_k": -1}, {"min_cosine": 1.5}):
        with pytest.raises(ConfigError):
            QuantPreset(**bad)
    with pytest.raises(ConfigError, match="x86-vnni"):
        get_preset("riscv")


# -- static INT8 -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "distribution"])
def test_static_int8_each_method(fp32, pixels, tmp_path, method):
    res = Q.quantize_vision(fp32, pixels, get_preset("x86-vnni", method=method), tmp_path / VISION_FILE_INT8)
    assert res.path.is_file() and res.cosine >= 0.99
    g = onnx.load(str(res.path))
    fed = _dq_fed(g.graph)
    # every MatMul and the patch Conv run on quantized inputs; LayerNorm, Softmax and GELU (Erf) do not
    assert len(fed["MatMul"]) == sum(n.op_type == "MatMul" for n in g.graph.node) and "Conv" in fed
    # (the graph is fused first: GELU is BiasGelu, most LayerNorms are SkipLayerNormalization)
    for op in ("LayerNormalization", "Softmax", "BiasGelu"):
        assert op not in fed and any(n.op_type == op for n in g.graph.node)
    zp = {n.input[2] for n in g.graph.node if n.op_type == "QuantizeLinear"}
    dtypes = {t.data_type for t in g.graph.initializer if t.name in zp}
    assert dtypes == {onnx.TensorProto.UINT8}  # U8 activations on x86
    meta = read_metadata(g)
    assert meta[ONNX_META["image_size"]] == read_metadata(onnx.load(str(fp32)))[ONNX_META["image_size"]]
    info = json.loads(meta[Q.QUANT_META_KEY])
    assert info["preset"]["method"] == method and info["kind"] == "static"


def test_arm_preset_exclusions_and_diagnostics_with_fallback(fp32, pixels, tmp_path):
    preset = get_preset("arm", exclude=("/vision/qformer/layers.1/*",), fallback_k=2, min_cosine=1.0)
    with pytest.raises(QuantizationError, match="larger --fallback-k"):  # 2 nodes cannot reach cosine 1
        Q.quantize_vision(fp32, pixels, preset, tmp_path / "refused.onnx")
    preset = preset.replace(min_cosine=0.5, mean_cosine=0.5)  # passes with no fallback
    res = Q.quantize_vision(fp32, pixels, preset, tmp_path / "int8.onnx", diagnostics_dir=tmp_path / "diag")
    assert res.fallback == [] and res.attempts == [(0, res.cosine, res.mean_cosine)]
    g = onnx.load(str(res.path))
    zp = {n.input[2] for n in g.graph.node if n.op_type == "QuantizeLinear"}
    assert {t.data_type for t in g.graph.initializer if t.name in zp} == {onnx.TensorProto.INT8}
    fed = {name for names in _dq_fed(g.graph).values() for name in names}
    assert res.excluded and all(n.startswith("/vision/qformer/layers.1/") for n in res.excluded)
    assert not fed & set(res.excluded)
    report = json.loads((tmp_path / "diag" / "sqnr.json").read_text())
    rows = report["tensors"]
    assert report["images"] == len(pixels) - 1 and len(rows) > 10  # one image held out for the gate
    assert all(np.isfinite(r["qdq_sqnr"]) and r["qdq_sqnr"] > 10 for r in rows)
    assert [r["qdq_sqnr"] for r in rows] == sorted(r["qdq_sqnr"] for r in rows)
    worst_nodes = {n for r in rows for n in r["nodes"]}
    assert set(res.diagnostics.most_sensitive(2)) <= worst_nodes
    held = json.loads((tmp_path / "diag" / "heldout.json").read_text())
    assert held["cosine_min"] == pytest.approx(res.cosine, abs=1e-6) and held["images"] == 1
    table = (tmp_path / "diag" / "sqnr.txt").read_text()
    assert table.startswith("tensor") and "/vision/encoder/blocks.0/" in table


def test_dynamic_baseline(fp32, pixels, tmp_path):
    res = Q.quantize_vision_dynamic(fp32, get_preset("x86-vnni"), pixels[:2], tmp_path / "dyn.onnx")
    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and res.cosine >= 0.99
    assert json.loads(read_metadata(onnx.load(str(res.path)))[Q.QUANT_META_KEY])["kind"] == "dynamic"


# -- refusals ---------------------------------------------------------------------------------


def test_refused_when_too_far_from_fp32(fp32, pixels, tmp_path):
    out = tmp_path / "int8.onnx"
    with pytest.raises(QuantizationError, match="minimum cosine vs FP32 >= 1.0 and mean >= 0.995"):
        Q.quantize_vision(fp32, pixels, get_preset("x86-vnni", min_cosine=1.0), out)
    assert list(tmp_path.iterdir()) == []


def test_refused_when_outputs_not_finite(fp32, pixels, tmp_path, monkeypatch):
    real = Q.run_graph

    def int8_overflows(path, x):  # the INT8 graph (in the temp folder) returns NaN in one place
        y = real(path, x)
        if path.name == "int8.onnx":
            y[0, 0, 0] = np.nan
        return y

    monkeypatch.setattr(Q, "run_graph", int8_overflows)
    with pytest.raises(QuantizationError, match="expected finite outputs, got 1 NaN/inf"):
        Q.quantize_vision(fp32, pixels, get_preset("x86-vnni"), tmp_path / "int8.onnx")
    assert list(tmp_path.iterdir()) == []


def test_refused_when_fp32_reference_not_finite(fp32, pixels, tmp_path):
    huge = np.full_like(pixels[:1], 3e38)  # finite pixels that overflow inside the FP32 graph
    with pytest.raises(QuantizationError, match="FP32 graph itself"):
        Q.quantize_vision(fp32, pixels, get_preset("x86-vnni"), tmp_path / "int8.onnx", check=huge)
    assert list(tmp_path.iterdir()) == []


def test_bad_quantization_inputs(fp32, pixels, tmp_path):
    with pytest.raises(ConfigError, match="matched none"):
        Q.quantize_vision(
            fp32, pixels, get_preset("x86-vnni", exclude=("/vision/nope/*",)), tmp_path / "a.onnx"
        )
    bad = pixels.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(CalibrationError, match="NaN/inf"):
        Q.quantize_vision(fp32, bad, get_preset("x86-vnni"), tmp_path / "b.onnx")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="not writable"):
        Q.quantize_vision(fp32, pixels, get_preset("x86-vnni"), blocker / "int8.onnx")


def test_streamed_sqnr_matches_onnxruntime_helpers(fp32, pixels, tmp_path):
    """diagnose() keeps sums of squares per image; the result equals qdq_loss_debug on all images at once."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
    )

    from tinygptv_edge.export.onnx.diag import diagnose

    preset = get_preset("x86-vnni")
    pre = Q._prepare(fp32, tmp_path)
    qdq = tmp_path / "int8.onnx"
    Q._run_static(pre, qdq, pixels, preset, [], tmp_path / "cache.json")
    diag = diagnose(pre, qdq, pixels[:3], preset.op_types, tmp_path / "diag")
    S = pixels.shape[-1]
    acts_f = collect_activations(str(tmp_path / "diag" / "float.aug.onnx"), R.ArrayReader(pixels[:3], S))
    acts_q = collect_activations(str(tmp_path / "diag" / "qdq.aug.onnx"), R.ArrayReader(pixels[:3], S))
    want = compute_activation_error(create_activation_matching(acts_q, acts_f))
    assert {r.tensor for r in diag.rows} == set(want)
    for r in diag.rows:
        assert r.qdq_sqnr == pytest.approx(want[r.tensor]["qdq_err"], abs=1e-4)
        assert r.model_sqnr == pytest.approx(want[r.tensor]["xmodel_err"], abs=1e-4)
