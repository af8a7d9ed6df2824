"""The synthetic VQA set as tensors for training, and the batched teacher-forced forward.

Every question becomes the model's real first-turn prompt, split at `<ImageHere>` as
`runtime/text/prompt.py` does (BOS first: the project trains its models with `prompt.add_bos` true):

    [bos "<system>###Human: <Img>"] [Q image embeddings] ["</Img> {question}###Assistant: "] [answer "###"]
     prefix: the same for every row  from the vision tower  suffix                             target

The prefix is run once per batch and its keys/values are broadcast to every row through the
decoder's KV cache; the rows are right-padded (the decoder is causal, so padding never changes a
real position) and the loss covers the answer tokens only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tinygptv_edge.export.model.tinygptv import TinyGPTV
from tinygptv_edge.export.train.vqa import Sample
from tinygptv_edge.runtime.config import TinyGPTVConfig
from tinygptv_edge.runtime.errors import ConfigError
from tinygptv_edge.runtime.text.prompt import split_prompt
from tinygptv_edge.runtime.text.tokenizer import Tokenizer
from tinygptv_edge.runtime.vision.preprocess import preprocess

IGNORE = -100


@dataclass
class Encoded:
    """One split: preprocessed images and tokenized questions (row i asks about image `image[i]`)."""

    prefix: list[int]  # bos + the prompt text before the image: shared by every row
    pixels: torch.Tensor  # (N_images, 3, S, S) normalised
    image: torch.Tensor  # (N_rows,) long
    suffix: list[list[int]]  # prompt text after the image
    target: list[list[int]]  # answer + separator
    qtype: list[str]
    answer: list[str]

    def rows_of(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(torch.isin(self.image, images)).flatten()


def encode_samples(samples: Iterable[Sample], cfg: TinyGPTVConfig, tokenizer: Tokenizer) -> Encoded:
    prompt = cfg.prompt
    prefix: list[int] | None = None
    pixels, image, suffix, target, qtype, answer = [], [], [], [], [], []
    questions: dict[str, list[int]] = {}  # the same questions recur: tokenize each once
    answers: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        pixels.append(preprocess(s.image, cfg.preprocess))
        for qa in s.qas:
            if qa.question not in questions:
                seg = split_prompt(
                    prompt.first_turn(qa.question), tokenizer, n_images=1, add_bos=prompt.add_bos
                )
                if prefix is None:
                    prefix = list(seg.texts[0])
                elif list(seg.texts[0]) != prefix:
                    raise ConfigError("the prompt text before the image differs between questions")
                questions[qa.question] = list(seg.texts[1])
            if qa.answer not in answers:
                answers[qa.answer] = tokenizer.encode(qa.answer + prompt.separator)
            image.append(i)
            suffix.append(questions[qa.question])
            target.append(answers[qa.answer])
            qtype.append(qa.qtype)
            answer.append(qa.answer)
    if prefix is None:
        raise ConfigError("no samples to encode")
    return Encoded(
        prefix, torch.from_numpy(np.stack(pixels)), torch.tensor(image), suffix, target, qtype, answer
    )


def forward_rows(
    model: TinyGPTV, data: Encoded, rows: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits for `rows`: (N, T, vocab) and targets (N, T) (IGNORE off the answer)."""
    images, inverse = torch.unique(data.image[rows], return_inverse=True)
    embeds = model.vision(data.pixels[images])  # (n_img, Q, H)
    lm = model.language
    cache = lm.new_cache()
    lm.hidden_states(lm.embed(torch.tensor([data.prefix])), cache)  # (1, P, H) into the cache
    n = len(rows)
    for i in range(len(cache.keys)):  # broadcast the shared prefix to every row
        cache.keys[i] = cache.keys[i].expand(n, -1, -1, -1)
        cache.values[i] = cache.values[i].expand(n, -1, -1, -1)
    q = embeds.shape[1]
    texts = [data.suffix[r] + data.target[r] for r in rows.tolist()]
    width = max(len(t) for t in texts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, q + width), IGNORE, dtype=torch.long)
    for j, r in enumerate(rows.tolist()):
        ids[j, : len(texts[j])] = torch.tensor(texts[j])
        start = q + len(data.suffix[r])  # first answer position in the row
        targets[j, start - 1 : start - 1 + len(data.target[r])] = torch.tensor(data.target[r])
    x = torch.cat([embeds[inverse], lm.embed(ids)], dim=1)  # (N, Q + width, H)
    return lm(x, cache), targets


def loss_and_exact(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over each row's answer tokens, averaged per row, then over rows; and per row
    whether every answer token is the argmax.

    Rows weigh the same whatever their answer's length (a caption is ~8 tokens, "left" is 2), so the
    short answers that need the image most are not drowned out. A row is exact exactly when greedy
    decoding reproduces the answer and its separator.
    """
    mask = targets != IGNORE
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    loss = (ce.view_as(targets).sum(1) / mask.sum(1).clamp(min=1)).mean()
    hit = (logits.argmax(-1) == targets) | ~mask
    return loss, hit.all(dim=1)


@torch.no_grad()
def exact_by_type(model: TinyGPTV, data: Encoded, pad_id: int, batch_images: int = 64) -> dict[str, float]:
    """Batched greedy exact match per question type (teacher-forced argmax over the answer)."""
    model.eval()
    hits = torch.zeros(len(data.image), dtype=torch.bool)
    for start in range(0, len(data.pixels), batch_images):
        rows = data.rows_of(torch.arange(start, min(start + batch_images, len(data.pixels))))
        logits, targets = forward_rows(model, data, rows, pad_id)
        hits[rows] = loss_and_exact(logits, targets)[1]
    out: dict[str, list[bool]] = {}
    for t, h in zip(data.qtype, hits.tolist(), strict=True):
        out.setdefault(t, []).append(h)
    acc = {t: sum(v) / len(v) for t, v in sorted(out.items())}
    acc["all"] = float(hits.float().mean())
    return acc
