"""The contract between the exporters and the runtime, written down once.

Both the ONNX vision exporter and the GGUF language exporter import these names; the runtime reads
exactly these. Change them here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import FormatVersionError

# ---------------------------------------------------------------------------------------------
# FORMAT VERSIONS of the two files, stored in their metadata (ONNX_META / TINYGPTV_KEYS
# "format_version"). A runtime reads files up to its own versions and refuses newer ones instead of
# misreading them. Bump one when a reader of the previous version would misread a file written now
# (a renamed or re-laid-out tensor, a changed key meaning); an added optional key needs no bump.
# A file without the key was written before versions existed: it is version UNVERSIONED.
# ---------------------------------------------------------------------------------------------
ONNX_FORMAT_VERSION = 1
GGUF_FORMAT_VERSION = 1
UNVERSIONED = 1


def check_format_version(found: int | None, supported: int, path: object) -> int:
    """The file's format version (`found`; None: no key, so UNVERSIONED), refused when above `supported`."""
    version = UNVERSIONED if found is None else found
    if version > supported:
        raise FormatVersionError(str(path), version, supported)
    return version


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
    "format_version": "tinygptv.format_version",  # integer as a string; see FORMAT VERSIONS below
}

# ---------------------------------------------------------------------------------------------
# GGUF language model
# ---------------------------------------------------------------------------------------------
# Its own architecture name: stock llama.cpp has no graph for these norms and must refuse it.
GGUF_ARCH = "tinygptv-phi2"
LANGUAGE_FILE = "language.{ftype}.gguf"  # e.g. language.q4_0.gguf


@dataclass(frozen=True)
class HParam:
    """One hyperparameter key: what the exporter writes from and what the decoder reads it into."""

    key: str  # llama.cpp naming, `{arch}` = GGUF_ARCH
    config: str  # the LanguageConfig attribute written
    hparams: str  # the decoder's HParams field read into ("": only checked, see decoder_model.py)
    kind: str  # GGUF value type: "uint32" or "float32"


# hyperparameters, in the file's order
H = HParam
GGUF_HPARAMS = {
    "context_length": H("{arch}.context_length", "max_positions", "n_ctx_train", "uint32"),
    "embedding_length": H("{arch}.embedding_length", "hidden", "n_embd", "uint32"),
    "block_count": H("{arch}.block_count", "layers", "n_layer", "uint32"),
    "feed_forward_length": H("{arch}.feed_forward_length", "intermediate", "n_ff", "uint32"),
    "head_count": H("{arch}.attention.head_count", "heads", "n_head", "uint32"),
    "head_count_kv": H("{arch}.attention.head_count_kv", "heads", "", "uint32"),  # == head_count
    # input/final LayerNorm; q/k LayerNorm over head_dim; post-attention RMSNorm
    "layer_norm_epsilon": H("{arch}.attention.layer_norm_epsilon", "layer_norm_eps", "eps_norm", "float32"),
    "qk_norm_epsilon": H("{arch}.attention.qk_norm_epsilon", "qk_norm_eps", "eps_qk", "float32"),
    "layer_norm_rms_epsilon": H(
        "{arch}.attention.layer_norm_rms_epsilon", "post_norm_eps", "eps_rms", "float32"
    ),
    "rope_dimension_count": H("{arch}.rope.dimension_count", "rotary_dim", "n_rot", "uint32"),
    "rope_freq_base": H("{arch}.rope.freq_base", "rope_theta", "rope_base", "float32"),
    "vocab_size": H("{arch}.vocab_size", "vocab_size", "n_vocab", "uint32"),
}
del H
GGUF_KEYS = {name: h.key for name, h in GGUF_HPARAMS.items()}

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
    "format_version": "tinygptv.format_version",  # uint32; see FORMAT VERSIONS below
}
PROMPT_KEYS = {  # PromptConfig field -> its TINYGPTV_KEYS entry (strings), in the file's order
    "system": "prompt_system",
    "separator": "prompt_separator",
    "user_template": "prompt_user_template",
    "text_user_template": "prompt_text_user_template",
    "assistant_prefix": "prompt_assistant_prefix",
}

# ---------------------------------------------------------------------------------------------
# The language tensors: one line each. Every list of names, shapes and roles (exporter, reader,
# importance matrix, k-quant dispatch, tests, benchmarks) is derived from this table.
# ---------------------------------------------------------------------------------------------
# A shape is written in sizes of the model, numpy/torch order (rows, n_per_row); ggml's order is the
# reverse. E = n_embd, F = n_ff, V = n_vocab, D = head_dim (n_embd / n_head); "3E" = 3 * E.
# Roles: what the runtime does with the tensor, and so which ggml types it may have.
EMBEDDING = "embedding"  # rows looked up by token id (ggml_get_rows); stored like a weight, no imatrix
MATMUL = "matmul"  # a weight multiplied by activations: quantized, imatrix, k-quant kernel
NORM = "norm"  # a norm's scale or shift: F32
BIAS = "bias"  # added after a matmul: F32
ROLES = (EMBEDDING, MATMUL, NORM, BIAS)
WEIGHT_ROLES = (EMBEDDING, MATMUL)  # 2-D, stored at the level's type; the rest are F32


