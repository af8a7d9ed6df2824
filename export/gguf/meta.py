"""GGUF key-value metadata of the language model: hyperparameters, tokenizer, prompt template.

Every key name comes from runtime/contract.py, which the runtime decoder reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter

from tinygptv_edge.export.gguf.quant import Level
from tinygptv_edge.runtime import contract as C
from tinygptv_edge.runtime.config import TinyGPTVConfig
from tinygptv_edge.runtime.errors import ExportError
from tinygptv_edge.runtime.text.tokenizer import Tokenizer

T = GGUFValueType
VALUE_TYPES = {"uint32": T.UINT32, "float32": T.FLOAT32}  # HParam.kind -> gguf-py value type


@dataclass(frozen=True)
class TokenizerTables:
    tokens: list[str]  # id-ordered, padded to the model's vocab size
    types: list[int]
    merges: list[str]  # "a b", rank order
    bos_id: int
    eos_id: int
    pad_id: int


def tokenizer_tables(tokenizer: Tokenizer, vocab_size: int) -> TokenizerTables:
    """Tokens, types and merges of a byte-level BPE, padded to `vocab_size` like llama.cpp's convert."""
    data = json.loads(tokenizer.hf.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer: expected a byte-level BPE model, got {model.get('type')!r}")
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ExportError(f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    tokens: list[str | None] = [None] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [C.GGUF_TOKEN_TYPE["normal"]] * n
    for added in data.get("added_tokens", []):
        kind = "control" if added.get("special") else "user_defined"
        types[added["id"]] = C.GGUF_TOKEN_TYPE[kind]
    for i in range(n):
        if tokens[i] is None:  # a hole in the ids: keep positions aligned
            tokens[i], types[i] = f"[PAD{i}]", C.GGUF_TOKEN_TYPE["unused"]
    for i in range(n, vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(C.GGUF_TOKEN_TYPE["unused"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eos = tokenizer.eos_id
    return TokenizerTables(tokens, types, merges, tokenizer.bos_id, eos, eos)  # Phi-2 pads with eos


def write_metadata(
    w: GGUFWriter,
    cfg: TinyGPTVConfig,
    tokenizer: Tokenizer,
    level: Level,
    sha256: dict[str, str],
    imatrix_info: dict[str, int | str] | None = None,
) -> None:
    """All key-value pairs; `general.architecture` is set by the writer itself."""
    G = C.GGUF_GENERAL_KEYS
    w.add_string(G["name"], cfg.name)
    w.add_uint32(G["file_type"], int(level.file_type))
    w.add_uint32(G["quantization_version"], GGML_QUANT_VERSION)
    w.add_string(G["level"], level.name)

    L = cfg.language
    for key, h in C.GGUF_HPARAMS.items():
        w.add_key_value(C.gguf_key(key), getattr(L, h.config), VALUE_TYPES[h.kind])

    K, P = C.TINYGPTV_KEYS, cfg.prompt
    w.add_uint32(K["format_version"], C.GGUF_FORMAT_VERSION)
    w.add_uint32(K["stage"], cfg.stage)
    w.add_uint32(K["image_tokens"], cfg.num_image_tokens)
    for field, key in C.PROMPT_KEYS.items():
        w.add_string(K[key], getattr(P, field))
    w.add_string(K["source_sha256"], json.dumps(sha256, sort_keys=True))

    tt = tokenizer_tables(tokenizer, L.vocab_size)
    TK = C.GGUF_TOKENIZER_KEYS
    w.add_string(TK["model"], C.GGUF_TOKENIZER_MODEL)
    w.add_string(TK["pre"], "gpt-2")
    w.add_array(TK["tokens"], tt.tokens)
    w.add_key_value(TK["token_type"], tt.types, T.ARRAY, sub_type=T.INT32)
    w.add_array(TK["merges"], tt.merges)
    w.add_uint32(TK["bos_id"], tt.bos_id)
    w.add_uint32(TK["eos_id"], tt.eos_id)
    w.add_uint32(TK["pad_id"], tt.pad_id)
    w.add_bool(TK["add_bos"], P.add_bos)  # the model's one record of it (PromptConfig.add_bos)
    w.add_bool(TK["add_eos"], False)

    for key, value in (imatrix_info or {}).items():
        if isinstance(value, int):
            w.add_uint32(f"quantize.imatrix.{key}", value)
        else:
            w.add_string(f"quantize.imatrix.{key}", value)
