"""Loaders: synth -> load round trip, the three Phi-2 layouts, LoRA, 448 px, errors."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")


from tinygptv_edge.export.checkpoints import names as N  # noqa: E402
from tinygptv_edge.export.checkpoints.loaders import load_phi2, load_tinygptv  # noqa: E402
from tinygptv_edge.export.checkpoints.single import load_single  # noqa: E402
from tinygptv_edge.export.checkpoints.synth import synth_preset, synthesize  # noqa: E402
from tinygptv_edge.export.model import lora as lora_ops  # noqa: E402
from tinygptv_edge.runtime.errors import (  # noqa: E402
    CheckpointError,
    MissingKeysError,
    NonFiniteTensorError,
    ShapeMismatchError,
    UnexpectedKeysError,
)


def expected_state(tiny) -> dict[str, torch.Tensor]:
    """What the loaders should produce, computed from the synthesized tensors directly."""
    res = tiny.synth
    exp = dict(res.base)
    exp.update(res.stage_tensors)
    for weight, (a, b) in res.lora.items():
        exp[weight] = exp[weight] + tiny.cfg.lora.scale * (b @ a)
    assert exp["vision.encoder.pos_embed"].shape[1] == tiny.cfg.vision.num_tokens  # 224 px: stored as is
    return exp


def test_round_trip_gives_the_synthesized_tensors(tiny):
    sd = tiny.model.state_dict()
    exp = expected_state(tiny)
    for name, t in sd.items():
        if name.endswith(("q_layernorm.bias", "k_layernorm.bias")):
            assert torch.equal(t, torch.zeros_like(t)), name  # never saved: initial value
            continue
        assert name in exp, f"{name} was not synthesized"
        torch.testing.assert_close(t, exp[name], rtol=1e-6, atol=1e-6, msg=name)


def test_single_checkpoint_round_trip(tiny, tiny_single):
    model, summary = load_single(tiny_single)
    assert summary.defaulted == []
    ref = tiny.model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_single_checkpoint_uses_official_names(tiny_single):
    from safetensors import safe_open

    with safe_open(str(tiny_single / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "llama_model.model.layers.0.self_attn.query_key_value.weight" in keys
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in keys
    assert "visual_encoder.blocks.0.attn.q_bias" in keys
    assert {"query_tokens", "ln_vision.weight", "llama_proj.weight", "llama_proj2.bias"} <= keys


@pytest.fixture(scope="module")
def three_layouts(tmp_path_factory):
    cfg, dtype = synth_preset("tiny")
    out = {}
    for layout in ("hf", "tinygptv", "msft"):
        res = synthesize(tmp_path_factory.mktemp(layout), cfg, seed=7, phi_layout=layout, dtype=dtype)
        out[layout] = res
    return cfg, out


def test_three_phi_layouts_give_identical_logits(three_layouts):
    cfg, res = three_layouts
    ids = torch.tensor([[1, 5, 9, 200, 3, 77, 41]])
    logits = {}
    for layout, r in res.items():
        model, summary = load_phi2(r.phi2)
        assert summary.layout == layout
        assert model.cfg == cfg.language
        logits[layout] = model(model.embed(ids))
    torch.testing.assert_close(logits["hf"], logits["tinygptv"], rtol=0, atol=0)
    torch.testing.assert_close(logits["hf"], logits["msft"], rtol=0, atol=0)


def test_phi2_alone_reports_the_added_norms_as_defaulted(three_layouts):
    _, res = three_layouts
    _, summary = load_phi2(res["hf"].phi2)
    assert any("post_layernorm" in k for k in summary.defaulted)
    assert "left at initial value" in summary.format()


def test_merged_lora_equals_unmerged_forward(tiny):
    r = tiny.synth
    unmerged, summary = load_tinygptv(
        phi2=r.phi2, eva=r.eva, blip2=r.blip2, stage=r.stage, cfg=tiny.cfg, merge_lora=False
    )
    assert len(summary.lora_attached) == 2 * tiny.cfg.language.layers
    x = torch.randn(1, 9, tiny.cfg.language.hidden)
    with torch.no_grad():
        torch.testing.assert_close(tiny.model.language(x), unmerged.language(x), rtol=1e-4, atol=1e-5)
        # and LoRA really changes the output
        for module in unmerged.modules():
            if isinstance(module, lora_ops.LoraLinear):
                module.scale = 0.0
        assert (unmerged.language(x) - tiny.model.language(x)).abs().max() > 1e-3


def test_merge_formula():
    w, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    torch.testing.assert_close(lora_ops.merge(w, a, b, 0.25), w + 0.25 * b @ a)


def test_new_peft_key_style_loads_the_same(tiny, tmp_path):
    r = synthesize(tmp_path, tiny.cfg, seed=0, peft_style="new")
    model, _ = load_tinygptv(phi2=r.phi2, eva=r.eva, blip2=r.blip2, stage=r.stage, cfg=tiny.cfg)
    for name, t in model.state_dict().items():
        assert torch.equal(t, tiny.model.state_dict()[name]), name


def test_448px_pos_embed_is_interpolated_bicubically(tmp_path):
    cfg, dtype = synth_preset("tiny", stage=4)
    assert cfg.vision.image_size == 2 * cfg.vision.pretrain_image_size
    res = synthesize(tmp_path, cfg, seed=1, dtype=dtype, keep=True)
    model, summary = load_tinygptv(phi2=res.phi2, eva=res.eva, blip2=res.blip2, stage=res.stage, cfg=cfg)
    assert summary.pos_embed == "interpolated bicubically from 4x4 to 8x8"
    stored = torch.load(res.eva, weights_only=True)["pos_embed"]
    g_old, g_new, w = 4, 8, cfg.vision.width
    grid = stored[:, 1:].reshape(1, g_old, g_old, w).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    got = model.vision.encoder.pos_embed
    torch.testing.assert_close(got[:, :1], stored[:, :1])
    torch.testing.assert_close(got[:, 1:], want.permute(0, 2, 3, 1).reshape(1, g_new * g_new, w))
    px = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    assert model.embed_image(px).shape == (1, cfg.qformer.num_query_tokens, cfg.language.hidden)


# ---- errors ----------------------------------------------------------------------------------


def _copy_set(tiny, tmp_path):
    r = tiny.synth
    dst = tmp_path / "set"
    shutil.copytree(r.out, dst)
    return dst


def _paths(root, stage=3):
    return dict(
        phi2=root / "phi-2",
        eva=root / "eva_vit_g.pth",
        blip2=root / "blip2_pretrained_flant5xxl.pth",
        stage=root / f"TinyGPT-V_for_Stage{stage}.pth",
    )


def test_missing_key_is_named(tiny, tmp_path):
    root = _copy_set(tiny, tmp_path)
    sd = torch.load(root / "eva_vit_g.pth", weights_only=True)
    del sd["blocks.1.mlp.fc2.weight"]
    torch.save(sd, root / "eva_vit_g.pth")
    with pytest.raises(MissingKeysError, match=r"vision\.encoder\.blocks\.1\.mlp\.fc2\.weight") as e:
        load_tinygptv(**_paths(root), cfg=tiny.cfg)
    assert e.value.keys == ["vision.encoder.blocks.1.mlp.fc2.weight"]


def test_unexpected_key_is_named(tiny, tmp_path):
    root = _copy_set(tiny, tmp_path)
    obj = torch.load(root / "blip2_pretrained_flant5xxl.pth", weights_only=True)
    obj["model"]["Qformer.bert.encoder.layer.0.attention.self.extra.weight"] = torch.zeros(2)
    torch.save(obj, root / "blip2_pretrained_flant5xxl.pth")
    with pytest.raises(UnexpectedKeysError, match="attention.self.extra.weight"):
        load_tinygptv(**_paths(root), cfg=tiny.cfg)


def test_shape_mismatch_says_expected_and_got(tiny, tmp_path):
    root = _copy_set(tiny, tmp_path)
    obj = torch.load(root / "TinyGPT-V_for_Stage3.pth", weights_only=True)
    obj["model"]["llama_proj.weight"] = torch.zeros(3, 3)
    torch.save(obj, root / "TinyGPT-V_for_Stage3.pth")
    with pytest.raises(
        ShapeMismatchError, match=r"vision\.proj1\.weight.*expected shape \(96, 32\), got \(3, 3\)"
    ):
        load_tinygptv(**_paths(root), cfg=tiny.cfg)


def test_non_finite_tensor_is_refused(tiny, tmp_path):
    root = _copy_set(tiny, tmp_path)
    obj = torch.load(root / "TinyGPT-V_for_Stage3.pth", weights_only=True)
    obj["model"]["llama_proj2.bias"][3] = float("nan")
    torch.save(obj, root / "TinyGPT-V_for_Stage3.pth")
    with pytest.raises(NonFiniteTensorError, match="vision.proj2.bias.*1 non-finite"):
        load_tinygptv(**_paths(root), cfg=tiny.cfg)


def test_lora_rank_is_read_from_the_shapes_and_alpha_from_the_config(tiny, tmp_path):
    """The stage file has rank 4 (tiny); a config saying r=8 no longer matters: scale = alpha / 4."""
    root = _copy_set(tiny, tmp_path)
    cfg = tiny.cfg.replace(lora=tiny.cfg.lora.__class__(r=8, alpha=16.0))
    model, summary = load_tinygptv(**_paths(root), cfg=cfg)
    assert (summary.lora_rank, summary.lora_alpha, model.cfg.lora.r) == (4, 16.0, 4)
    assert "LoRA rank 4 (from the tensor shapes), alpha 16 (from the config), scale 4" in summary.format()
    res = tiny.synth
    for weight, (a, b) in res.lora.items():
        want = res.base[weight] + 4.0 * (b @ a)
        torch.testing.assert_close(model.state_dict()[weight], want, rtol=1e-6, atol=1e-6)


def test_lora_ranks_that_disagree_are_refused(tiny, tmp_path):
    root = _copy_set(tiny, tmp_path)
    path = root / "TinyGPT-V_for_Stage3.pth"
    obj = torch.load(path, weights_only=True)
    key = N.STAGE_LM_PREFIX + "model.layers.1.self_attn.dense.lora_{}.weight"
    obj["model"][key.format("A")] = torch.zeros(2, tiny.cfg.language.hidden)
    torch.save(obj, path)
    with pytest.raises(
        CheckpointError, match=r"lora_A \(r, in\) and lora_B \(out, r\).*A \(2, 64\) B \(64, 4\)"
    ):
        load_tinygptv(**_paths(root), cfg=tiny.cfg)
    obj["model"][key.format("B")] = torch.zeros(tiny.cfg.language.hidden, 2)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="expected one LoRA rank across layers, got 4 .*, 2 "):
        load_tinygptv(**_paths(root), cfg=tiny.cfg)


def test_stage_without_norms_is_missing_keys(tiny, tmp_path):
    root = _copy_set(tiny, tmp_path)
    obj = torch.load(root / "TinyGPT-V_for_Stage3.pth", weights_only=True)
    key = N.STAGE_LM_PREFIX + "model.layers.1.post_layernorm.weight"
    del obj["model"][key]
    torch.save(obj, root / "TinyGPT-V_for_Stage3.pth")
    with pytest.raises(MissingKeysError, match=r"language\.layers\.1\.post_layernorm\.weight"):
        load_tinygptv(**_paths(root), cfg=tiny.cfg)


def test_bin_weights_load_like_safetensors(tiny, tmp_path):
    from safetensors.torch import load_file

    root = _copy_set(tiny, tmp_path)
    phi = root / "phi-2"
    for f in phi.glob("*.safetensors"):
        torch.save(load_file(f), phi / (f.stem.replace("model", "pytorch_model") + ".bin"))
        f.unlink()
    model, _ = load_tinygptv(**_paths(root), cfg=tiny.cfg)
    for name, t in model.state_dict().items():
        assert torch.equal(t, tiny.model.state_dict()[name]), name
