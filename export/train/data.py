"""The synthetic VQA set as tensors for training, and the batched teacher-forced forward.

Every question becomes the model's real first-turn prompt, split at `<ImageHere>` as
`runtime/text/prompt.py` does (BOS first: the project trains its models with `prompt.add_bos` true):

    [bos "<system>###Human: <Img>"] [Q image embeddings] ["</Img> {question}###Assistant: "] [answer "###"]
     prefix: the same for every row  from the vision tower  suffix                             target

The prefix is run once per batch and its keys/values are broadcast to every row through the
decoder's KV cache; the rows are right-padded (the decoder is causal, so padding never changes a
real position) and the loss covers the answer tokens only.

Conversations (`add_conversations`) are laid out by the runtime's own `Chat` (`Chat.add_turn`, which
`Chat.next_positions` and `Chat.extend` build the history with): the first turn's full prompt, then per
turn the separator and the later-turn template, an image only on the turn it was attached, each past
answer as `Chat.add_turn` records it. One row per conversation: the shared prefix, the text before
its first image (`pre`, e.g. a greeting turn), that image, then the rest with any later image as a
marker `-(1 + image)` in `suffix`; the loss covers every answer (past answers at `spans`, the last
answer and its separator as the target).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tinygptv_edge.export.model.tinygptv import TinyGPTV
from tinygptv_edge.export.train.vqa import Conversation, Sample
from tinygptv_edge.runtime.config import PromptConfig, TinyGPTVConfig
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
    # conversation rows (`add_conversations`); empty lists for rows of one question:
    pre: list[list[int]] = field(default_factory=list)  # text between the prefix and the first image
    # past answers' tokens: (index, token), the index into suffix (>= 0) or into pre (k - len(pre) < 0)
    spans: list[list[tuple[int, int]]] = field(default_factory=list)
    conversation: list[bool] = field(default_factory=list)

    def rows_of(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(torch.isin(self.image, images)).flatten()

    @property
    def general(self) -> bool:
        """Whether some row is laid out beyond [prefix][image][suffix] (conversations)."""
        return any(self.pre) or any(self.spans) or any(self.conversation)


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


@dataclass(frozen=True)
class TurnLayout:
    """A conversation as `Chat` holds it: `positions` (token ids, and (image key, row) per image
    embedding row) up to the last turn's prompt; `answers[k]`: where turn k's answer tokens sit in it
    (start, ids), the last turn's answer being `target` (answer + separator) after the positions."""

    positions: list
    answers: list[tuple[int, list[int]]]
    target: list[int]


def conversation_layout(
    conv: Conversation, prompt: PromptConfig, tokenizer: Tokenizer, image_tokens: int
) -> TurnLayout:
    """Lay `conv` out with the runtime's `Chat`: each past turn recorded by `Chat.add_turn` with its
    answer, the last turn's prompt by `Chat.next_positions`."""
    from tinygptv_edge.runtime.pipeline import chat_positions

    history = [(t.question, None if t.attach is None else str(t.attach), t.answer) for t in conv.turns[:-1]]
    last = conv.turns[-1]
    positions, answers = chat_positions(
        tokenizer,
        image_tokens,
        prompt,
        history,
        last.question,
        None if last.attach is None else str(last.attach),
    )
    return TurnLayout(positions, answers, tokenizer.encode(last.answer + prompt.separator))


def add_conversations(
    data: Encoded, convs: Sequence[Conversation], cfg: TinyGPTVConfig, tokenizer: Tokenizer
) -> Encoded:
    """`data` with one row per conversation, after the rows of its first image (rows stay grouped by
    image). The shared prefix becomes the longest one every row starts with."""
    q = cfg.qformer.num_query_tokens
    rows: dict[int, list[tuple]] = {}
    for conv in convs:
        lay = conversation_layout(conv, cfg.prompt, tokenizer, q)
        first = conv.image
        pre: list[int] = []
        suffix: list[int] = []
        spans: list[tuple[int, int]] = []  # (index into suffix, token) of past answers after the image
        pre_spans: list[tuple[int, int]] = []  # (index into pre, token): a greeting's answer before it
        starts = {start: ids for start, ids in lay.answers}
        seen_first = False
        p = 0
        while p < len(lay.positions):
            pos = lay.positions[p]
            if not isinstance(pos, int):  # an image: q rows
                img = int(pos[0])
                if not seen_first:
                    if img != first:
                        raise ConfigError("conversation layout: the first image attached is not the row's")
                    seen_first = True
                else:
                    suffix.append(-(1 + img))
                p += q
                continue
            if p in starts:
                at, into = (len(suffix), spans) if seen_first else (len(pre), pre_spans)
                into.extend((at + k, t) for k, t in enumerate(starts[p]))
            (suffix if seen_first else pre).append(pos)
            p += 1
        rows.setdefault(first, []).append((pre, pre_spans, suffix, spans, lay.target, conv.turns[-1]))
    if not rows:
        return data
    conv_pre = {i: [r[0] for r in rs] for i, rs in rows.items()}
    common = list(data.prefix)
    for prs in conv_pre.values():
        for pr in prs:
            k = 0
            while k < min(len(common), len(pr)) and common[k] == pr[k]:
                k += 1
            common = common[:k]
    out = Encoded(common, data.pixels, torch.tensor([]), [], [], [], [], [], [], [])
    own_pre = list(data.prefix[len(common) :])
    old_pre = data.pre or [[] for _ in data.suffix]
    old_spans = data.spans or [[] for _ in data.suffix]
    old_conv = data.conversation or [False for _ in data.suffix]
    image: list[int] = []

    def put(img, pre, suffix, target, qtype, answer, spans, is_conv):
        image.append(img)
        out.pre.append(pre)
        out.suffix.append(suffix)
        out.target.append(target)
        out.qtype.append(qtype)
        out.answer.append(answer)
        out.spans.append(spans)
        out.conversation.append(is_conv)

    imgs = data.image.tolist()
    for r, img in enumerate(imgs):
        put(
            img,
            own_pre + old_pre[r],
            data.suffix[r],
            data.target[r],
            data.qtype[r],
            data.answer[r],
            old_spans[r],
            old_conv[r],
        )
        if r + 1 == len(imgs) or imgs[r + 1] != img:
            for pre, pre_spans, suffix, spans, target, last in rows.pop(img, []):
                # the shared prefix comes off pre; an answer in pre is indexed k - len(pre) (negative)
                spans = [(k - len(pre), t) for k, t in pre_spans] + spans
                put(img, pre[len(common) :], suffix, target, last.qtype, last.answer, spans, True)
    if rows:
        raise ConfigError(f"conversations about images without rows: {sorted(rows)[:5]}")
    out.image = torch.tensor(image)
    return out