@dataclass(frozen=True)
class LanguageTensor:
    """One GGUF tensor; `{i}` in the names is the block index (blk.{i}. <- language.layers.{i}.)."""

    gguf: str  # llama.cpp conventions
    canonical: str  # the reference model's state-dict name
    shape: tuple[str, ...]
    role: str
    qkv: bool = False  # fused q/k/v rows: (heads, 3, head_dim) in the model, (3, heads, head_dim) in GGUF

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"{self.gguf}: role {self.role!r} is not one of {ROLES}")
        if ("{i}" in self.gguf) != ("{i}" in self.canonical):
            raise ValueError(f"{self.gguf}: GGUF and canonical names disagree on being per block")
        if (self.role in WEIGHT_ROLES) != (len(self.shape) == 2):
            raise ValueError(f"{self.gguf}: a {self.role} tensor with shape {self.shape}")

    @property
    def per_block(self) -> bool:
        return "{i}" in self.gguf

    def at(self, i: int) -> LanguageTensor:
        """This block tensor with the block index filled in."""
        return replace(self, gguf=self.gguf.format(i=i), canonical=self.canonical.format(i=i))

    def dims(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape in numpy order for `sizes` {"E": n_embd, "F": n_ff, "V": n_vocab, "D": head_dim}."""
        return tuple(int(d[:-1] or 1) * sizes[d[-1]] for d in self.shape)


T, _L = LanguageTensor, "language.layers.{i}."
LANGUAGE_TENSORS = (
    T("token_embd.weight", "language.embed_tokens.weight", ("V", "E"), EMBEDDING),
    T("output_norm.weight", "language.final_layernorm.weight", ("E",), NORM),
    T("output_norm.bias", "language.final_layernorm.bias", ("E",), NORM),
    T("output.weight", "language.lm_head.weight", ("V", "E"), MATMUL),
    T("output.bias", "language.lm_head.bias", ("V",), BIAS),
    T("blk.{i}.attn_norm.weight", _L + "input_layernorm.weight", ("E",), NORM),
    T("blk.{i}.attn_norm.bias", _L + "input_layernorm.bias", ("E",), NORM),
    T("blk.{i}.attn_qkv.weight", _L + "self_attn.query_key_value.weight", ("3E", "E"), MATMUL, qkv=True),
    T("blk.{i}.attn_qkv.bias", _L + "self_attn.query_key_value.bias", ("3E",), BIAS, qkv=True),
    T("blk.{i}.attn_q_norm.weight", _L + "self_attn.q_layernorm.weight", ("D",), NORM),
    T("blk.{i}.attn_q_norm.bias", _L + "self_attn.q_layernorm.bias", ("D",), NORM),
    T("blk.{i}.attn_k_norm.weight", _L + "self_attn.k_layernorm.weight", ("D",), NORM),
    T("blk.{i}.attn_k_norm.bias", _L + "self_attn.k_layernorm.bias", ("D",), NORM),
    T("blk.{i}.attn_output.weight", _L + "self_attn.dense.weight", ("E", "E"), MATMUL),
    T("blk.{i}.attn_output.bias", _L + "self_attn.dense.bias", ("E",), BIAS),
    T("blk.{i}.attn_post_norm.weight", _L + "post_layernorm.weight", ("E",), NORM),  # RMSNorm: no bias
    T("blk.{i}.ffn_up.weight", _L + "mlp.fc1.weight", ("F", "E"), MATMUL),
    T("blk.{i}.ffn_up.bias", _L + "mlp.fc1.bias", ("F",), BIAS),
    T("blk.{i}.ffn_down.weight", _L + "mlp.fc2.weight", ("E", "F"), MATMUL),
    T("blk.{i}.ffn_down.bias", _L + "mlp.fc2.bias", ("E",), BIAS),
)
del T, _L


def gguf_key(name: str, arch: str = GGUF_ARCH) -> str:
    return GGUF_KEYS[name].format(arch=arch)


def language_tensors(n_layers: int) -> list[LanguageTensor]:
    """Every tensor of an `n_layers` model, block indices filled in, in the file's order."""
    glob = [t for t in LANGUAGE_TENSORS if not t.per_block]
    block = [t for t in LANGUAGE_TENSORS if t.per_block]
    return glob + [t.at(i) for i in range(n_layers) for t in block]


def gguf_tensor_names(n_layers: int) -> list[str]:
    return [t.gguf for t in language_tensors(n_layers)]


def language_shapes(
    n_layers: int, n_embd: int, n_ff: int, n_vocab: int, n_head: int, *, canonical: bool = False
) -> dict[str, tuple[int, ...]]:
    """Name (GGUF, or canonical) -> shape in numpy order (rows, n_per_row), in the file's order."""
    sizes = {"E": n_embd, "F": n_ff, "V": n_vocab, "D": n_embd // n_head}
    return {(t.canonical if canonical else t.gguf): t.dims(sizes) for t in language_tensors(n_layers)}


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
    "add_bos": "tokenizer.ggml.add_bos_token",  # the model's BOS rule (PromptConfig.add_bos)
    "add_eos": "tokenizer.ggml.add_eos_token",  # false
}
GGUF_TOKENIZER_MODEL = "gpt2"
GGUF_TOKEN_TYPE = {"normal": 1, "control": 3, "user_defined": 4, "unused": 5}
