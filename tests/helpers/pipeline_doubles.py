"""Decoder stand-ins for pipeline tests (test code only): runtime/interfaces.py's `LanguageDecoder`.

`RefDecoder` runs the PyTorch reference language model with a KV cache, so pipeline logic (splicing,
cache reuse, multi-turn) is checked against the reference independently of the ggml decoder.
`ScriptedDecoder` emits a fixed token script, so stop conditions are exercised deterministically.
Both satisfy the protocol (tests/runtime/test_pipeline.py checks it), so `Pipeline(language=...)` takes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tinygptv_edge.runtime.config import PromptConfig
from tinygptv_edge.runtime.errors import ContextOverflowError
from tinygptv_edge.runtime.text.tokenizer import Tokenizer


class RefDecoder:
    """The PyTorch reference language model as a `LanguageDecoder` (runtime/interfaces.py)."""

    def __init__(self, model, tokenizer, prompt: PromptConfig | None = None, n_ctx: int | None = None):
        self.model, self.lm = model, model.language
        self.tokenizer: Tokenizer = tokenizer
        self.prompt: PromptConfig = prompt or model.cfg.prompt
        self.n_embd: int = model.cfg.language.hidden
        self.n_vocab: int = model.cfg.language.vocab_size
        self.n_ctx: int = n_ctx or model.cfg.language.max_positions
        self.image_tokens: int = model.cfg.num_image_tokens
        self.cache = self.lm.new_cache()
        self.closed = False
        self.evaluated = 0  # positions evaluated since creation (shows cache reuse)

    @property
    def n_past(self) -> int:
        return self.cache.length

    @torch.no_grad()
    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        return self.lm.embed(torch.tensor(list(ids), dtype=torch.long)).numpy()

    @torch.no_grad()
    def eval_embeddings(self, embeds: np.ndarray, all_logits: bool = False) -> np.ndarray:
        x = torch.from_numpy(np.asarray(embeds, dtype=np.float32))[None]  # (1, T, H)
        if self.n_past + x.shape[1] > self.n_ctx:
            raise ContextOverflowError(self.n_past, x.shape[1], self.n_ctx)
        self.evaluated += x.shape[1]
        logits = self.lm(x, self.cache)[0]  # (T, V)
        return (logits if all_logits else logits[-1]).numpy()

    def eval_tokens(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        return self.eval_embeddings(self.embed_tokens(ids), all_logits)

    def truncate(self, n_past: int) -> None:
        c = self.cache
        for i in range(len(c.keys)):
            if c.keys[i] is not None:
                c.keys[i], c.values[i] = c.keys[i][:, :, :n_past], c.values[i][:, :, :n_past]
        if n_past == 0:
            self.cache = self.lm.new_cache()

    def reset(self) -> None:
        self.truncate(0)

    def close(self) -> None:
        self.closed = True


class ScriptedDecoder(RefDecoder):
    """The reference's shapes and tokenizer, but the next token follows `script` (one-hot logits)."""

    def __init__(self, model, tokenizer, script: list[int], **kw):
        super().__init__(model, tokenizer, **kw)
        self.script = list(script)
        self.produced = 0

    def _next(self) -> np.ndarray:
        logits = np.zeros(self.n_vocab, dtype=np.float32)
        logits[self.script[min(self.produced, len(self.script) - 1)]] = 1.0
        self.produced += 1
        return logits

    def eval_embeddings(self, embeds: np.ndarray, all_logits: bool = False) -> np.ndarray:
        super().eval_embeddings(embeds, all_logits)
        return self._next()
