"""Prompt -> token segments with image slots, as TinyGPT-V's `get_context_emb` builds them.

The prompt text is split at `<ImageHere>`; each text piece is tokenized on its own and the image
embeddings go between the pieces. Whether a BOS goes before the first piece is a property of the
model (`PromptConfig.add_bos`, the GGUF's `tokenizer.ggml.add_bos_token`): the project's training
prepends one (as `minigpt_base.py` does in training); the official inference adds none.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import IMAGE_PLACEHOLDER
from ..errors import ConfigError
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Segments:
    """`texts[i]` token ids, with image `i` after text `i`: len(texts) == n_images + 1."""

    texts: tuple[tuple[int, ...], ...]

    @property
    def n_images(self) -> int:
        return len(self.texts) - 1

    def length(self, image_tokens: int) -> int:
        return sum(len(t) for t in self.texts) + self.n_images * image_tokens


def split_prompt(prompt: str, tokenizer: Tokenizer, n_images: int, *, add_bos: bool) -> Segments:
    """Tokenize `prompt` around its `<ImageHere>` slots; the slot count must equal `n_images`.

    `add_bos`: the model's `PromptConfig.add_bos` on a conversation's first turn, False after it.
    """
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != n_images:
        raise ConfigError(
            f"prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} slot(s) but {n_images} image(s) were given"
        )
    texts = [tokenizer.encode(p) if p else [] for p in pieces]
    if add_bos:
        texts[0] = [tokenizer.bos_id, *texts[0]]
    return Segments(tuple(tuple(t) for t in texts))
