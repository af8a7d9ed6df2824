"""Checkpoint name -> canonical (reference model) name, as tables: one row per tensor.

`{i}` stands for a layer index. The canonical names are the reference model's `state_dict()` keys.
Official names are those of the TinyGPT-V / LAVIS / Phi-2 checkpoints (see docs/loaders.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# ---- EVA ViT-g: keys of eva_vit_g.pth (no prefix) ---------------------------------------------
EVA_GLOBAL = [
    ("cls_token", "vision.encoder.cls_token"),
    ("pos_embed", "vision.encoder.pos_embed"),
    ("patch_embed.proj.weight", "vision.encoder.patch_embed.weight"),
    ("patch_embed.proj.bias", "vision.encoder.patch_embed.bias"),
]
EVA_BLOCK = [
    ("blocks.{i}.norm1.weight", "vision.encoder.blocks.{i}.norm1.weight"),
    ("blocks.{i}.norm1.bias", "vision.encoder.blocks.{i}.norm1.bias"),
    ("blocks.{i}.attn.qkv.weight", "vision.encoder.blocks.{i}.attn.qkv.weight"),
    ("blocks.{i}.attn.q_bias", "vision.encoder.blocks.{i}.attn.q_bias"),
    ("blocks.{i}.attn.v_bias", "vision.encoder.blocks.{i}.attn.v_bias"),
    ("blocks.{i}.attn.proj.weight", "vision.encoder.blocks.{i}.attn.proj.weight"),
    ("blocks.{i}.attn.proj.bias", "vision.encoder.blocks.{i}.attn.proj.bias"),
    ("blocks.{i}.norm2.weight", "vision.encoder.blocks.{i}.norm2.weight"),
    ("blocks.{i}.norm2.bias", "vision.encoder.blocks.{i}.norm2.bias"),
    ("blocks.{i}.mlp.fc1.weight", "vision.encoder.blocks.{i}.mlp.fc1.weight"),
    ("blocks.{i}.mlp.fc1.bias", "vision.encoder.blocks.{i}.mlp.fc1.bias"),
    ("blocks.{i}.mlp.fc2.weight", "vision.encoder.blocks.{i}.mlp.fc2.weight"),
    ("blocks.{i}.mlp.fc2.bias", "vision.encoder.blocks.{i}.mlp.fc2.bias"),
]

# ---- BLIP-2 Q-Former: keys of blip2_pretrained_flant5xxl.pth['model'] -------------------------
QFORMER_GLOBAL = [
    ("query_tokens", "vision.qformer.query_tokens"),
    ("ln_vision.weight", "vision.ln_vision.weight"),
    ("ln_vision.bias", "vision.ln_vision.bias"),
    ("Qformer.bert.embeddings.LayerNorm.weight", "vision.qformer.norm.weight"),
    ("Qformer.bert.embeddings.LayerNorm.bias", "vision.qformer.norm.bias"),
]
_Q = "Qformer.bert.encoder.layer.{i}"
_C = "vision.qformer.layers.{i}"
QFORMER_LAYER = [
    (f"{_Q}.attention.self.query.weight", f"{_C}.self_attn.query.weight"),
    (f"{_Q}.attention.self.query.bias", f"{_C}.self_attn.query.bias"),
    (f"{_Q}.attention.self.key.weight", f"{_C}.self_attn.key.weight"),
    (f"{_Q}.attention.self.key.bias", f"{_C}.self_attn.key.bias"),
    (f"{_Q}.attention.self.value.weight", f"{_C}.self_attn.value.weight"),
    (f"{_Q}.attention.self.value.bias", f"{_C}.self_attn.value.bias"),
    (f"{_Q}.attention.output.dense.weight", f"{_C}.self_attn.dense.weight"),
    (f"{_Q}.attention.output.dense.bias", f"{_C}.self_attn.dense.bias"),
    (f"{_Q}.attention.output.LayerNorm.weight", f"{_C}.self_attn.norm.weight"),
    (f"{_Q}.attention.output.LayerNorm.bias", f"{_C}.self_attn.norm.bias"),
    (f"{_Q}.intermediate_query.dense.weight", f"{_C}.ffn.up.weight"),
    (f"{_Q}.intermediate_query.dense.bias", f"{_C}.ffn.up.bias"),
    (f"{_Q}.output_query.dense.weight", f"{_C}.ffn.down.weight"),
    (f"{_Q}.output_query.dense.bias", f"{_C}.ffn.down.bias"),
    (f"{_Q}.output_query.LayerNorm.weight", f"{_C}.ffn.norm.weight"),
    (f"{_Q}.output_query.LayerNorm.bias", f"{_C}.ffn.norm.bias"),
]
QFORMER_CROSS_LAYER = [
    (f"{_Q}.crossattention.self.query.weight", f"{_C}.cross_attn.query.weight"),
    (f"{_Q}.crossattention.self.query.bias", f"{_C}.cross_attn.query.bias"),
    (f"{_Q}.crossattention.self.key.weight", f"{_C}.cross_attn.key.weight"),
    (f"{_Q}.crossattention.self.key.bias", f"{_C}.cross_attn.key.bias"),
    (f"{_Q}.crossattention.self.value.weight", f"{_C}.cross_attn.value.weight"),
    (f"{_Q}.crossattention.self.value.bias", f"{_C}.cross_attn.value.bias"),
    (f"{_Q}.crossattention.output.dense.weight", f"{_C}.cross_attn.dense.weight"),
    (f"{_Q}.crossattention.output.dense.bias", f"{_C}.cross_attn.dense.bias"),
    (f"{_Q}.crossattention.output.LayerNorm.weight", f"{_C}.cross_attn.norm.weight"),
    (f"{_Q}.crossattention.output.LayerNorm.bias", f"{_C}.cross_attn.norm.bias"),
]
# Unused by TinyGPT-V (text branch, other heads of BLIP-2): ignored by rule, counted in the summary.
QFORMER_IGNORED = [
    r"Qformer\.cls\..*",
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*",
    r"Qformer\.bert\.embeddings\.position_ids",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",
    r"(visual_encoder|t5_proj|t5_model|opt_proj|opt_model|llm_proj|llm_model|vision_proj|text_proj|itm_head)\..*",
    r"temp",
]

# ---- Projections (stage checkpoints, single checkpoint) --------------------------------------
PROJECTION = [
    ("llama_proj.weight", "vision.proj1.weight"),
    ("llama_proj.bias", "vision.proj1.bias"),
    ("llama_proj2.weight", "vision.proj2.weight"),
    ("llama_proj2.bias", "vision.proj2.bias"),
]

# ---- Phi-2 language model ---------------------------------------------------------------------
# TinyGPT-V layout (its modeling_phi.py): fused query_key_value, rows ordered (heads, 3, head_dim).
_P = "model.layers.{i}"
_L = "language.layers.{i}"
PHI_GLOBAL = [
    ("model.embed_tokens.weight", "language.embed_tokens.weight"),
    ("model.final_layernorm.weight", "language.final_layernorm.weight"),
    ("model.final_layernorm.bias", "language.final_layernorm.bias"),
    ("lm_head.weight", "language.lm_head.weight"),
    ("lm_head.bias", "language.lm_head.bias"),
]
PHI_LAYER = [
    (f"{_P}.input_layernorm.weight", f"{_L}.input_layernorm.weight"),
    (f"{_P}.input_layernorm.bias", f"{_L}.input_layernorm.bias"),
    (f"{_P}.self_attn.query_key_value.weight", f"{_L}.self_attn.query_key_value.weight"),
    (f"{_P}.self_attn.query_key_value.bias", f"{_L}.self_attn.query_key_value.bias"),
    (f"{_P}.self_attn.q_layernorm.weight", f"{_L}.self_attn.q_layernorm.weight"),
    (f"{_P}.self_attn.q_layernorm.bias", f"{_L}.self_attn.q_layernorm.bias"),
    (f"{_P}.self_attn.k_layernorm.weight", f"{_L}.self_attn.k_layernorm.weight"),
    (f"{_P}.self_attn.k_layernorm.bias", f"{_L}.self_attn.k_layernorm.bias"),
    (f"{_P}.self_attn.dense.weight", f"{_L}.self_attn.dense.weight"),
    (f"{_P}.self_attn.dense.bias", f"{_L}.self_attn.dense.bias"),
    (f"{_P}.post_layernorm.weight", f"{_L}.post_layernorm.weight"),
    (f"{_P}.mlp.fc1.weight", f"{_L}.mlp.fc1.weight"),
    (f"{_P}.mlp.fc1.bias", f"{_L}.mlp.fc1.bias"),
    (f"{_P}.mlp.fc2.weight", f"{_L}.mlp.fc2.weight"),
    (f"{_P}.mlp.fc2.bias", f"{_L}.mlp.fc2.bias"),
]
# Hugging Face transformers layout: separate q/k/v projections, same names otherwise.
PHI_HF_QKV = [
    (f"{_P}.self_attn.q_proj.{{p}}", f"{_L}.self_attn.query_key_value.{{p}}", 0),
    (f"{_P}.self_attn.k_proj.{{p}}", f"{_L}.self_attn.query_key_value.{{p}}", 1),
    (f"{_P}.self_attn.v_proj.{{p}}", f"{_L}.self_attn.query_key_value.{{p}}", 2),
]
# Microsoft's original remote code (`phi-msft`): fused Wqkv with rows ordered (3, heads, head_dim).
PHI_MSFT_GLOBAL = [
    ("transformer.embd.wte.weight", "language.embed_tokens.weight"),
    ("lm_head.ln.weight", "language.final_layernorm.weight"),
    ("lm_head.ln.bias", "language.final_layernorm.bias"),
    ("lm_head.linear.weight", "language.lm_head.weight"),
    ("lm_head.linear.bias", "language.lm_head.bias"),
]
_M = "transformer.h.{i}"
PHI_MSFT_LAYER = [
    (f"{_M}.ln.weight", f"{_L}.input_layernorm.weight"),
    (f"{_M}.ln.bias", f"{_L}.input_layernorm.bias"),
    (f"{_M}.mixer.Wqkv.weight", f"{_L}.self_attn.query_key_value.weight"),
    (f"{_M}.mixer.Wqkv.bias", f"{_L}.self_attn.query_key_value.bias"),
    (f"{_M}.mixer.out_proj.weight", f"{_L}.self_attn.dense.weight"),
    (f"{_M}.mixer.out_proj.bias", f"{_L}.self_attn.dense.bias"),
    (f"{_M}.mlp.fc1.weight", f"{_L}.mlp.fc1.weight"),
    (f"{_M}.mlp.fc1.bias", f"{_L}.mlp.fc1.bias"),
    (f"{_M}.mlp.fc2.weight", f"{_L}.mlp.fc2.weight"),
    (f"{_M}.mlp.fc2.bias", f"{_L}.mlp.fc2.bias"),
]
PHI_IGNORED = [r".*rotary_emb\.inv_freq", r".*\.masked_bias", r".*attn\.bias"]

# TinyGPT-V's own norms, absent from a stock Phi-2 folder: they keep their initial values there.
ADDED_NORMS = [
    f"{_L}.self_attn.q_layernorm.weight",
    f"{_L}.self_attn.q_layernorm.bias",
    f"{_L}.self_attn.k_layernorm.weight",
    f"{_L}.self_attn.k_layernorm.bias",
    f"{_L}.post_layernorm.weight",
]
# Never in any TinyGPT-V checkpoint (the trainer saves weights only): always left at 0.
NEVER_SAVED = [f"{_L}.self_attn.q_layernorm.bias", f"{_L}.self_attn.k_layernorm.bias"]

# ---- Stage checkpoints: peft-wrapped language model ------------------------------------------
STAGE_LM_PREFIX = "llama_model.base_model.model."  # PeftModel.base_model(LoraModel).model(PhiForCausalLM)
# peft 0.2.0: `<module>.lora_A.weight`; newer: `<module>.lora_A.default.weight`, `<module>.base_layer.*`.
LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
BASE_LAYER_RE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")

# ---- The single checkpoint the project ships: official names, LoRA merged -------------------
SINGLE_LM_PREFIX = "llama_model."  # MiniGPT4.llama_model is the PhiForCausalLM
SINGLE_VISION_PREFIX = "visual_encoder."


def expand(table: Iterable[tuple[str, str]], layers: Iterable[int] | None = None) -> dict[str, str]:
    """Expand `{i}` rows for each layer index; returns official -> canonical."""
    out: dict[str, str] = {}
    for official, canonical in table:
        if "{i}" in official:
            for i in layers or ():
                out[official.format(i=i)] = canonical.format(i=i)
        else:
            out[official] = canonical
    return out


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)
