"""Runs the cross matrix: every (vision level, language level) cell against the fp32 x F32 reference.

    images --preprocess--> pixels (N,3,S,S) --VisionEncoder[v]--> E[v] (N,Q,H)   once per vision level
    per language level l: Decoder[l], prompt prefix ([BOS] + system + "Human: <Img>") evaluated once
      per vision level v, per question:
        truncate(prefix) -> eval_embeddings(E[v][image]) -> eval_tokens(suffix + target[:-1], all_logits)
        (a conversation's turn: the earlier turns, with their reference answers, and any later image
        between the image and the suffix: `Prepared.pieces`)
        logits (len(target), V) over the reference answer ("answer###"), teacher-forced
          -> KL / same-top-1 / delta p / NLL vs the reference cell's logits
          -> greedy answer: while argmax == target the teacher-forced logits are the greedy ones;
             from the first disagreement the decoder continues token by token (truncated there)

The greedy shortcut reads argmax from logits of a batched evaluation rather than of single-token
steps; they agree up to float rounding (a near-tie could in principle break differently).
Vision and language effects are measured on their axes (the fp32 row, the F32 column); the end task
on every cell chosen (`cells`: "full" = the whole product, "axes" = the two axes only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tinygptv_edge.runtime import metrics as RM
from tinygptv_edge.runtime.errors import ReportError, TinyGPTVError

from . import metrics as M
from .evalset import EvalSet
from .levels import REFERENCE_LANGUAGE, REFERENCE_VISION

# progress(what, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class Prepared:
    """The evaluation set tokenized with the decoder's own tokenizer and prompt template."""

    prefix: list[int]  # [BOS] + prompt text before the image, shared by every question
    suffix: list[list[int]]  # prompt text after the image, per question
    target: list[list[int]]  # answer + separator, per question
    image_index: list[int]  # question -> row of the pixel / embedding arrays
    pixels: np.ndarray  # (N_images, 3, S, S)
    # per question, what goes between the prefix and `suffix`: (text tokens, image row or None) pieces;
    # None: the question's image alone. Conversations: the earlier turns and any later image.
    pieces: list[list[tuple[list[int], int | None]]] | None = None

    def pieces_of(self, q: int) -> list[tuple[list[int], int | None]]:
        return self.pieces[q] if self.pieces is not None else [([], self.image_index[q])]


@dataclass
class Cell:
    vision: str
    language: str
    answers: list[str]
    kl: np.ndarray  # (P,) over every answer position of every question
    top1: np.ndarray  # (P,) bool
    dp: np.ndarray  # (P,)
    nll: np.ndarray  # (P,) NLL of the reference answer tokens
    kl_question: np.ndarray  # (N,) mean KL per question
    seconds: float = 0.0

    @property
    def is_reference(self) -> bool:
        return self.vision == REFERENCE_VISION and self.language == REFERENCE_LANGUAGE


@dataclass
class VisionAxis:
    level: str
    cosine: np.ndarray  # (N_images * Q,) per embedding row
    sqnr_image: np.ndarray  # (N_images,) dB
    sqnr_db: float  # over all images
    ms_per_image: float


@dataclass
class MatrixResult:
    vision: dict[str, VisionAxis] = field(default_factory=dict)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    noise_cell: Cell | None = None  # the reference again at another thread count
    noise_vision: VisionAxis | None = None
    seconds: float = 0.0
    failed: dict[tuple[str, str], str] = field(default_factory=dict)  # (half, level) -> why


