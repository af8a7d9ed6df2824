"""One unit of paper-set work: a (vision level, language level) cell over a shard of one paper set.

    image --load_image/preprocess--> VisionEncoder[vision] --> (Q, H) image embeddings
    Decoder[language]: [BOS] + prompt text before the image, evaluated once per opened decoder
      per item: truncate(prefix) -> eval_embeddings(image) -> eval_tokens(prompt text after the image)
        generate: greedy tokens until EOS, the turn separator or max_new_tokens
        choice:   each choice + separator teacher-forced; the lowest mean NLL wins (TinyGPT-V's
                  multi_select ranks choices by their loss)
        yes_no:   P(yes) / (P(yes) + P(no)) from the first answer position's logits

Each item's numbers depend only on (model files, thread count, item): a shard gives the same predictions
in any process, in any order, on any machine with the same files and library versions. That is what
makes the Ray run equal to the serial one. Open models are kept per process (one vision encoder, one
decoder) so consecutive shards of one cell do not reload them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinygptv_edge.runtime.errors import ReportError
from tinygptv_edge.runtime.metrics import log_softmax

from .base import PaperItem, Task
from .scoring import Prediction

N_CTX_CAP = 1024  # positions per decoder: prompts here are short (system + 32 image tokens + question)
YES, NO = ("yes", "Yes"), ("no", "No")


@dataclass(frozen=True)
class Shard:
    paper_set: str
    vision: str
    language: str
    start: int  # item range [start, stop) of the paper set as selected
    stop: int

    @property
    def cell(self) -> tuple[str, str]:
        return self.vision, self.language


@dataclass(frozen=True)
class RunSpec:
    """What every worker needs besides the items: level -> model file (on a path every node sees)."""

    vision_paths: dict[str, str]
    language_paths: dict[str, str]
    threads: int = 1
    max_new_tokens: int = 16


def make_shards(sizes: dict[str, int], cells: list[tuple[str, str]], shard_size: int) -> list[Shard]:
    """Every (cell, paper set, item range), cell by cell in the given order (the reference first), so a
    serial run opens each cell's models once."""
    if shard_size < 1:
        raise ReportError(f"shard size: expected >= 1, got {shard_size}")
    return [
        Shard(b, v, lang, s, min(s + shard_size, n))
        for v, lang in cells
        for b, n in sizes.items()
        for s in range(0, n, shard_size)
    ]


class _Models:
    """The models open in this process: one vision encoder and one decoder, reopened on a change.
    A failed open or evaluation leaves nothing half-set: the next call opens or evaluates afresh."""

    def __init__(self):
        self.enc = self.dec = None
        self.enc_key = self.dec_key = None
        self.prefix: list[int] = []
        self.n0 = 0

    def encoder(self, path: str, threads: int):
        from tinygptv_edge.runtime.vision.encoder import VisionEncoder

        if self.enc_key != (path, threads):
            if self.enc is not None:
                self.enc.close()
            self.enc = self.enc_key = None
            self.enc = VisionEncoder(path, threads)
            self.enc_key = (path, threads)
        return self.enc

    def decoder(self, path: str, threads: int):
        from tinygptv_edge.runtime.language.decoder import Decoder

        if self.dec_key != (path, threads):
            if self.dec is not None:
                self.dec.close()
            self.dec = self.dec_key = None
            self.prefix, self.n0 = [], 0
            with Decoder(path, n_ctx=1, n_threads=threads) as probe:
                n_ctx = min(probe.hparams.n_ctx_train, N_CTX_CAP)
            self.dec = Decoder(path, n_ctx=n_ctx, n_threads=threads)
            self.dec_key = (path, threads)
        return self.dec

    def at_prefix(self, prefix: list[int]) -> int:
        """The cache holding exactly `prefix` (evaluated once per decoder); returns its length."""
        dec = self.dec
        if prefix != self.prefix or dec.n_past < self.n0:
            self.prefix = []
            dec.reset()
            if prefix:
                dec.eval_tokens(prefix)
            self.prefix, self.n0 = list(prefix), dec.n_past
        dec.truncate(self.n0)
        return self.n0


