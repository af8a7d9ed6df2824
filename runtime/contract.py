"""The contract between the exporters and the runtime, written down once.

Both the ONNX vision exporter and the GGUF language exporter import these names; the runtime reads
exactly these. Change them here and nowhere else.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# ONNX vision graph: pixel_values (batch, 3, S, S) float32 -> image_embeds (batch, Q, H) float32
# ---------------------------------------------------------------------------------------------
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_embeds"
BATCH_AXIS = "batch"
VISION_FILE_FP32 = "vision.fp32.onnx"
VISION_FILE_INT8 = "vision.int8.onnx"

# metadata_props keys (string values; lists and numbers JSON-encoded)
ONNX_META = {
    "image_size": "tinygptv.image_size",
    "mean": "tinygptv.preprocess.mean",
    "std": "tinygptv.preprocess.std",
    "resample": "tinygptv.preprocess.resample",
    "stage": "tinygptv.stage",
    "num_query_tokens": "tinygptv.num_query_tokens",
    "embed_dim": "tinygptv.embed_dim",
    "source_sha256": "tinygptv.source_sha256",  # JSON object: file name -> sha256
    "config": "tinygptv.config",  # JSON of TinyGPTVConfig
}

# ---------------------------------------------------------------------------------------------
# GGUF language model
# ---------------------------------------------------------------------------------------------
# Its own architecture name: stock llama.cpp has no graph for these norms and must refuse it.
GGUF_ARCH = "tinygptv-phi2"
LANGUAGE_FILE = "language.{ftype}.gguf"  # e.g. language.q4_0.gguf

# hyperparameter keys (llama.cpp naming, `{arch}` = GGUF_ARCH)
GGUF_KEYS = {
    "context_length": "{arch}.context_length",
    "embedding_length": "{arch}.embedding_length",
    "block_count": "{arch}.block_count",
    "feed_forward_length": "{arch}.feed_forward_length",
    "head_count": "{arch}.attention.head_count",
    "head_count_kv": "{arch}.attention.head_count_kv",
    "layer_norm_epsilon": "{arch}.attention.layer_norm_epsilon",  # input/final LayerNorm
    "qk_norm_epsilon": "{arch}.attention.qk_norm_epsilon",  # q/k LayerNorm over head_dim
    "layer_norm_rms_epsilon": "{arch}.attention.layer_norm_rms_epsilon",  # post-attention RMSNorm
    "rope_dimension_count": "{arch}.rope.dimension_count",
    "rope_freq_base": "{arch}.rope.freq_base",
    "vocab_size": "{arch}.vocab_size",
}

# TinyGPT-V specifics the runtime needs beside the weights (prompt template of the stage, image slots)
TINYGPTV_KEYS = {
    "stage": "tinygptv.stage",
    "image_tokens": "tinygptv.image_tokens",  # query tokens per image (32)
    "prompt_system": "tinygptv.prompt.system",
    "prompt_separator": "tinygptv.prompt.separator",
    "prompt_user_template": "tinygptv.prompt.user_template",  # has {question} and <ImageHere>
    "prompt_text_user_template": "tinygptv.prompt.text_user_template",
    "prompt_assistant_prefix": "tinygptv.prompt.assistant_prefix",
    "source_sha256": "tinygptv.source_sha256",  # JSON object: file name -> sha256
}

# tensor names (llama.cpp conventions); `{i}` is the block index
GGUF_TENSORS_GLOBAL = [
    "token_embd.weight",
    "output_norm.weight",
    "output_norm.bias",
    "output.weight",
    "output.bias",
]
GGUF_TENSORS_BLOCK = [
    "blk.{i}.attn_norm.weight",
    "blk.{i}.attn_norm.bias",
    "blk.{i}.attn_qkv.weight",  # rows ordered (3, heads, head_dim): q, then k, then v
    "blk.{i}.attn_qkv.bias",
    "blk.{i}.attn_q_norm.weight",  # (head_dim,)
    "blk.{i}.attn_q_norm.bias",
    "blk.{i}.attn_k_norm.weight",
    "blk.{i}.attn_k_norm.bias",
    "blk.{i}.attn_output.weight",
    "blk.{i}.attn_output.bias",
    "blk.{i}.attn_post_norm.weight",  # RMSNorm, weight only
    "blk.{i}.ffn_up.weight",
    "blk.{i}.ffn_up.bias",
    "blk.{i}.ffn_down.weight",
    "blk.{i}.ffn_down.bias",
]

# canonical (reference model) name -> GGUF name
CANONICAL_TO_GGUF_GLOBAL = {
    "language.embed_tokens.weight": "token_embd.weight",
    "language.final_layernorm.weight": "output_norm.weight",
    "language.final_layernorm.bias": "output_norm.bias",
    "language.lm_head.weight": "output.weight",
    "language.lm_head.bias": "output.bias",
}
CANONICAL_TO_GGUF_BLOCK = {
    "language.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "language.layers.{i}.input_layernorm.bias": "blk.{i}.attn_norm.bias",
    "language.layers.{i}.self_attn.query_key_value.weight": "blk.{i}.attn_qkv.weight",
    "language.layers.{i}.self_attn.query_key_value.bias": "blk.{i}.attn_qkv.bias",
    "language.layers.{i}.self_attn.q_layernorm.weight": "blk.{i}.attn_q_norm.weight",
    "language.layers.{i}.self_attn.q_layernorm.bias": "blk.{i}.attn_q_norm.bias",
    "language.layers.{i}.self_attn.k_layernorm.weight": "blk.{i}.attn_k_norm.weight",
    "language.layers.{i}.self_attn.k_layernorm.bias": "blk.{i}.attn_k_norm.bias",
    "language.layers.{i}.self_attn.dense.weight": "blk.{i}.attn_output.weight",
    "language.layers.{i}.self_attn.dense.bias": "blk.{i}.attn_output.bias",
    "language.layers.{i}.post_layernorm.weight": "blk.{i}.attn_post_norm.weight",
    "language.layers.{i}.mlp.fc1.weight": "blk.{i}.ffn_up.weight",
    "language.layers.{i}.mlp.fc1.bias": "blk.{i}.ffn_up.bias",
    "language.layers.{i}.mlp.fc2.weight": "blk.{i}.ffn_down.weight",
    "language.layers.{i}.mlp.fc2.bias": "blk.{i}.ffn_down.bias",
}


def gguf_key(name: str, arch: str = GGUF_ARCH) -> str:
    return GGUF_KEYS[name].format(arch=arch)


def gguf_tensor_names(n_layers: int) -> list[str]:
    return GGUF_TENSORS_GLOBAL + [t.format(i=i) for i in range(n_layers) for t in GGUF_TENSORS_BLOCK]


# ---------------------------------------------------------------------------------------------
# GGUF general metadata and the tokenizer inside the file (llama.cpp key names). Written here so
# the runtime reads them without the `gguf` package (an export-only dependency).
# ---------------------------------------------------------------------------------------------
GGUF_GENERAL_KEYS = {
    "architecture": "general.architecture",  # == GGUF_ARCH
    "name": "general.name",
    "file_type": "general.file_type",  # llama.cpp LlamaFileType of the level (uint32)
    "quantization_version": "general.quantization_version",  # GGML_QNT_VERSION (2)
    "level": "tinygptv.gguf.level",  # the level's name as requested: "Q4_0", "Q4_K_M", ...
}

GGUF_TOKENIZER_KEYS = {
    "model": "tokenizer.ggml.model",  # "gpt2": byte-level BPE
    "pre": "tokenizer.ggml.pre",  # pre-tokenizer regex family: "gpt-2"
    "tokens": "tokenizer.ggml.tokens",  # id-ordered; padded to vocab_size with "[PADn]" (type UNUSED)
    "token_type": "tokenizer.ggml.token_type",  # int32 per token: 1 normal, 3 control, 4 user, 5 unused
    "merges": "tokenizer.ggml.merges",  # "a b" strings, rank order
    "bos_id": "tokenizer.ggml.bos_token_id",
    "eos_id": "tokenizer.ggml.eos_token_id",
    "pad_id": "tokenizer.ggml.padding_token_id",
    "add_bos": "tokenizer.ggml.add_bos_token",  # true: BOS goes first, as in training
    "add_eos": "tokenizer.ggml.add_eos_token",  # false
}
GGUF_TOKENIZER_MODEL = "gpt2"
GGUF_TOKEN_TYPE = {"normal": 1, "control": 3, "user_defined": 4, "unused": 5}
