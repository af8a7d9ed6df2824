"""Issue #17 at tiny size: fused graph parity, INT4 weights, the held-out min-cosine gate and its fallback."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

pytestmark = pytest.mark.torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from helpers.images import write_images  # noqa: E402

from tinygptv_edge.export.onnx import calib_data as R  # noqa: E402
from tinygptv_edge.export.onnx import quant as Q  # noqa: E402
from tinygptv_edge.export.onnx.export import export_vision, read_metadata  # noqa: E402
from tinygptv_edge.export.onnx.fuse import FuseConfig, check_fused_parity, fuse_graph  # noqa: E402
from tinygptv_edge.export.onnx.gate import CheckResult, enforce  # noqa: E402
from tinygptv_edge.export.onnx.presets import Int4Config, get_preset  # noqa: E402
from tinygptv_edge.runtime.errors import (  # noqa: E402
    CalibrationError,
    ConfigError,
    ParityError,
    QuantizationError,
)


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory):
    return export_vision(tiny.model, tmp_path_factory.mktemp("f")).path


@pytest.fixture(scope="module")
def pixels(tiny, tmp_path_factory):
    return R.load_folder(write_images(tmp_path_factory.mktemp("calib"), 8, seed=1), tiny.cfg.preprocess)


@pytest.fixture(scope="module")
def heldout(tiny, tmp_path_factory):
    return R.load_folder(write_images(tmp_path_factory.mktemp("held"), 4, seed=7), tiny.cfg.preprocess)


# -- fusion ------------------------------------------------------------------------------------


def test_fusion_happens_keeps_names_and_parity(tiny, fp32, pixels, tmp_path):
    from tinygptv_edge.export.onnx.check import check_parity

    rep = fuse_graph(fp32, tmp_path / "fused.onnx")
    v, q = tiny.cfg.vision, tiny.cfg.qformer
    # one BiasGelu per MLP (ViT blocks + Q-Former FFNs); residual + LayerNorm fused all along
    assert rep.fused["BiasGelu"] == v.depth + q.layers
    assert rep.fused["SkipLayerNormalization"] >= 2 * v.depth + 2 * q.layers - 1
    assert "Attention" not in rep.fused  # off by default: its QKV weights would stay float in INT8
    g = onnx.load(str(rep.path))
    ops = Counter(n.op_type for n in g.graph.node)
    assert ops["Erf"] == 0 and ops["LayerNormalization"] < 2 * v.depth
    # fused nodes are named after the module they replace, so exclusions and reports stay readable
    assert rep.names and all(n.startswith("/vision/") for n in rep.names)
    assert "/vision/encoder/blocks.0/mlp/BiasGelu" in rep.names
    assert "/vision/encoder/blocks.1/norm2/SkipLayerNormalization" in rep.names
    # parity: against the torch reference as at export, and against the FP32 graph
    check_parity(tiny.model, rep.path)
    want = Q.run_graph(fp32, pixels[:2])
    check_fused_parity(rep.path, pixels[:2], want, rep)
    assert rep.min_cosine > 0.99999 and rep.max_abs < 1e-4


def test_fusion_leaves_large_weights_in_the_source_data_file(tiny, fp32, pixels, tmp_path, monkeypatch):
    """A full-size graph is 4.4 GB: the optimizer only reads small tensors, the large ones are streamed
    into the fused graph's own data file, and it quantizes like the in-memory path."""
    from tinygptv_edge.export.onnx import fuse as F
    from tinygptv_edge.export.onnx.export import ExportConfig

    src = export_vision(tiny.model, tmp_path / "src", cfg=ExportConfig(external_data=True)).path
    monkeypatch.setattr(F, "SMALL_TENSOR", 2048)
    (tmp_path / "dst").mkdir()
    rep = fuse_graph(src, tmp_path / "dst" / "fused.onnx")
    g = onnx.load(str(rep.path), load_external_data=False)
    external = [t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "fused.onnx.data"
    }
    data_bytes = (src.parent / (src.name + ".data")).stat().st_size
    assert rep.path.stat().st_size < data_bytes // 2 < Q._model_bytes(rep.path)
    assert rep.fused == fuse_graph(fp32, tmp_path / "in-memory.onnx").fused  # the same fusions
    check_fused_parity(rep.path, pixels[:2], Q.run_graph(src, pixels[:2]), rep)
    res = Q.quantize_vision(src, pixels, get_preset("x86-vnni"), tmp_path / "out" / "int8.onnx")
    assert res.fused.fused["BiasGelu"] == tiny.cfg.vision.depth + tiny.cfg.qformer.layers


