"""The FP32 vision export: contract names and axes, metadata, node names, parity, atomic publishing."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

pytestmark = pytest.mark.torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tinygptv_edge.export.onnx import export as E  # noqa: E402
from tinygptv_edge.export.onnx.check import ParityConfig, sample_cosine  # noqa: E402
from tinygptv_edge.runtime.contract import (  # noqa: E402
    BATCH_AXIS,
    ONNX_META,
    VISION_FILE_FP32,
    VISION_INPUT,
    VISION_OUTPUT,
)
from tinygptv_edge.runtime.errors import OutputPathError, ParityError  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return E.export_vision(tiny.model, out, {"model.safetensors": "ab" * 32})


def _images(n: int, size: int = 80, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 7 * i, 3), dtype=np.uint8)) for i in range(n)]


def test_graph_follows_the_contract(exported, tiny):
    g = onnx.load(str(exported.path))
    assert exported.path.name == VISION_FILE_FP32 and exported.external_data is None
    assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = g.graph.input, g.graph.output
    S, Q, H = tiny.cfg.vision.image_size, tiny.cfg.qformer.num_query_tokens, tiny.cfg.projection.out_features
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, dims(inp)) == (VISION_INPUT, [BATCH_AXIS, 3, S, S])
    assert (out.name, dims(out)) == (VISION_OUTPUT, [BATCH_AXIS, Q, H])


def test_metadata_props(exported, tiny):
    meta = E.read_metadata(onnx.load(str(exported.path), load_external_data=False))
    pre = tiny.cfg.preprocess
    assert int(meta[ONNX_META["image_size"]]) == pre.image_size
    assert json.loads(meta[ONNX_META["mean"]]) == list(pre.mean)
    assert json.loads(meta[ONNX_META["std"]]) == list(pre.std)
    assert meta[ONNX_META["resample"]] == "bicubic"
    assert int(meta[ONNX_META["stage"]]) == tiny.cfg.stage
    assert int(meta[ONNX_META["num_query_tokens"]]) == tiny.cfg.qformer.num_query_tokens
    assert int(meta[ONNX_META["embed_dim"]]) == tiny.cfg.projection.out_features
    assert json.loads(meta[ONNX_META["source_sha256"]]) == {"model.safetensors": "ab" * 32}
    from tinygptv_edge.runtime.config import TinyGPTVConfig

    assert TinyGPTVConfig.from_dict(json.loads(meta[ONNX_META["config"]])) == tiny.cfg


def test_metadata_has_the_format_version(exported):
    from tinygptv_edge.runtime.contract import ONNX_FORMAT_VERSION

    meta = E.read_metadata(onnx.load(str(exported.path), load_external_data=False))
    assert meta[ONNX_META["format_version"]] == str(ONNX_FORMAT_VERSION) == "1"


def test_node_and_weight_names_follow_module_paths(exported, tiny):
    g = onnx.load(str(exported.path))
    names = {n.name for n in g.graph.node}
    for want in (
        "/vision/encoder/patch_embed/Conv",
        "/vision/encoder/blocks.1/mlp/fc2/MatMul",
        "/vision/ln_vision/LayerNormalization",
        "/vision/qformer/layers.0/cross_attn/query/MatMul",
        "/vision/qformer/layers.2/ffn/norm/LayerNormalization",
        "/vision/proj2/MatMul",
    ):
        assert want in names
    assert not any("cross_attn" in n for n in names if "/layers.1/" in n)  # odd layers: no cross-attention
    weights = {t.name for t in g.graph.initializer}
    assert "/vision/encoder/blocks.0/mlp/fc1/MatMul/weight" in weights
    assert not [w for w in weights if w.startswith("onnx::MatMul")]
    fc1 = next(t for t in g.graph.initializer if t.name == "/vision/encoder/blocks.0/mlp/fc1/MatMul/weight")
    ref = tiny.model.vision.encoder.blocks[0].mlp.fc1.weight.detach().numpy().T
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(fc1), ref)


def test_parity_on_real_images_dynamic_batch(exported, tiny):
    """Preprocessed PIL images of any size, batch 3 (traced at 1): ORT vs torch within 1e-4 / 0.99999."""
    import torch

    from tinygptv_edge.runtime.vision.preprocess import preprocess

    x = np.stack([preprocess(im, tiny.cfg.preprocess) for im in _images(3)])
    sess = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {VISION_INPUT: x})[0]
    want = tiny.model.embed_image(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (3, tiny.cfg.qformer.num_query_tokens, tiny.cfg.projection.out_features)
    assert np.abs(got - want).max() <= 1e-4
    assert sample_cosine(got, want).min() >= 0.99999
    assert exported.parity.max_abs <= 1e-4 and exported.parity.checked == [1, 2]


def test_external_data_then_inline_removes_stale_file(tiny, tmp_path):
    ext = E.export_vision(tiny.model, tmp_path, cfg=E.ExportConfig(external_data=True))
    data = tmp_path / (VISION_FILE_FP32 + ".data")
    assert ext.external_data == data and data.stat().st_size > ext.path.stat().st_size
    g = onnx.load(str(ext.path), load_external_data=False)
    where = {t.name: t.data_location for t in g.graph.initializer}
    assert where["/vision/encoder/blocks.0/mlp/fc1/MatMul/weight"] == onnx.TensorProto.EXTERNAL
    x = np.random.default_rng(1).standard_normal((2, 3, 56, 56)).astype(np.float32)
    a = ort.InferenceSession(str(ext.path), providers=["CPUExecutionProvider"]).run(None, {VISION_INPUT: x})[
        0
    ]
    inline = E.export_vision(tiny.model, tmp_path)
    assert inline.external_data is None and not data.exists()
    b = ort.InferenceSession(str(inline.path), providers=["CPUExecutionProvider"]).run(
        None, {VISION_INPUT: x}
    )[0]
    np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == [VISION_FILE_FP32]  # no temp folder left


def test_parity_failure_collects_all_and_publishes_nothing(tiny, tmp_path, monkeypatch):
    """An exporter that traces the wrong weights: every failed check is listed, nothing is written."""
    real = E._torch_export

    def wrong(model, path, opset):
        bad = copy.deepcopy(model)
        with __import__("torch").no_grad():
            bad.vision.proj2.bias.add_(1.0)
        real(bad, path, opset)

    monkeypatch.setattr(E, "_torch_export", wrong)
    with pytest.raises(ParityError) as err:
        E.export_vision(tiny.model, tmp_path)
    assert len(err.value.failures) >= 2 and "batch 1" in str(err.value) and "batch 2" in str(err.value)
    assert "expected <= 0.0001" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_fail_parity(tiny, tmp_path):
    import torch

    bad = copy.deepcopy(tiny.model)
    with torch.no_grad():
        bad.vision.qformer.layers[0].ffn.up.weight[0, 0] = float("nan")
    with pytest.raises(ParityError, match="non-finite"):
        E.export_vision(bad, tmp_path)
    assert not (tmp_path / VISION_FILE_FP32).exists()


def test_unwritable_output(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputPathError, match="not writable"):
        E.export_vision(tiny.model, blocker / "out")


def test_bad_export_config():
    from tinygptv_edge.runtime.errors import ConfigError, ExportError

    with pytest.raises(ExportError, match="opset"):
        E.ExportConfig(opset=13)
    with pytest.raises(ConfigError, match="atol"):
        ParityConfig(atol=0)


def test_cli_export_onnx_end_to_end(tiny_single, tmp_path, capsys):
    from tinygptv_edge.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, im in enumerate(_images(4)):
        im.save(imgs / f"{i}.png")
    out = tmp_path / "dist"
    args = ["export-onnx", "--model", str(tiny_single), "--out", str(out), "--calib-images", str(imgs)]
    # the tiny model's INT4 reaches cosine ~0.95 (docs/onnx.md): a gate for it
    gate = ["--min-cosine", "0.9", "--mean-cosine", "0.9", "--int4", "--int4-accuracy", "0"]
    assert main([*args, *gate, "--dynamic", "--diagnostics", "--fallback-k", "1", "--method", "entropy"]) == 0
    names = sorted(p.name for p in out.iterdir())
    want = [
        "diagnostics",
        VISION_FILE_FP32,
        "vision.int4.onnx",
        "vision.int8-dynamic.onnx",
        "vision.int8.onnx",
    ]
    assert names == want
    diag = sorted(p.name for p in (out / "diagnostics").iterdir())
    assert diag == ["heldout.json", "heldout.txt", "sqnr.json", "sqnr.txt"]
    text = capsys.readouterr().out
    # 4 images: 3 calibrate, the last one (3.png) is held out and named in the report
    assert "3 images from" in text and "worst held-out images: 3.png" in text
    assert "INT4: cosine vs FP32 on 1 held-out image(s)" in text and "fused: BiasGelu" in text
    int4 = onnx.load(str(out / "vision.int4.onnx"), load_external_data=False)
    assert any(n.op_type == "MatMulNBits" for n in int4.graph.node)
    meta = E.read_metadata(onnx.load(str(out / VISION_FILE_FP32), load_external_data=False))
    from tinygptv_edge.runtime.image_cache import file_sha256

    assert json.loads(meta[ONNX_META["source_sha256"]]) == {
        "model.safetensors": file_sha256(tiny_single / "model.safetensors")
    }


def test_cli_errors_are_typed(tmp_path, monkeypatch, capsys):
    from tinygptv_edge.cli import main
    from tinygptv_edge.export.checkpoints import default as D
    from tinygptv_edge.export.onnx import cli as onnx_cli

    monkeypatch.setattr(D, "default_model_dir", lambda: tmp_path / "no-model")
    assert main(["export-onnx", "--out", str(tmp_path / "o")]) == 2
    assert "shipped default model is missing" in capsys.readouterr().err
    assert main(["export-onnx", "--phi2", "x", "--out", str(tmp_path / "o")]) == 2
    assert "together" in capsys.readouterr().err

    def no_vqa(name):
        raise ImportError(name)

    monkeypatch.setattr(onnx_cli.importlib, "import_module", no_vqa)
    from tinygptv_edge.runtime.errors import CalibrationError

    with pytest.raises(CalibrationError, match="export/train/vqa.py"):
        onnx_cli.default_calibration_folder(tmp_path, 4)
