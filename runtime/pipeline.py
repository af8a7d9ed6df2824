"""Image + question in, streamed answer out: onnxruntime vision graph + ggml decoder, no torch.

    image --load_image--> RGB --preprocess--> (1,3,S,S) --VisionEncoder--> (Q, H) --+  (cached by pixel hash)
    question --PromptConfig (from the GGUF)--> text with <ImageHere> --split_prompt-+--> positions
    positions: [bos, tokens..., image rows..., tokens...]  --Decoder (KV cache)--> logits --Sampler--> token
    tokens --AnswerStream--> text pieces, cut at "###" / EOS / max_new_tokens

A `Chat` is a conversation: its history is a list of positions (token ids, or (image key, row) for each
image embedding row). The decoder's KV cache holds a prefix of some chat's history; a turn evaluates only
what the cache lacks, so later turns reuse it, a second chat re-prefills, and nothing depends on which
chat ran last. A turn's answer joins the history as the tokens generated before the separator, then the
separator and the next turn's text (`PromptConfig.turn`): the same tokens a fresh run on the
concatenated conversation would be fed.

One turn runs at a time: other threads wait (or get PipelineBusyError after `busy_timeout`), and a call
from the thread that holds an unfinished stream is refused at once. Errors leave the pipeline usable:
a failed turn is not added to the chat, and the cache is re-synchronised on the next call.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import contract as C
from .checks import check_count, check_threads
from .config import IMAGE_PLACEHOLDER, PromptConfig
from .detok import AnswerStream, TokenBytes
from .errors import (
    ClosedError,
    ConfigError,
    ContextOverflowError,
    ModelFileError,
    ModelMismatchError,
    PipelineBusyError,
)
from .images import ImageLimits, ImageSource, load_image
from .memory import release_heap
from .preprocess import preprocess
from .prompt import split_prompt
from .sampling import GREEDY, Sampler, SamplingConfig
from .tokenizer import check_text
from .vision import VisionEncoder

Position = int | tuple[str, int]  # a token id, or (image key, embedding row)
LOW_MEMORY_CTX = 1024  # default context in low-memory mode (the KV cache is resident in full)
DEFAULT_MAX_CTX = 4096  # default context at most (a larger one must be asked for with n_ctx)


@dataclass
class Timings:
    image_ms: float = 0.0  # load + preprocess + vision graph (0 when every image was cached)
    images: int = 0
    images_cached: int = 0
    prefill_tokens: int = 0
    prefill_ms: float = 0.0
    decode_tokens: int = 0
    decode_ms: float = 0.0
    first_token_ms: float = 0.0  # call start -> first answer token chosen

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}


@dataclass
class Answer:
    text: str  # stripped, cut before the separator
    token_ids: tuple[int, ...]  # generated tokens (EOS not included)
    stop: str  # "separator" | "eos" | "max_new_tokens" | "context" | "closed"
    timings: Timings = field(default_factory=Timings)


class _Gate:
    """A lock that refuses re-entry from its holder thread (that would interleave two turns)."""

    def __init__(self, timeout: float | None):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self.timeout = timeout

    def acquire(self) -> None:
        if self._owner == threading.get_ident():
            raise PipelineBusyError(
                "this thread already runs a turn (an unfinished stream?); finish or close it first"
            )
        ok = self._lock.acquire() if self.timeout is None else self._lock.acquire(timeout=self.timeout)
        if not ok:
            raise PipelineBusyError(f"the pipeline stayed busy with another call for {self.timeout} s")
        self._owner = threading.get_ident()

    def release(self) -> None:
        self._owner = None
        self._lock.release()


class Pipeline:
    """The models and caches; `chat()` starts a conversation, `ask`/`stream` answer one question."""

    def __init__(
        self,
        vision: str | Path | VisionEncoder | None,
        language,  # str | Path (a GGUF file), a runtime.decoder.Decoder, or a callable making one
        n_ctx: int
        | None = None,  # None: the model's (2048) up to DEFAULT_MAX_CTX; LOW_MEMORY_CTX in low-memory
        n_threads: int | None = None,
        kv_type: str = "f16",
        low_memory: bool = False,
        image_limits: ImageLimits | None = None,
        image_cache_size: int = 16,
        busy_timeout: float | None = None,
    ):
        if not isinstance(image_cache_size, int) or image_cache_size < 0:
            raise ConfigError(f"image_cache_size: expected an integer >= 0, got {image_cache_size!r}")
        if n_ctx is not None:
            check_count(n_ctx, "n_ctx")
        check_threads(n_threads)
        self._closed = False
        reopenable = isinstance(language, (str, Path)) or callable(language)
        if low_memory and not reopenable:
            raise ConfigError(
                "low_memory needs the language model as a path or factory (it is closed and reopened)"
            )
        self.low_memory = low_memory
        self.image_limits = image_limits or ImageLimits()
        self._decoder_args = dict(
            n_ctx=n_ctx if n_ctx is not None else 2048, n_threads=n_threads, kv_type=kv_type
        )
        self._gate = _Gate(busy_timeout)
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self.image_cache_size = image_cache_size
        self._cached: list[Position] = []  # what the decoder's KV cache holds, position by position
        if isinstance(vision, (str, Path)):
            vision = VisionEncoder(vision, n_threads, low_memory=low_memory)
        self.vision = vision
        if isinstance(language, (str, Path)):
            path = Path(language)
            if not path.is_file():
                raise ModelFileError(f"language model not found: {path} (expected a GGUF file)")
            if n_ctx is None:  # low-memory: a 1024-position KV cache (f16: 320 MB instead of 640 MB)
                trained = trained_context(path)
                self._decoder_args["n_ctx"] = min(trained, LOW_MEMORY_CTX if low_memory else DEFAULT_MAX_CTX)
            self._factory = lambda: _open_decoder(path, **self._decoder_args)
        else:
            self._factory = language if callable(language) else None
        self._decoder = language if self._factory is None else self._factory()
        d = self._decoder
        self.tokenizer, self.prompt = d.tokenizer, d.prompt
        self.n_embd, self.n_ctx, self.image_tokens = d.n_embd, d.n_ctx, d.image_tokens
        self._token_bytes = TokenBytes(self.tokenizer)
        # the most bytes one token stands for: a text of N bytes needs at least N / this many tokens
        self._max_token_bytes = max(1, max(map(len, self._token_bytes.table), default=1))
        try:
            self._check_fit()
        except BaseException:
            self._close()
            raise

    def _check_fit(self) -> None:
        if self.vision is None:
            return
        if self.vision.embed_dim != self.n_embd:
            raise ModelMismatchError(
                f"vision output width {self.vision.embed_dim} != decoder embedding width {self.n_embd}"
            )
        if self.vision.num_query_tokens != self.image_tokens:
            raise ModelMismatchError(
                f"vision gives {self.vision.num_query_tokens} tokens per image, "
                f"the decoder expects {self.image_tokens}"
            )

    # -- public API ------------------------------------------------------------------------------
    def chat(self, sampling: SamplingConfig = GREEDY) -> Chat:
        return Chat(self, sampling)

    def ask(
        self, question: str, image: ImageSource | None = None, sampling: SamplingConfig = GREEDY
    ) -> Answer:
        """A one-turn conversation: the whole answer."""
        return self.chat(sampling).ask(question, image)

    def stream(
        self, question: str, image: ImageSource | None = None, sampling: SamplingConfig = GREEDY
    ) -> Turn:
        """A one-turn conversation: an iterator of text pieces (`.answer` once it is exhausted)."""
        return self.chat(sampling).stream(question, image)

    def close(self) -> None:
        """Free both models (waits for a running turn; refused from inside one)."""
        self._gate.acquire()
        try:
            self._closed = True
            self._close()
        finally:
            self._gate.release()

    def _close(self) -> None:
        if self.vision is not None:
            self.vision.close()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._cached = []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- models ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the pipeline is closed: make a new Pipeline to ask more questions")

    def _decoder_ready(self):
        if self._decoder is None:
            self._decoder = self._factory()
            self._cached = []
        return self._decoder

    def embed_image(self, image: ImageSource) -> np.ndarray:
        """(Q, H) image embeddings (through the image cache)."""
        self._gate.acquire()
        try:
            self._check_open()
            return self._embed_image(image, Timings())[1]
        finally:
            self._gate.release()

    def _embed_image(self, image: ImageSource, timings: Timings) -> tuple[str, np.ndarray]:
        """(key, (Q, H) embeddings); cached by the hash of the preprocessed pixels."""
        if self.vision is None:
            raise ConfigError("this pipeline has no vision model: ask text-only questions, or give vision=")
        t0 = time.perf_counter()
        rgb = load_image(image, self.image_limits)
        pixels = preprocess(rgb, self.vision.preprocess_cfg)[None]  # (1, 3, S, S)
        key = hashlib.sha256(pixels.tobytes()).hexdigest()[:32]
        timings.images += 1
        embeds = self._images.get(key)
        if embeds is not None:
            self._images.move_to_end(key)
            timings.images_cached += 1
        else:
            if self.low_memory and self._decoder is not None:  # one model resident at a time
                self._decoder.close()
                self._decoder, self._cached = None, []
                release_heap()
            try:
                embeds = self.vision.embed(pixels)[0]  # (Q, H)
            finally:
                if self.low_memory:
                    self.vision.release()
            if self.image_cache_size:
                self._images[key] = embeds
                while len(self._images) > self.image_cache_size:
                    self._images.popitem(last=False)
        timings.image_ms += (time.perf_counter() - t0) * 1e3
        return key, embeds

    # -- decoding --------------------------------------------------------------------------------
    def _prefill(
        self, positions: list[Position], images: dict[str, np.ndarray], timings: Timings
    ) -> np.ndarray:
        """Make the KV cache hold `positions`, evaluating only what it lacks; logits of the last one."""
        dec = self._decoder_ready()
        keep = 0
        limit = min(len(self._cached), len(positions) - 1)  # re-evaluate at least the last position
        while keep < limit and self._cached[keep] == positions[keep]:
            keep += 1
        t0 = time.perf_counter()
        try:
            dec.truncate(keep)
            self._cached = self._cached[:keep]
            rest = positions[keep:]
            if all(isinstance(p, int) for p in rest):
                logits = dec.eval_tokens(rest)
            else:
                logits = dec.eval_embeddings(self._embeds(rest, images))
        except BaseException:
            self._resync()
            raise
        self._cached = list(positions)
        timings.prefill_tokens += len(rest)
        timings.prefill_ms += (time.perf_counter() - t0) * 1e3
        return logits

    def _embeds(self, rest: list[Position], images: dict[str, np.ndarray]) -> np.ndarray:
        """Positions -> (T, n_embd) rows: token embeddings from the decoder, image rows as given."""
        parts, run = [], []
        for p in rest:
            if isinstance(p, int):
                run.append(p)
                continue
            if run:
                parts.append(self._decoder.embed_tokens(run))
                run = []
            parts.append(images[p[0]][p[1]][None])
        if run:
            parts.append(self._decoder.embed_tokens(run))
        return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)

    def _step(self, token: int) -> np.ndarray:
        try:
            logits = self._decoder.eval_tokens([token])
        except BaseException:
            self._resync()
            raise
        self._cached.append(token)
        return logits

    def _resync(self) -> None:
        """After a failure inside the decoder: trust nothing, start from an empty cache."""
        self._cached = []
        if self._decoder is not None:
            try:
                self._decoder.reset()
            except Exception:
                self._decoder = None if self._factory is not None else self._decoder


class Chat:
    """A conversation. `ask`/`stream` add a turn; turns may carry an image or be text only."""

    def __init__(self, pipeline: Pipeline, sampling: SamplingConfig = GREEDY):
        self.pipeline = pipeline
        self.sampling = sampling
        self.positions: list[Position] = []
        self.images: dict[str, np.ndarray] = {}
        self.turns = 0
        self._pending = ""  # text that goes before the next turn's template (the separator)

    def ask(
        self, question: str, image: ImageSource | None = None, sampling: SamplingConfig | None = None
    ) -> Answer:
        turn = self.stream(question, image, sampling)
        for _ in turn:
            pass
        return turn.answer

    def stream(
        self, question: str, image: ImageSource | None = None, sampling: SamplingConfig | None = None
    ) -> Turn:
        return Turn(self, question, image, sampling or self.sampling)

    def prompt_text(self, question: str, with_image: bool) -> str:
        """The text this turn adds (the full first-turn prompt, or separator + the later-turn template)."""
        prompt: PromptConfig = self.pipeline.prompt
        if self.turns == 0:
            return prompt.first_turn(question, with_image)
        return self._pending + prompt.turn(question, with_image)


class Turn:
    """One turn as an iterator of text pieces; `answer` is set when it ends (exhausted or closed)."""

    def __init__(self, chat: Chat, question: str, image: ImageSource | None, sampling: SamplingConfig):
        check_text(question, "question")
        if IMAGE_PLACEHOLDER in question:
            raise ConfigError(
                f"question: expected no {IMAGE_PLACEHOLDER} (the prompt's image slot; attach images with "
                "image=), found one in the text"
            )
        self.chat, self.question, self.image, self.sampling = chat, question, image, sampling
        self.answer: Answer | None = None
        self._gen = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> Turn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> Iterator[str]:
        pipe, chat = self.chat.pipeline, self.chat
        pipe._gate.acquire()
        try:
            pipe._check_open()
            yield from self._locked(pipe, chat)
        finally:
            pipe._gate.release()

    def _locked(self, pipe: Pipeline, chat: Chat) -> Iterator[str]:
        t_start = time.perf_counter()
        timings = Timings()
        images = dict(chat.images)
        keys = []
        if self.image is not None:
            key, embeds = pipe._embed_image(self.image, timings)
            images[key] = embeds
            keys.append(key)
        text = chat.prompt_text(self.question, with_image=bool(keys))
        held = len(chat.positions)
        fewest = -(-len(text.encode("utf-8")) // pipe._max_token_bytes) + len(keys) * pipe.image_tokens
        if held + fewest + 1 > pipe.n_ctx:  # refused before tokenizing (a 10 MB question costs 1 GB there)
            raise ContextOverflowError(held, fewest + 1, pipe.n_ctx)
        segments = split_prompt(text, pipe.tokenizer, len(keys), add_bos=chat.turns == 0)
        positions = list(chat.positions)
        for i, ids in enumerate(segments.texts):
            positions += ids
            if i < len(keys):
                positions += [(keys[i], r) for r in range(pipe.image_tokens)]
        if len(positions) + 1 > pipe.n_ctx:
            held = len(chat.positions)  # +1: room for at least one answer token
            raise ContextOverflowError(held, len(positions) - held + 1, pipe.n_ctx)

        logits = pipe._prefill(positions, images, timings)
        sampler = Sampler(self.sampling)
        stream = AnswerStream(pipe._token_bytes, pipe.prompt.separator)
        eos = pipe.tokenizer.eos_id
        ids: list[int] = []
        stop = "closed"
        t_decode = time.perf_counter()
        closed = False
        try:
            while True:
                token = sampler(logits, ids)
                if not ids:
                    timings.first_token_ms = (time.perf_counter() - t_start) * 1e3
                if token == eos:
                    stop = "eos"
                    break
                ids.append(token)
                piece, at_sep = stream.push(token)
                if piece:
                    yield piece
                if at_sep:
                    stop = "separator"
                    break
                if len(ids) >= self.sampling.max_new_tokens:
                    stop = "max_new_tokens"
                    break
                if len(pipe._cached) + 1 > pipe.n_ctx:
                    stop = "context"
                    break
                logits = pipe._step(token)
                timings.decode_tokens += 1
            piece = stream.finish()
            if piece:
                yield piece
        except GeneratorExit:
            closed = True  # the caller stopped reading: what was shown becomes the turn
            raise
        finally:
            timings.decode_ms = (time.perf_counter() - t_decode) * 1e3
            if stop != "closed" or closed:  # a decoder error leaves the chat as it was
                self._commit(pipe, chat, positions, images, ids, stream, stop, timings)

    def _commit(self, pipe, chat, positions, images, ids, stream, stop, timings) -> None:
        kept, leftover = _history_ids(ids, stream, pipe._token_bytes)
        chat.positions = positions + kept
        held = {p[0] for p in chat.positions if not isinstance(p, int)}
        chat.images = {k: v for k, v in images.items() if k in held}
        chat._pending = leftover + pipe.prompt.separator
        chat.turns += 1
        if stop == "closed":
            text = stream.text[: stream.shown]
        elif stream.answer_chars is not None:
            text = stream.text[: stream.answer_chars]
        else:
            text = stream.text
        self.answer = Answer(text.strip(), tuple(ids), stop, timings)


def _history_ids(ids: list[int], stream: AnswerStream, token_bytes: TokenBytes) -> tuple[list[int], str]:
    """The generated tokens that lie before the separator, and the text between them and it.

    The token that completed the separator (and any after) is dropped, so the next turn re-adds the
    separator as text; `leftover` is the rare answer text that shared a token with the separator.
    """
    if stream.answer_chars is None or stream.answer_chars >= len(stream.text):
        return list(ids), ""
    target = len(stream.text[: stream.answer_chars].encode("utf-8"))
    used, kept = 0, []
    for t in ids:
        n = len(token_bytes([t]))
        if used + n > target:
            break
        used += n
        kept.append(t)
    leftover = token_bytes(ids)[used:target].decode("utf-8", errors="replace")
    return kept, leftover


def _open_decoder(path: Path, **kwargs):
    from .decoder import Decoder  # the ggml half; imported on use

    return Decoder(path, **kwargs)


def trained_context(path: Path) -> int:
    """The context length the GGUF states (read from its header; no weights are touched)."""
    from .decoder_model import read_hparams
    from .gguf_file import GGUFFile

    gf = GGUFFile.open(path)
    try:
        return read_hparams(gf).n_ctx_train
    finally:
        gf.close()


def default_model_paths(
    dist: str | Path = "dist", vision: str | Path | None = None, language: str | Path | None = None
) -> tuple[Path, Path]:
    """The given paths, or what `make export-onnx export-gguf` wrote to `dist` (INT8 and Q4_0 first)."""
    dist = Path(dist)
    if vision is None:
        found = [dist / C.VISION_FILE_INT8, dist / C.VISION_FILE_FP32]
        vision = next((p for p in found if p.is_file()), None)
        if vision is None:
            raise ModelFileError(
                f"no vision model in {dist}/ (looked for {C.VISION_FILE_INT8}, {C.VISION_FILE_FP32}); "
                "run `make export-onnx` or pass --vision"
            )
    if language is None:
        preferred = dist / C.LANGUAGE_FILE.format(ftype="q4_0")
        others = sorted(dist.glob(C.LANGUAGE_FILE.format(ftype="*")))
        language = preferred if preferred.is_file() else (others[0] if others else None)
        if language is None:
            raise ModelFileError(
                f"no language model in {dist}/ (looked for {C.LANGUAGE_FILE.format(ftype='*')}); "
                "run `make export-gguf` or pass --language"
            )
    return Path(vision), Path(language)