def test_fused_attention_is_named_and_matches(fp32, pixels, tmp_path):
    rep = fuse_graph(fp32, tmp_path / "fused.onnx", FuseConfig(attention=True))
    att = [n for n in rep.names if n.endswith("/Attention")]
    assert rep.fused.get("Attention", 0) == len(att) >= 1
    assert all(n.startswith("/vision/qformer/layers.") for n in att)
    check_fused_parity(rep.path, pixels[:2], Q.run_graph(fp32, pixels[:2]), rep)


def test_fusion_that_breaks_parity_is_refused(fp32, pixels, tmp_path):
    from onnx import numpy_helper

    rep = fuse_graph(fp32, tmp_path / "fused.onnx")
    g = onnx.load(str(rep.path))
    node = next(n for n in g.graph.node if n.op_type == "SkipLayerNormalization")
    gamma = next(t for t in g.graph.initializer if t.name == node.input[2])
    gamma.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gamma) * 3.0, gamma.name))
    onnx.save(g, str(rep.path))
    with pytest.raises(ParityError, match=r"--no-fuse"):
        check_fused_parity(rep.path, pixels[:2], Q.run_graph(fp32, pixels[:2]), rep)


def test_int8_with_and_without_fusion(fp32, pixels, heldout, tmp_path):
    fused = Q.quantize_vision(fp32, pixels, get_preset("x86-vnni"), tmp_path / "a.onnx", check=heldout)
    plain = Q.quantize_vision(
        fp32, pixels, get_preset("x86-vnni", fuse=False), tmp_path / "b.onnx", check=heldout
    )
    ops_f = Counter(n.op_type for n in onnx.load(str(fused.path)).graph.node)
    ops_p = Counter(n.op_type for n in onnx.load(str(plain.path)).graph.node)
    assert ops_f["BiasGelu"] and ops_f["SkipLayerNormalization"] and not ops_p["BiasGelu"]
    assert ops_f["MatMul"] == ops_p["MatMul"]  # every MatMul still quantized after fusing
    assert (
        json.loads(read_metadata(onnx.load(str(fused.path)))[Q.QUANT_META_KEY])["fused"] == fused.fused.fused
    )
    assert abs(fused.mean_cosine - plain.mean_cosine) < 1e-3 and fused.cosine >= 0.98


# -- INT4 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block,level", [(32, 4), (128, 0)])
def test_int4_weights(fp32, heldout, tmp_path, block, level):
    # the tiny model's K=64 rows quantize worse than full size (cosine ~0.96-0.98 here): a tiny gate
    cfg = Int4Config(block_size=block, accuracy_level=level, min_cosine=0.9, mean_cosine=0.95)
    res = Q.quantize_vision_int4(fp32, heldout, cfg, tmp_path / "vision.int4.onnx", check_names=list("abcd"))
    g = onnx.load(str(res.path))
    nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
    weights = {t.name for t in onnx.load(str(fp32)).graph.initializer}
    weight_matmuls = [
        n for n in onnx.load(str(fp32)).graph.node if n.op_type == "MatMul" and n.input[1] in weights
    ]
    assert len(nbits) == len(weight_matmuls) and not any(
        n.op_type == "MatMul" and n.input[1] in weights for n in g.graph.node
    )
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert (attrs["bits"], attrs["block_size"], attrs.get("accuracy_level", 0)) == (4, block, level)
    assert res.check.mean >= 0.95 and res.cosine >= 0.9 and res.check.names == list("abcd")
    info = json.loads(read_metadata(g)[Q.QUANT_META_KEY])
    assert info["kind"] == "int4" and info["int4"]["block_size"] == block
    # the runtime reads it like any vision graph (MatMulNBits is an onnxruntime CPU contrib op)
    from tinygptv_edge.runtime.vision.encoder import VisionEncoder

    enc = VisionEncoder(res.path, n_threads=1)
    np.testing.assert_allclose(
        enc.embed(heldout[:1]), Q.run_graph(res.path, heldout[:1]), rtol=1e-5, atol=1e-5
    )
    assert info["cosine_mean_vs_fp32"] == pytest.approx(res.check.mean, abs=1e-6)