_MODELS = _Models()


def run_shard(shard: Shard, items: list[PaperItem], task: Task, spec: RunSpec) -> list[list]:
    """Predictions (Prediction.to_list) of one cell for `items` (the shard's items, in order)."""
    from tinygptv_edge.runtime.text.prompt import split_prompt
    from tinygptv_edge.runtime.vision.images import load_image
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    enc = _MODELS.encoder(spec.vision_paths[shard.vision], spec.threads)
    dec = _MODELS.decoder(spec.language_paths[shard.language], spec.threads)
    tok, sep = dec.tokenizer, dec.prompt.separator
    out = []
    for it in items:
        text = task.prompt.format(question=it.question)
        seg = split_prompt(
            dec.prompt.first_turn(text, with_image=True), tok, n_images=1, add_bos=dec.prompt.add_bos
        )
        prefix, suffix = list(seg.texts[0]), list(seg.texts[1])
        need = len(prefix) + dec.image_tokens + len(suffix) + max(spec.max_new_tokens, _longest(it, tok, sep))
        if need > dec.n_ctx:
            raise ReportError(
                f"{shard.paper_set} item {it.qid}: needs {need} positions, the decoder holds {dec.n_ctx}"
            )
        pixels = preprocess(load_image(it.image), enc.preprocess_cfg)
        embeds = enc.embed(pixels[None])[0]  # (Q, H)
        _MODELS.at_prefix(prefix)
        dec.eval_embeddings(embeds)
        logits = dec.eval_tokens(suffix) if suffix else None
        if logits is None:
            raise ReportError(f"{shard.paper_set} item {it.qid}: the prompt has no text after the image")
        if task.kind == "generate":
            pred = Prediction(_greedy(dec, logits, spec.max_new_tokens))
        elif task.kind == "choice":
            pred = _choose(dec, logits, it.choices, sep)
        else:
            pred = _yes_no(tok, logits)
        out.append(pred.to_list())
    return out


def _longest(it: PaperItem, tok, sep: str) -> int:
    return max((len(tok.encode(c + sep)) for c in it.choices), default=0)


def _greedy(dec, logits: np.ndarray, limit: int) -> str:
    tok, sep = dec.tokenizer, dec.prompt.separator
    ids: list[int] = []
    while len(ids) < limit:
        t = int(np.argmax(logits))
        if t == tok.eos_id:
            break
        ids.append(t)
        if sep in tok.decode(ids) or len(ids) == limit:
            break
        logits = dec.eval_tokens([t])
    return tok.decode(ids).split(sep)[0].strip()


def _choose(dec, logits: np.ndarray, choices: tuple[str, ...], sep: str) -> Prediction:
    n_prompt = dec.n_past
    first = log_softmax(logits)
    nll = []
    for c in choices:
        target = dec.tokenizer.encode(c + sep)
        total = -first[target[0]]
        if len(target) > 1:
            dec.truncate(n_prompt)
            lp = log_softmax(dec.eval_tokens(target[:-1], all_logits=True))  # (len - 1, V)
            total -= lp[np.arange(len(target) - 1), target[1:]].sum()
        nll.append(total / len(target))
    k = int(np.argmin(nll))
    return Prediction(choices[k], k)


def _yes_no(tok, logits: np.ndarray) -> Prediction:
    p = np.exp(log_softmax(logits))
    yes = sorted({tok.encode(w)[0] for w in YES})
    no = sorted({tok.encode(w)[0] for w in NO})
    py, pn = float(p[yes].sum()), float(p[no].sum())
    p_yes = py / (py + pn) if py + pn > 0 else 0.5
    return Prediction("yes" if p_yes > 0.5 else "no", -1, p_yes)
