"""What the decoder reads from a `tinygptv-phi2` GGUF: hyperparameters, tensor table, tokenizer, prompt.

Everything is checked here, in Python, before a byte reaches ggml: the architecture, the presence and
kind of every key, the presence, shape and type of every tensor (runtime/contract.py names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken

from ..config import PromptConfig
from ..contract import (
    GGUF_ARCH,
    GGUF_FORMAT_VERSION,
    GGUF_HPARAMS,
    GGUF_TOKEN_TYPE,
    GGUF_TOKENIZER_KEYS,
    LANGUAGE_TENSORS,
    PROMPT_KEYS,
    TINYGPTV_KEYS,
    WEIGHT_ROLES,
    check_format_version,
    gguf_key,
    language_shapes,
    language_tensors,
)
from ..errors import (
    ConfigError,
    GGUFModelError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from ..text.tokenizer import Tokenizer
from .ggml_types import WEIGHT_TYPES
from .gguf_file import BOOL, FLOAT_TYPES, INT_TYPES, STRING, Field, GGUFFile, TensorInfo

TOKEN_CONTROL, TOKEN_USER_DEFINED = GGUF_TOKEN_TYPE["control"], GGUF_TOKEN_TYPE["user_defined"]

MAX_CONTEXT = 1 << 20  # positions: far above any Phi-2 (2048); a larger context_length is corrupt


@dataclass(frozen=True)
class HParams:
    """Language model sizes as the GGUF states them (`{arch}.*` keys)."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    n_ctx_train: int
    n_rot: int
    rope_base: float
    eps_norm: float  # input / final LayerNorm
    eps_qk: float  # q/k LayerNorm over head_dim
    eps_rms: float  # post-attention RMSNorm

    def __post_init__(self) -> None:
        for name in ("n_vocab", "n_embd", "n_layer", "n_head", "n_ff", "n_ctx_train"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"HParams.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"HParams: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_rot <= 0 or self.n_rot % 2 or self.n_rot > self.head_dim:
            raise ConfigError(f"HParams: rope dims {self.n_rot} must be even and in 2..{self.head_dim}")
        if not 0 < self.rope_base < math.inf:
            raise ConfigError(f"HParams: rope freq_base: expected a finite number > 0, got {self.rope_base}")
        if self.n_ctx_train > MAX_CONTEXT:
            raise ConfigError(
                f"HParams.n_ctx_train (context_length): expected at most {MAX_CONTEXT}, "
                f"got {self.n_ctx_train}"
            )
        for name in ("eps_norm", "eps_qk", "eps_rms"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"HParams.{name}: expected 0 < eps < 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> ggml shape (ne0 first = input features of a matmul weight)."""
        shapes = language_shapes(self.n_layer, self.n_embd, self.n_ff, self.n_vocab, self.n_head)
        return {name: shape[::-1] for name, shape in shapes.items()}


def _get(gf: GGUFFile, key: str, kinds: tuple[int, ...], what: str):
    f = gf.fields.get(key)
    if f is None:
        raise GGUFModelError(f"{gf.path}: missing metadata key {key!r} ({what})")
    if f.type not in kinds or f.item_type is not None:
        raise GGUFModelError(f"{gf.path}: key {key!r}: expected {what}, got {f.type_name}")
    return f.value


def read_format_version(gf: GGUFFile) -> int:
    """The file's format version (1 when written before versions); FormatVersionError when too new."""
    key = TINYGPTV_KEYS["format_version"]
    found = None
    if key in gf.fields:
        found = int(_get(gf, key, INT_TYPES, "an integer"))
        if found < 1:
            raise GGUFModelError(f"{gf.path}: {key}: expected a format version >= 1, got {found}")
    return check_format_version(found, GGUF_FORMAT_VERSION, gf.path)


def read_hparams(gf: GGUFFile) -> HParams:
    arch = gf.fields.get("general.architecture")
    if arch is None or arch.type != STRING:
        raise GGUFModelError(f"{gf.path}: missing string key 'general.architecture'")
    if arch.value != GGUF_ARCH:
        raise GGUFModelError(f"{gf.path}: architecture: expected {GGUF_ARCH!r}, got {arch.value!r}")
    read_format_version(gf)  # before anything a newer layout may have changed

    values: dict[str, Any] = {}  # int or float by its HParams field
    for name, h in GGUF_HPARAMS.items():
        if h.kind == "uint32":
            values[name] = int(_get(gf, gguf_key(name), INT_TYPES, "an integer"))
        else:
            values[name] = float(_get(gf, gguf_key(name), FLOAT_TYPES, "a float"))
    n_head, n_head_kv = values["head_count"], values["head_count_kv"]
    try:
        hp = HParams(**{h.hparams: values[name] for name, h in GGUF_HPARAMS.items() if h.hparams})
    except ConfigError as e:
        raise GGUFModelError(f"{gf.path}: {e}") from e
    if n_head_kv != n_head:
        raise GGUFModelError(
            f"{gf.path}: head_count_kv: expected {n_head} (no GQA in Phi-2), got {n_head_kv}"
        )
    _check_block_count(gf, hp.n_layer)
    return hp


def _check_block_count(gf: GGUFFile, n_layer: int) -> None:
    """block_count against the tensors the file holds (each block needs at least one), before the
    tensor table, the graph and the cache are sized by it; a smaller shortfall is reported by name."""
    per_block = sum(t.per_block for t in LANGUAGE_TENSORS)
    most = max(0, len(gf.tensors) - (len(LANGUAGE_TENSORS) - per_block))
    if n_layer > most:
        raise GGUFModelError(
            f"{gf.path}: {gguf_key('block_count')}: expected at most {most} (the file holds "
            f"{len(gf.tensors)} tensors, {per_block} per block), got {n_layer}"
        )


def check_tensors(gf: GGUFFile, hp: HParams) -> dict[str, TensorInfo]:
    """Every contract tensor present with its shape; matmul weights of a supported type, the rest F32."""
    shapes = hp.tensor_shapes()
    weights = {t.gguf for t in language_tensors(hp.n_layer) if t.role in WEIGHT_ROLES}
    missing = [n for n in shapes if n not in gf.tensors]
    if missing:
        raise MissingKeysError(missing, str(gf.path))
    extra = [n for n in gf.tensors if n not in shapes]
    if extra:
        raise UnexpectedKeysError(extra, str(gf.path))
    for name, shape in shapes.items():
        t = gf.tensors[name]
        if t.shape != shape:
            raise ShapeMismatchError(name, shape, t.shape, str(gf.path))
        allowed = WEIGHT_TYPES if name in weights else ("F32",)
        if t.type.name not in allowed:
            raise GGUFModelError(f"{gf.path}: tensor {name!r}: expected type in {allowed}, got {t.type.name}")
    return dict(gf.tensors)


def read_tokenizer(gf: GGUFFile, n_vocab: int) -> Tokenizer:
    model = _get(gf, "tokenizer.ggml.model", (STRING,), "a string")
    if model != "gpt2":
        raise GGUFModelError(f"{gf.path}: tokenizer.ggml.model: expected 'gpt2', got {model!r}")
    tokens, merges = _strings(gf, "tokenizer.ggml.tokens"), _strings(gf, "tokenizer.ggml.merges")
    if not 0 < len(tokens.value) <= n_vocab:
        raise GGUFModelError(
            f"{gf.path}: tokenizer.ggml.tokens: expected 1..{n_vocab} tokens, got {len(tokens.value)}"
        )
    _check_unique(gf, tokens.value)
    bos = int(_get(gf, "tokenizer.ggml.bos_token_id", INT_TYPES, "an integer"))
    eos = int(_get(gf, "tokenizer.ggml.eos_token_id", INT_TYPES, "an integer"))
    for name, v in (("bos", bos), ("eos", eos)):
        if not 0 <= v < len(tokens.value):
            raise GGUFModelError(f"{gf.path}: {name} id {v} is outside the vocabulary of {len(tokens.value)}")
    bad = next((m for m in merges.value if m.count(" ") != 1), None)
    if bad is not None:
        raise GGUFModelError(f"{gf.path}: tokenizer merge {bad!r}: expected 'left right'")
    types = gf.fields.get("tokenizer.ggml.token_type")
    if types is not None and (types.item_type not in INT_TYPES or len(types.value) != len(tokens.value)):
        raise GGUFModelError(
            f"{gf.path}: tokenizer.ggml.token_type: expected {len(tokens.value)} integers, "
            f"got {types.type_name} of length {len(types.value) if types.item_type is not None else 1}"
        )
    try:
        tok = Tokenizer.from_vocab_merges(tokens.value, merges.value, bos, eos)
        if types is not None:  # added tokens match whole before BPE, as in the source tokenizer.json
            added = [
                AddedToken(tokens.value[i], special=bool(t == TOKEN_CONTROL), normalized=False)
                for i, t in enumerate(types.value.tolist())
                if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and i not in (bos, eos)
            ]
            tok.hf.add_tokens(added)
        return tok
    except Exception as e:  # the tokenizers library raises its own exception types
        raise GGUFModelError(f"{gf.path}: cannot rebuild the tokenizer: {e}") from e


def _strings(gf: GGUFFile, key: str) -> Field:
    """The array of strings under `key` (GGUFModelError when missing or another type)."""
    f = gf.fields.get(key)
    if f is None or f.item_type != STRING:
        got = "nothing" if f is None else f.type_name
        raise GGUFModelError(f"{gf.path}: {key}: expected an array of strings, got {got}")
    return f


def _check_unique(gf: GGUFFile, tokens: list[str]) -> None:
    """Two ids with the same text would make one of them unreachable and shift the ids built from it."""
    if len(set(tokens)) == len(tokens):
        return
    first: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in first:
            raise GGUFModelError(
                f"{gf.path}: tokenizer.ggml.tokens: expected unique tokens, "
                f"found {t!r} at ids {first[t]} and {i}"
            )
        first[t] = i


def read_prompt(gf: GGUFFile) -> PromptConfig:
    values = {
        field: _get(gf, TINYGPTV_KEYS[key], (STRING,), "a string") for field, key in PROMPT_KEYS.items()
    }
    # BOS before the first turn is a model property; files without the key predate it and had one
    key = GGUF_TOKENIZER_KEYS["add_bos"]
    add_bos = bool(_get(gf, key, (BOOL,), "a bool")) if key in gf.fields else True
    try:
        return PromptConfig(**values, add_bos=add_bos)
    except ConfigError as e:
        raise GGUFModelError(f"{gf.path}: prompt keys: {e}") from e


def read_image_tokens(gf: GGUFFile) -> int:
    n = int(_get(gf, TINYGPTV_KEYS["image_tokens"], INT_TYPES, "an integer"))
    if n <= 0:
        raise GGUFModelError(f"{gf.path}: {TINYGPTV_KEYS['image_tokens']}: expected > 0, got {n}")
    return n