def test_int4_gate_and_config(fp32, heldout, tmp_path):
    with pytest.raises(QuantizationError, match="worst: image"):
        Q.quantize_vision_int4(fp32, heldout, Int4Config(min_cosine=1.0), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []
    for bad in ({"block_size": 48}, {"accuracy_level": 5}, {"mean_cosine": 0.0}):
        with pytest.raises(ConfigError):
            Int4Config(**bad)


# -- the held-out gate -------------------------------------------------------------------------


def test_gate_reports_min_mean_and_worst_images():
    res = CheckResult(np.array([0.999, 0.95, 0.998, 0.97]), ["a", "b", "c", "d"], 0.1)
    assert res.mean == pytest.approx(0.97925) and res.min == 0.95
    assert res.worst(2) == [("b", 0.95), ("d", 0.97)]
    assert not res.passes(0.98, 0.9) and not res.passes(0.9, 0.99) and res.passes(0.95, 0.979)
    with pytest.raises(
        QuantizationError, match=r"got min 0\.95000, mean 0\.97925.*worst: b 0\.95000, d 0\.97000"
    ):
        enforce(res, 0.98, 0.995)
    assert res.table().splitlines()[3].startswith("b ")


def test_holdout_is_not_calibrated_on(fp32, pixels, tmp_path):
    cal, held = Q.split_holdout(pixels, None)
    assert len(cal) + len(held) == len(pixels) and len(held) == 2
    np.testing.assert_array_equal(held, pixels[-2:])
    with pytest.raises(CalibrationError, match=">= 2 images"):
        Q.split_holdout(pixels[:1], None)
    said: list[str] = []
    res = Q.quantize_vision(fp32, pixels, get_preset("x86-vnni"), tmp_path / "i.onnx", progress=said.append)
    assert any(f"minmax, {len(pixels) - 2} images" in m for m in said) and len(res.check.cosines) == 2


def test_fallback_adds_nodes_until_the_minimum_passes(fp32, pixels, heldout, tmp_path):
    base = Q.quantize_vision(
        fp32,
        pixels,
        get_preset("x86-vnni", min_cosine=0.5, mean_cosine=0.5),
        tmp_path / "a.onnx",
        check=heldout,
    )
    assert base.fallback == [] and base.cosine < 1.0
    target = base.cosine + 0.7 * (1.0 - base.cosine)  # unreachable without float nodes
    preset = get_preset("x86-vnni", min_cosine=target, mean_cosine=0.5, fallback_k=200)
    res = Q.quantize_vision(fp32, pixels, preset, tmp_path / "b.onnx", check=heldout)
    assert res.cosine >= target and res.fallback
    # tried 0, 1, 2, 4, ... nodes; every attempt before the last failed the minimum, the last passed
    counts = [n for n, _, _ in res.attempts]
    assert counts[0] == 0 and counts[-1] == len(res.fallback)
    assert all(
        b == 2 * a or (a == 0 and b == 1) or b == len(res.diagnostics.most_sensitive(200))
        for a, b in zip(counts, counts[1:], strict=False)
    )
    assert all(m < target for _, m, _ in res.attempts[:-1]) and res.attempts[-1][1] >= target
    assert res.fallback == res.diagnostics.most_sensitive(len(res.fallback))
    g = onnx.load(str(res.path))
    dq = {n.output[0] for n in g.graph.node if n.op_type == "DequantizeLinear"}
    float_nodes = {n.name for n in g.graph.node if not any(i in dq for i in n.input)}
    assert set(res.fallback) <= float_nodes
    info = json.loads(read_metadata(g)[Q.QUANT_META_KEY])
    assert info["fallback"] == res.fallback and info["worst_images"][0][1] == pytest.approx(
        res.cosine, abs=1e-6
    )
