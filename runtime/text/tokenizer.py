"""Byte-level BPE tokenizer (GPT-2 / CodeGen / Phi-2 style) on the `tokenizers` library.

It can be read from a Hugging Face `tokenizer.json` or rebuilt from a vocabulary and merges (what a
GGUF file stores), and both give the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..checks import foreign, not_regular, path_arg, small_file
from ..errors import ConfigError

ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
    """Thin wrapper: `encode` adds no special tokens; `bos_id`/`eos_id` are explicit."""

    def __init__(self, hf: _HFTokenizer, bos_token: str = ENDOFTEXT, eos_token: str = ENDOFTEXT):
        self.hf = hf
        self.bos_token, self.eos_token = bos_token, eos_token
        bos, eos = hf.token_to_id(bos_token), hf.token_to_id(eos_token)
        if bos is None or eos is None:
            raise ConfigError(f"tokenizer has no id for bos {bos_token!r} or eos {eos_token!r}")
        self.bos_id, self.eos_id = bos, eos

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.json` (a file or the folder holding it, with tokenizer_config.json if any)."""
        path = path_arg(path, "tokenizer path")
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        kind = not_regular(file)
        if kind is not None or not file.is_file():
            raise ConfigError(f"no tokenizer.json at {file}" + (f": found {kind}" if kind else ""))
        small_file(file, "tokenizer")
        bos = eos = ENDOFTEXT
        config = folder / "tokenizer_config.json"
        if config.is_file():
            small_file(config, "tokenizer config")
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise ConfigError(f"cannot read {config}: {e}") from e
            if not isinstance(data, dict):
                raise ConfigError(f"{config}: expected a JSON object, got {type(data).__name__}")
            bos = _token_text(data.get("bos_token")) or bos
            eos = _token_text(data.get("eos_token")) or eos
        with foreign("tokenizers", f"cannot read tokenizer {file}", ConfigError):
            hf = _HFTokenizer.from_file(str(file))
        _check_unique_ids(hf, file)
        return cls(hf, bos, eos)

    @classmethod
    def from_vocab_merges(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        bos_id: int,
        eos_id: int,
    ) -> Tokenizer:
        """Rebuild from an id-ordered token list and 'a b' merge strings (GGUF `tokenizer.ggml.*`)."""
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
            raise ConfigError(f"vocabulary: expected unique tokens, {dup!r} appears more than once")
        # 'left right': pairs (the GGUF reader, language/decoder_model.py, checks each has one space)
        pairs = [cast(tuple[str, str], tuple(m.split(" ", 1))) for m in merges]
        hf = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([tokens[bos_id]] + ([tokens[eos_id]] if eos_id != bos_id else []))
        return cls(hf, tokens[bos_id], tokens[eos_id])

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        check_text(text)
        with foreign("tokenizers", "encoding text", ConfigError):
            return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        with foreign("tokenizers", "decoding token ids", ConfigError):
            return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)


def _check_unique_ids(hf: _HFTokenizer, file: Path) -> None:
    """Two tokens with one id: one of them could never be produced or exported (a GGUF holds one per id)."""
    vocab = hf.get_vocab(with_added_tokens=True)
    if len(set(vocab.values())) == len(vocab):
        return
    seen: dict[int, str] = {}
    for tok, i in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        if i in seen:
            raise ConfigError(f"{file}: expected one token per id, found {seen[i]!r} and {tok!r} at id {i}")
        seen[i] = tok


def check_text(text: object, what: str = "text") -> str:
    """`text` if it is a str that UTF-8 can encode; argv and stdin decoded from non-UTF-8 bytes carry
    lone surrogates (Python's surrogateescape), which no tokenizer accepts."""
    if not isinstance(text, str):
        raise ConfigError(f"{what}: expected a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad: bytes | str
        try:
            bad = text[e.start : e.end].encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            bad = text[e.start : e.end]
        raise ConfigError(
            f"{what}: expected UTF-8 text, found the undecodable byte(s) {bad!r} at character {e.start}"
        ) from None
    return text


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None
