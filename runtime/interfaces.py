"""What the pipeline layer needs of its two models, as `typing.Protocol`s (checked by mypy in `make lint`).

    KVDecoder           what PrefixCache (runtime/prefix_cache.py) calls: evaluate, embed, truncate, reset
      +- KVSnapshots    optional: copy KV rows out and back (PrefixCache's snapshots; found by hasattr)
      +- LanguageDecoder  what Pipeline (runtime/pipeline.py) also reads: tokenizer, prompt, sizes
    VisionModel         what Pipeline needs of the vision half: metadata, `embed`, `release`, `close`

runtime/language/decoder.py's `Decoder` and runtime/vision/encoder.py's `VisionEncoder` are the
implementations; the test doubles (tests/helpers/pipeline_doubles.py, tests/runtime/test_prefix_cache.py)
satisfy the same protocols. The protocols name only what is called: a decoder may take more arguments
(the ggml `Decoder`'s `all_logits=`), as long as these calls work. docs/decoder.md describes the calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .config import PreprocessConfig, PromptConfig
from .text.tokenizer import Tokenizer


@runtime_checkable
class KVDecoder(Protocol):
    """A language model with a KV cache that calls append to (positions 0..n-1 held)."""

    def eval_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """Append token ids to the cache; (n_vocab,) float32 logits of the last one."""
        ...

    def eval_embeddings(self, embeds: np.ndarray) -> np.ndarray:
        """Append (T, n_embd) float32 rows (image embeddings, or tokens' rows); logits as `eval_tokens`."""
        ...

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """(T, n_embd) float32 input rows of token ids (nothing is appended)."""
        ...

    def truncate(self, n_past: int) -> None:
        """Forget cache positions >= n_past."""
        ...

    def reset(self) -> None:
        """Forget every position (may raise: the prefix cache then drops a reopenable decoder)."""
        ...

    def close(self) -> None:
        """Free the model (further calls are refused)."""
        ...


@runtime_checkable
class KVSnapshots(KVDecoder, Protocol):
    """A KVDecoder whose cache rows can be copied out and written back (PrefixCache's snapshots)."""

    @property
    def kv_row_bytes(self) -> int:
        """Bytes one position takes in the cache (K and V, every layer)."""
        ...

    def read_kv(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Positions [start, stop) as uint8 (n_layer, 2, stop - start, row bytes), in `out`'s first bytes
        when given (a flat uint8 buffer)."""
        ...

    def write_kv(self, rows: np.ndarray, start: int) -> None:
        """Write rows from `read_kv` at positions start.., the cache then ending after them."""
        ...


@runtime_checkable
class LanguageDecoder(KVDecoder, Protocol):
    """What Pipeline reads besides the KVDecoder calls (runtime/language/decoder.py's `Decoder`)."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def prompt(self) -> PromptConfig:
        """The prompt template the model was trained with."""
        ...

    @property
    def n_embd(self) -> int: ...

    @property
    def n_ctx(self) -> int:
        """Positions the KV cache holds at most."""
        ...

    @property
    def image_tokens(self) -> int:
        """Embedding rows one image fills."""
        ...


@runtime_checkable
class VisionModel(Protocol):
    """What Pipeline needs of the vision half (runtime/vision/encoder.py's `VisionEncoder`)."""

    @property
    def path(self) -> Path:
        """The graph's file (its bytes key the on-disk image cache)."""
        ...

    @property
    def preprocess_cfg(self) -> PreprocessConfig: ...

    @property
    def num_query_tokens(self) -> int:
        """Embedding rows per image (Q)."""
        ...

    @property
    def embed_dim(self) -> int:
        """Embedding width (H), the decoder's n_embd."""
        ...

    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 preprocessed pixels -> (B, Q, H) float32 embeddings."""
        ...

    def release(self) -> None:
        """Free what can be reloaded on the next `embed` (low-memory mode)."""
        ...

    def close(self) -> None: ...