def forward_rows(
    model: TinyGPTV,
    data: Encoded,
    rows: torch.Tensor,
    pad_id: int,
    vision: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits for `rows`: (N, T, vocab) and targets (N, T) (IGNORE off the answer).

    `vision`: image embeddings by image index, shared between calls of one step (conversation rows are
    run apart from the short rows, so that these are not padded to a conversation's length)."""
    if data.general:
        return _forward_general(model, data, rows, pad_id, vision if vision is not None else {})
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


def row_offsets(data: Encoded, rows: Sequence[int], image_tokens: int) -> torch.Tensor:
    """Per row, where its suffix starts after the shared prefix: len(pre) + the first image's rows."""
    if not data.pre:
        return torch.full((len(rows),), image_tokens, dtype=torch.long)
    return torch.tensor([len(data.pre[r]) + image_tokens for r in rows], dtype=torch.long)


def _forward_general(
    model: TinyGPTV, data: Encoded, rows: torch.Tensor, pad_id: int, vision: dict[int, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_rows for rows laid out as [prefix][pre][image][suffix with image markers][target]."""
    rows_l = rows.tolist()
    wanted = {int(data.image[r]) for r in rows_l}
    for r in rows_l:
        wanted.update(-1 - t for t in data.suffix[r] if t < 0)
    images = sorted(wanted)
    local = {g: i for i, g in enumerate(images)}
    todo = [g for g in images if g not in vision]
    if todo:
        vision.update(zip(todo, model.vision(data.pixels[torch.tensor(todo)]), strict=True))
    embeds = torch.stack([vision[g] for g in images])  # (n_img, Q, H)
    lm = model.language
    cache = lm.new_cache()
    lm.hidden_states(lm.embed(torch.tensor([data.prefix])), cache)
    n = len(rows_l)
    for i in range(len(cache.keys)):
        cache.keys[i] = cache.keys[i].expand(n, -1, -1, -1)
        cache.values[i] = cache.values[i].expand(n, -1, -1, -1)
    q = embeds.shape[1]
    seqs, slots, sup = [], [], []  # token ids (pad at image rows); (row, pos, image, r); (pos, token)
    for j, r in enumerate(rows_l):
        ids: list[int] = []
        labels: list[tuple[int, int]] = []

        def image_at(g: int, j: int = j, ids: list[int] = ids) -> None:
            slots.extend((j, len(ids) + k, local[g], k) for k in range(q))
            ids.extend([pad_id] * q)

        spans = dict(data.spans[r]) if data.spans else {}
        pre = data.pre[r] if data.pre else []
        for k, t in enumerate(pre):
            if k - len(pre) in spans:
                labels.append((len(ids), spans[k - len(pre)]))
            ids.append(t)
        image_at(int(data.image[r]))
        for k, t in enumerate(data.suffix[r]):
            if t < 0:
                image_at(-1 - t)
                continue
            if k in spans:
                labels.append((len(ids), spans[k]))
            ids.append(t)
        labels.extend((len(ids) + k, t) for k, t in enumerate(data.target[r]))
        ids.extend(data.target[r])
        seqs.append(ids)
        sup.append(labels)
    width = max(len(t) for t in seqs)
    ids_t = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE, dtype=torch.long)
    for j, ids in enumerate(seqs):
        ids_t[j, : len(ids)] = torch.tensor(ids)
        for pos, t in sup[j]:
            targets[j, pos - 1] = t
    x = lm.embed(ids_t)
    if slots:
        jj, pp, ll, kk = (torch.tensor(v) for v in zip(*slots, strict=True))
        x = x.index_put((jj, pp), embeds[ll, kk])
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