def prepare(evalset: EvalSet, tokenizer, prompt, preprocess_cfg) -> Prepared:
    """Tokenize every question as its first turn, or, in a conversation (`EvalItem.conversation`), after
    the earlier turns with their reference answers, laid out by the runtime's `Chat`
    (`runtime.pipeline.chat_positions`). The prefix is the text every question starts with."""
    from tinygptv_edge.runtime.pipeline import chat_positions
    from tinygptv_edge.runtime.text.prompt import split_prompt
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    keys = evalset.images
    row = {k: i for i, k in enumerate(keys)}
    pixels = np.stack([preprocess(evalset.load_image(k), preprocess_cfg) for k in keys])
    heads: list[list[int]] = []  # per question: the text before its first image
    rest: list[list[tuple[list[int], int | None]]] = []  # then (tokens, image) pieces, tokens last
    target = []
    history: list[tuple[str, str | None, str]] = []
    for it in evalset.items:
        if it.conversation is None:
            text = prompt.first_turn(it.question, with_image=True)
            seg = split_prompt(text, tokenizer, n_images=1, add_bos=prompt.add_bos)
            heads.append(list(seg.texts[0]))
            rest.append([([], row[it.image]), (list(seg.texts[1]), None)])
        else:
            if it.turn == 1:
                history = []
            key = it.image if it.attach else None
            positions, _ = chat_positions(tokenizer, 1, prompt, history, it.question, key)
            history.append((it.question, key, it.answer))
            pieces: list[tuple[list[int], int | None]] = []
            run: list[int] = []
            head: list[int] | None = None
            for pos in positions:
                if isinstance(pos, int):
                    run.append(pos)
                elif head is None:
                    head, run = run, []
                    pieces.append(([], row[pos[0]]))
                else:
                    pieces.append((run, row[pos[0]]))
                    run = []
            if head is None:  # text only so far (a greeting): the last token is the suffix
                head, run = run[:-1], run[-1:]
                pieces.append(([], None))
            heads.append(head)
            rest.append([*pieces, (run, None)])
        target.append(tokenizer.encode(it.answer + prompt.separator))
    prefix = heads[0] if heads else []
    for h in heads:
        k = 0
        while k < min(len(prefix), len(h)) and prefix[k] == h[k]:
            k += 1
        prefix = prefix[:k]
    suffix, all_pieces, image_index = [], [], []
    for it, h, r in zip(evalset.items, heads, rest, strict=True):
        (first_toks, first_img), *middle, (last, _) = r
        all_pieces.append([(h[len(prefix) :] + first_toks, first_img), *middle])
        suffix.append(last)
        image_index.append(row[it.image] if first_img is None else first_img)
    simple = all(len(pc) == 1 and not pc[0][0] for pc in all_pieces)
    return Prepared(prefix, suffix, target, image_index, pixels, None if simple else all_pieces)


def embed_all(path: str, pixels: np.ndarray, n_threads: int | None) -> tuple[np.ndarray, float]:
    """(N, Q, H) embeddings one image at a time, and the median ms per image."""
    from tinygptv_edge.runtime.vision.encoder import VisionEncoder

    with VisionEncoder(path, n_threads) as enc:
        out, ms = [], []
        for i in range(len(pixels)):
            t0 = time.perf_counter()
            out.append(enc.embed(pixels[i : i + 1])[0])
            ms.append((time.perf_counter() - t0) * 1e3)
    return np.stack(out), float(np.median(ms))


def vision_axis(level: str, ref: np.ndarray, got: np.ndarray, ms: float) -> VisionAxis:
    H = ref.shape[-1]
    return VisionAxis(
        level,
        RM.cosine_rows(ref.reshape(-1, H), got.reshape(-1, H)),
        np.atleast_1d(RM.sqnr_db(ref, got, axis=(1, 2))),
        RM.sqnr_db(ref, got),
        ms,
    )


