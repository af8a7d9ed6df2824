"""Our Q-Former equals transformers' Blip2QFormerModel (an independent implementation) on the same weights."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")


transformers = pytest.importorskip("transformers")

# ours -> transformers, per layer (`{i}`), as a table
OURS_TO_HF = {
    "norm.{p}": "layernorm.{p}",
    "layers.{i}.self_attn.query.{p}": "encoder.layer.{i}.attention.attention.query.{p}",
    "layers.{i}.self_attn.key.{p}": "encoder.layer.{i}.attention.attention.key.{p}",
    "layers.{i}.self_attn.value.{p}": "encoder.layer.{i}.attention.attention.value.{p}",
    "layers.{i}.self_attn.dense.{p}": "encoder.layer.{i}.attention.output.dense.{p}",
    "layers.{i}.self_attn.norm.{p}": "encoder.layer.{i}.attention.output.LayerNorm.{p}",
    "layers.{i}.cross_attn.query.{p}": "encoder.layer.{i}.crossattention.attention.query.{p}",
    "layers.{i}.cross_attn.key.{p}": "encoder.layer.{i}.crossattention.attention.key.{p}",
    "layers.{i}.cross_attn.value.{p}": "encoder.layer.{i}.crossattention.attention.value.{p}",
    "layers.{i}.cross_attn.dense.{p}": "encoder.layer.{i}.crossattention.output.dense.{p}",
    "layers.{i}.cross_attn.norm.{p}": "encoder.layer.{i}.crossattention.output.LayerNorm.{p}",
    "layers.{i}.ffn.up.{p}": "encoder.layer.{i}.intermediate_query.dense.{p}",
    "layers.{i}.ffn.down.{p}": "encoder.layer.{i}.output_query.dense.{p}",
    "layers.{i}.ffn.norm.{p}": "encoder.layer.{i}.output_query.LayerNorm.{p}",
}


def test_qformer_matches_transformers_blip2(tiny):
    ours = tiny.model.vision.qformer
    q = tiny.cfg.qformer
    hf_cfg = transformers.Blip2QFormerConfig(
        hidden_size=q.hidden,
        num_hidden_layers=q.layers,
        num_attention_heads=q.heads,
        intermediate_size=q.intermediate,
        encoder_hidden_size=q.vision_width,
        cross_attention_frequency=q.cross_attention_freq,
        layer_norm_eps=q.eps,
        hidden_act="gelu",
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    hf = transformers.Blip2QFormerModel(hf_cfg).eval()
    hf_sd = hf.state_dict()
    table = {}
    for src, dst in OURS_TO_HF.items():
        for i in range(q.layers):
            for p in ("weight", "bias"):
                table[src.format(i=i, p=p)] = dst.format(i=i, p=p)
    mapped = {}
    for name, t in ours.state_dict().items():
        if name == "query_tokens":
            continue
        mapped[table[name]] = t
    assert set(mapped) == set(hf_sd), set(hf_sd) ^ set(mapped)
    hf.load_state_dict(mapped)
    image = torch.randn(2, tiny.cfg.vision.num_tokens, q.vision_width)
    with torch.no_grad():
        want = hf(
            query_embeds=ours.query_tokens.expand(2, -1, -1),
            encoder_hidden_states=image,
        ).last_hidden_state
        got = ours(image)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
