"""The whole TinyGPT-V reference: vision tower + modified Phi-2, prompt splicing, greedy decoding.

Every export is checked against this model. It runs in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tinygptv_edge.runtime.config import TinyGPTVConfig
from tinygptv_edge.runtime.text.prompt import Segments, split_prompt
from tinygptv_edge.runtime.text.tokenizer import Tokenizer

from .phi import KVCache, PhiModel
from .vision import VisionTower


class TinyGPTV(nn.Module):
    def __init__(self, cfg: TinyGPTVConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, cfg.qformer, cfg.projection)
        self.language = PhiModel(cfg.language)

    # -- vision --------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, Q, H) image embeddings."""
        S = self.cfg.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"expected pixel_values (B, 3, {S}, {S}), got {tuple(pixel_values.shape)}")
        return self.vision(pixel_values.float())

    # -- prompt --------------------------------------------------------------------------------
    def splice(self, segments: Segments, image_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token embeddings of each text piece with image embeddings (Q, H) between: (1, T, H)."""
        if len(image_embeds) != segments.n_images:
            raise ValueError(f"expected {segments.n_images} image embedding(s), got {len(image_embeds)}")
        parts = []
        for i, ids in enumerate(segments.texts):
            if ids:
                parts.append(self.language.embed(torch.tensor(ids, dtype=torch.long)))
            if i < len(image_embeds):
                parts.append(image_embeds[i].reshape(-1, self.cfg.language.hidden).float())
        return torch.cat(parts, dim=0)[None]

    def prompt_embeds(
        self, prompt: str, tokenizer: Tokenizer, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        images = [] if pixel_values is None else list(self.embed_image(pixel_values))
        segments = split_prompt(prompt, tokenizer, len(images), add_bos=self.cfg.prompt.add_bos)
        return self.splice(segments, images)

    # -- decoding ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        tokenizer: Tokenizer | None = None,
        stop_text: str | None = None,
        cache: KVCache | None = None,
    ) -> list[int]:
        """Greedy decoding with a KV cache from (1, T, H) embeddings.

        Stops after a token in `stop_ids` (not returned), or once the decoded text contains
        `stop_text` (the tokens are returned up to and including the one that completed it).
        """
        cache = cache if cache is not None else self.language.new_cache()
        logits = self.language(inputs_embeds, cache)[:, -1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax(-1))
            if token in stop_ids:
                break
            out.append(token)
            if stop_text and tokenizer is not None and stop_text in tokenizer.decode(out):
                break
            logits = self.language(self.language.embed(torch.tensor([[token]])), cache)[:, -1]
        return out

    @torch.no_grad()
    def answer_ids(
        self,
        question: str,
        tokenizer: Tokenizer,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int = 32,
    ) -> list[int]:
        """Greedy first-turn answer tokens with the model's prompt (template, BOS rule); the tokens
        that complete the separator are included when it is reached."""
        prompt = self.cfg.prompt.first_turn(question, with_image=pixel_values is not None)
        embeds = self.prompt_embeds(prompt, tokenizer, pixel_values)
        return self.generate(
            embeds, max_new_tokens, (tokenizer.eos_id,), tokenizer, self.cfg.prompt.separator
        )

    def answer(
        self,
        question: str,
        tokenizer: Tokenizer,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int = 32,
    ) -> str:
        """One first-turn answer with the stage's prompt template, greedy, cut at the separator."""
        return self.answer_text(self.answer_ids(question, tokenizer, pixel_values, max_new_tokens), tokenizer)

    def answer_text(self, ids: Sequence[int], tokenizer: Tokenizer) -> str:
        """Answer tokens -> text cut at the separator."""
        return tokenizer.decode(list(ids)).split(self.cfg.prompt.separator)[0].strip()