class Runner:
    """One language level's decoder over the prepared questions; the reference logits are kept."""

    def __init__(self, prep: Prepared, max_new_tokens: int = 16):
        self.prep = prep
        # an answer longer than the longest reference answer + 4 tokens cannot match any: stop there
        self.max_new_tokens = min(max_new_tokens, max(map(len, prep.target)) + 4)
        self.ref_logits: list[np.ndarray] | None = None

    def n_ctx(self, image_tokens: int, n_ctx_train: int) -> int:
        """Positions one question needs, rounded up to 256 (at most the trained context)."""
        p = self.prep
        width = max(len(s) + len(t) - 1 for s, t in zip(p.suffix, p.target, strict=True))
        tail = max(width, max(map(len, p.suffix)) + self.max_new_tokens)
        middle = max(
            sum(len(toks) + (image_tokens if img is not None else 0) for toks, img in p.pieces_of(q))
            for q in range(len(p.suffix))
        )
        need = len(p.prefix) + middle + tail + 1
        if need > n_ctx_train:
            raise ReportError(f"a question needs {need} positions, the model's context holds {n_ctx_train}")
        return min(-(-need // 256) * 256, n_ctx_train)

    def open(self, path: str, n_threads: int | None):
        from tinygptv_edge.runtime.language.decoder import Decoder

        probe = Decoder(path, n_ctx=1, n_threads=n_threads)
        need = self.n_ctx(probe.image_tokens, probe.hparams.n_ctx_train)
        probe.close()
        return Decoder(path, n_ctx=need, n_threads=n_threads)

    def run(self, dec, vision: str, language: str, embeds: np.ndarray, n: int | None = None) -> Cell:
        """One cell over the first `n` questions (all by default)."""
        p = self.prep
        t0 = time.perf_counter()
        dec.reset()
        dec.eval_tokens(p.prefix)
        n0 = dec.n_past
        width = max(len(s) + len(t) - 1 for s, t in zip(p.suffix, p.target, strict=True))
        pad = dec.tokenizer.eos_id
        logits_all, answers = [], []
        for q in range(min(n or len(p.suffix), len(p.suffix))):
            dec.truncate(n0)
            for toks, img in p.pieces_of(q):  # the question's image (conversations: the turns before)
                if toks:
                    dec.eval_tokens(toks)
                if img is not None:
                    dec.eval_embeddings(embeds[img])
            n_prompt = dec.n_past + len(p.suffix[q])
            target, s = p.target[q], len(p.suffix[q])
            ids = p.suffix[q] + target[:-1]
            # padded to one length for every question: causal attention leaves the real positions
            # unchanged, and one graph shape is built once instead of once per question length
            ids += [pad] * (width - len(ids))
            lg = dec.eval_tokens(ids, all_logits=True)[s - 1 : s - 1 + len(target)]
            logits_all.append(lg)  # (len(target), V)
            answers.append(self._greedy(dec, lg, target, n_prompt))
        if self.ref_logits is None:
            self.ref_logits = logits_all
        cell = self._compare(vision, language, logits_all, answers)
        cell.seconds = time.perf_counter() - t0
        return cell

    def _greedy(self, dec, logits: np.ndarray, target: list[int], n_prompt: int) -> str:
        tok, sep = dec.tokenizer, dec.prompt.separator
        limit = self.max_new_tokens
        g = np.argmax(logits, axis=-1)
        miss = np.flatnonzero(g[:limit] != np.asarray(target[:limit]))
        if miss.size == 0:
            ids = list(target[:limit])
        else:
            k = int(miss[0])
            ids = [*target[:k], int(g[k])]
            dec.truncate(n_prompt + k)
            while len(ids) < limit and ids[-1] != tok.eos_id and sep not in tok.decode(ids):
                ids.append(int(np.argmax(dec.eval_tokens([ids[-1]]))))
        if ids and ids[-1] == tok.eos_id:
            ids = ids[:-1]
        return tok.decode(ids).split(sep)[0].strip()

    def _compare(self, vision: str, language: str, logits: list[np.ndarray], answers: list[str]) -> Cell:
        assert self.ref_logits is not None
        kl, top1, dp, nll, per_q = [], [], [], [], []
        for q, (ref, got) in enumerate(zip(self.ref_logits[: len(logits)], logits, strict=True)):
            t = np.asarray(self.prep.target[q])
            k = RM.kl_divergence(ref, got)
            kl.append(k)
            per_q.append(k.mean())
            top1.append(M.same_top1(ref, got))
            dp.append(M.delta_p_target(ref, got, t))
            nll.append(M.target_nll(got, t))
        cat = np.concatenate
        return Cell(vision, language, answers, cat(kl), cat(top1), cat(dp), cat(nll), np.array(per_q))


def choose_cells(vision: list[str], language: list[str], mode: str) -> list[tuple[str, str]]:
    """(vision, language) pairs to evaluate, the reference first; "axes" keeps the fp32 row and F32 column."""
    if mode not in ("full", "axes"):
        raise ReportError(f"cells: expected 'full' or 'axes', got {mode!r}")
    cells = [(v, lang) for lang in language for v in vision]
    if mode == "axes":
        cells = [(v, lang) for v, lang in cells if v == REFERENCE_VISION or lang == REFERENCE_LANGUAGE]
    ref = (REFERENCE_VISION, REFERENCE_LANGUAGE)
    return [ref] + [c for c in cells if c != ref]


def run_matrix(
    prep: Prepared,
    vision_paths: dict[str, str],  # level -> ONNX path (fp32 first)
    language_paths: dict[str, str],  # level -> GGUF path (F32 first)
    cells: list[tuple[str, str]],
    n_threads: int | None = None,
    max_new_tokens: int = 16,
    noise_floor: bool = True,
    progress: Progress | None = None,
    noise_questions: int = 60,
) -> MatrixResult:
    t_start = time.perf_counter()
    say = progress or (lambda *_: None)
    res = MatrixResult()
    if cells[0] != (REFERENCE_VISION, REFERENCE_LANGUAGE):
        raise ReportError("the first cell must be the reference fp32 x F32")
    embeds: dict[str, np.ndarray] = {}
    needed = [v for v in vision_paths if any(c[0] == v for c in cells)]
    for i, v in enumerate(needed):
        try:
            embeds[v], ms = embed_all(vision_paths[v], prep.pixels, n_threads)
        except TinyGPTVError as e:
            if v == REFERENCE_VISION:
                raise
            res.failed[("vision", v)] = f"evaluation failed: {e}"
            continue
        res.vision[v] = vision_axis(v, embeds[REFERENCE_VISION], embeds[v], ms)
        say("vision levels", i + 1, len(needed))
    cells = [c for c in cells if c[0] in embeds]
    other = 2 if n_threads == 1 else 1  # the noise floor: the reference at another thread count
    if noise_floor:
        e1, ms = embed_all(vision_paths[REFERENCE_VISION], prep.pixels, other)
        res.noise_vision = vision_axis(f"fp32 ({other} threads)", embeds[REFERENCE_VISION], e1, ms)
    runner = Runner(prep, max_new_tokens)
    total, done = len(cells) + int(noise_floor), 0
    for lang in [lang for lang in language_paths if any(c[1] == lang for c in cells)]:
        try:
            dec = runner.open(language_paths[lang], n_threads)
        except TinyGPTVError as e:
            if lang == REFERENCE_LANGUAGE:
                raise
            res.failed[("language", lang)] = f"evaluation failed: {e}"
            continue
        try:
            for v, lv in cells:
                if lv != lang:
                    continue
                res.cells[(v, lang)] = runner.run(dec, v, lang, embeds[v])
                done += 1
                say("cells", done, total)
        finally:
            dec.close()
        if lang == REFERENCE_LANGUAGE and noise_floor:
            dec = runner.open(language_paths[lang], other)
            try:
                name = f"({other} threads)"
                res.noise_cell = runner.run(dec, f"fp32 {name}", f"F32 {name}", e1, noise_questions)
            finally:
                dec.close()
            done += 1
            say("cells", done, total)
    res.seconds = time.perf_counter() - t_start
    return res
