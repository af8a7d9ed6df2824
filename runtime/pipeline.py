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

State lives in two small classes the turn loop calls: `PrefixCache` (runtime/prefix_cache.py: what the
KV cache holds, prefill, step, resync) and `ImageCache` (runtime/image_cache.py: embeddings by pixel
hash, in memory and optionally on disk).

One turn runs at a time: other threads wait (or get PipelineBusyError after `busy_timeout`), and a call
from the thread that holds an unfinished stream is refused at once. Errors leave the pipeline usable:
a failed turn is not added to the chat, and the cache is re-synchronised on the next call.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from . import contract as C
from .checks import check_count, check_threads, is_path
from .config import IMAGE_PLACEHOLDER, PromptConfig
from .errors import (
    ClosedError,
    ConfigError,
    ContextOverflowError,
    ModelFileError,
    ModelMismatchError,
    PipelineBusyError,
)
from .image_cache import ImageCache, onnx_sha256
from .interfaces import LanguageDecoder, VisionModel
from .memory import release_heap
from .prefix_cache import Position, Prefill, PrefixCache
from .sampling import GREEDY, Sampler, SamplingConfig, TokenConstraint, check_sampling
from .text.detok import AnswerStream, TokenBytes
from .text.prompt import split_prompt
from .text.tokenizer import check_text
from .vision.encoder import VisionEncoder
from .vision.images import ImageLimits, ImageSource, load_image
from .vision.preprocess import preprocess

LOW_MEMORY_CTX = 1024  # default context in low-memory mode: the most positions its KV cache grows to
# low-memory mode allocates this many positions at first (a TinyGPT-V turn: ~60 prompt positions and a
# short answer); the decoder doubles its cache when a conversation needs more (Decoder n_ctx_alloc)
LOW_MEMORY_ALLOC = 256
DEFAULT_MAX_CTX = 4096  # default context at most (a larger one must be asked for with n_ctx)
CACHE_RAM_MIB = 256  # default host memory for KV snapshots (runtime/prefix_cache.py); low-memory: none
RESERVE_POSITIONS = 128  # per snapshot buffer `warm` touches (two): a one-image turn, 40 MiB at full size


@dataclass
class Timings:
    image_ms: float = 0.0  # load + preprocess + vision graph (0 when every image was cached)
    images: int = 0
    images_cached: int = 0
    prefill_tokens: int = 0  # positions evaluated
    prefill_restored: int = 0  # positions copied from a KV snapshot instead (runtime/prefix_cache.py)
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

    def add_prefill(self, pre: Prefill) -> None:
        """Count a prefill (runtime/prefix_cache.py): positions evaluated and restored, its time."""
        self.prefill_tokens += pre.evaluated
        self.prefill_restored += pre.restored
        self.prefill_ms += pre.ms

    def add_images(self, other: Timings) -> None:
        """Count `other`'s images (e.g. the replayed turns' of a conversation sent back whole)."""
        self.images += other.images
        self.images_cached += other.images_cached
        self.image_ms += other.image_ms


@dataclass
class Answer:
    text: str  # stripped, cut before the separator
    token_ids: tuple[int, ...]  # generated tokens (EOS not included)
    # "separator" | "eos" | "max_new_tokens" | "context" | "closed" | "cancelled" | "constraint"
    stop: str
    timings: Timings = field(default_factory=Timings)
    prompt_tokens: int = 0  # positions the turn's prompt filled (history, text, image rows)


class Gate:
    """A lock that refuses re-entry from its holder thread (that would interleave two turns).

    `with pipeline.gate:` holds it for the block (PipelineBusyError when it cannot be had)."""

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

    def held(self) -> bool:
        """True in the thread that holds it."""
        return self._owner == threading.get_ident()

    def __enter__(self) -> Gate:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_model_args(vision, language) -> None:
    """Pipeline's model arguments are paths or objects of the right kind: anything else is a ConfigError
    naming the argument (not an AttributeError from deep inside)."""
    if vision is not None and not is_path(vision) and not isinstance(vision, VisionModel):
        raise ConfigError(
            "vision: expected a path to the ONNX file, a VisionEncoder or None (a VisionModel), "
            f"got {type(vision).__name__} {vision!r:.60}"
        )
    if not is_path(language) and not callable(language) and not hasattr(language, "eval_embeddings"):
        raise ConfigError(
            "language: expected a path to the GGUF file, a Decoder or a callable making one, "
            f"got {type(language).__name__} {language!r:.60}"
        )


class Pipeline:
    """The models and caches; `chat()` starts a conversation, `ask`/`stream` answer one question.

    Parts: `vision` (a VisionModel: VisionEncoder), `prefix` (PrefixCache: the decoder, a LanguageDecoder,
    and what its KV cache holds), `image_cache` (ImageCache), `gate` (one turn at a time). The protocols
    are in runtime/interfaces.py.
    """

    def __init__(
        self,
        vision: str | Path | VisionModel | None,
        # a GGUF file, a decoder (runtime/language/decoder.py's Decoder or any LanguageDecoder), or a
        # callable making one
        language: str | Path | LanguageDecoder | Callable[[], LanguageDecoder],
        n_ctx: int | None = None,  # None: the model's, <= DEFAULT_MAX_CTX (low-memory: LOW_MEMORY_CTX)
        n_threads: int | None = None,
        kv_type: str = "f16",
        low_memory: bool = False,
        image_limits: ImageLimits | None = None,
        image_cache_size: int = 16,
        busy_timeout: float | None = None,
        image_cache_dir: str | Path | None = None,  # embeddings also on disk, kept across restarts
        cache_ram_mib: int | None = None,  # KV snapshots; None: CACHE_RAM_MIB (low-memory: 0)
    ):
        image_cache = ImageCache(image_cache_size)  # validates the size before any model loads
        if n_ctx is not None:
            check_count(n_ctx, "n_ctx")
        if cache_ram_mib is None:
            cache_ram_mib = 0 if low_memory else CACHE_RAM_MIB
        check_count(cache_ram_mib, "cache_ram_mib", hi=(1 << 20) - 1, lo=0)
        check_threads(n_threads)
        self._closed = False
        reopenable = is_path(language) or callable(language)
        if low_memory and not reopenable:
            raise ConfigError(
                "low_memory needs the language model as a path or factory (it is closed and reopened)"
            )
        _check_model_args(vision, language)
        self.low_memory = low_memory
        self.image_limits = image_limits or ImageLimits()
        self._decoder_args: dict[str, Any] = dict(
            n_ctx=n_ctx if n_ctx is not None else 2048, n_threads=n_threads, kv_type=kv_type
        )
        if low_memory:  # a KV cache sized to the conversation, not to n_ctx
            self._decoder_args["n_ctx_alloc"] = LOW_MEMORY_ALLOC
        self.gate = Gate(busy_timeout)
        self.image_cache = image_cache
        # a path, a VisionModel or None (_check_model_args): is_path narrows only its True branch
        self.vision: VisionModel | None = (
            VisionEncoder(os.fspath(vision), n_threads, low_memory=low_memory)
            if is_path(vision)
            else cast("VisionModel | None", vision)
        )
        if image_cache_dir is not None and self.vision is not None:  # disk keys name the vision graph too
            shape = (self.vision.num_query_tokens, self.vision.embed_dim)
            model_id = onnx_sha256(self.vision.path)  # graph and external weights
            self.image_cache = ImageCache(image_cache_size, image_cache_dir, model_id, shape)
        factory: Callable[[], LanguageDecoder] | None = None
        given: LanguageDecoder | None = None
        if is_path(language):
            path = Path(language)
            if not path.is_file():
                raise ModelFileError(f"language model not found: {path} (expected a GGUF file)")
            if n_ctx is None:  # low-memory: at most 1024 positions (allocated 256 at a time)
                trained = trained_context(path)
                self._decoder_args["n_ctx"] = min(trained, LOW_MEMORY_CTX if low_memory else DEFAULT_MAX_CTX)
            factory = lambda: _open_decoder(path, **self._decoder_args)  # noqa: E731
        elif callable(language):
            factory = language
        else:
            given = cast(LanguageDecoder, language)
        self.prefix: PrefixCache[LanguageDecoder] = PrefixCache(
            factory, given, snapshot_bytes=cache_ram_mib << 20
        )
        d = self.prefix.decoder
        self.tokenizer, self.prompt = d.tokenizer, d.prompt
        self.n_embd, self.n_ctx, self.image_tokens = d.n_embd, d.n_ctx, d.image_tokens
        self.token_bytes = TokenBytes(self.tokenizer)
        # the most bytes one token stands for: a text of N bytes needs at least N / this many tokens
        self.max_token_bytes = max(1, max(map(len, self.token_bytes.table), default=1))
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
    def chat(self, sampling: SamplingConfig = GREEDY, prompt: PromptConfig | None = None) -> Chat:
        """A new conversation; `prompt` overrides the model's template (e.g. another system prompt)."""
        return Chat(self, sampling, prompt)

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

    @property
    def image_cache_size(self) -> int:
        return self.image_cache.size

    def close(self) -> None:
        """Free both models (waits for a running turn; refused from inside one)."""
        with self.gate:
            self._closed = True
            self._close()

    def check_open(self) -> None:
        if self._closed:
            raise ClosedError("the pipeline is closed: make a new Pipeline to ask more questions")

    def _close(self) -> None:
        if self.vision is not None:
            self.vision.close()
        self.prefix.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def warm(self) -> int:
        """Evaluate what every conversation starts with (BOS, system prompt, the first turn's head up to
        its image) once, so the first turn reuses it; the number of positions now cached."""
        text = self.prompt.first_turn("", with_image=self.vision is not None)
        head = split_prompt(
            text, self.tokenizer, text.count(IMAGE_PLACEHOLDER), add_bos=self.prompt.add_bos
        ).texts[0]
        with self.gate:
            self.check_open()
            self.prefix.prefill(list(head), {})
            # memory for the first KV snapshot, touched now rather than when a turn waits on it
            self.prefix.reserve(RESERVE_POSITIONS)
        return len(head)

    # -- images --------------------------------------------------------------------------------
    def embed_image(self, image: ImageSource) -> np.ndarray:
        """(Q, H) image embeddings (through the image cache)."""
        with self.gate:
            return self.encode_image(image, Timings())[1]

    def encode_image(self, image: ImageSource, timings: Timings) -> tuple[str, np.ndarray]:
        """(key, (Q, H) embeddings), cached by the preprocessed pixels; for the thread holding `gate`."""
        if not self.gate.held():
            raise PipelineBusyError("encode_image: hold pipeline.gate first (or call embed_image)")
        self.check_open()
        if self.vision is None:
            raise ConfigError("this pipeline has no vision model: ask text-only questions, or give vision=")
        t0 = time.perf_counter()
        rgb = load_image(image, self.image_limits)
        pixels = preprocess(rgb, self.vision.preprocess_cfg)[None]  # (1, 3, S, S)
        key = self.image_cache.key(pixels)
        timings.images += 1
        embeds = self.image_cache.get(key)
        if embeds is not None:
            timings.images_cached += 1
        else:
            if self.low_memory and self.prefix.release():  # one model resident at a time
                release_heap()
            try:
                embeds = self.vision.embed(pixels)[0]  # (Q, H)
            finally:
                if self.low_memory:
                    self.vision.release()
            self.image_cache.put(key, embeds)
        timings.image_ms += (time.perf_counter() - t0) * 1e3
        return key, embeds


class Chat:
    """A conversation. `ask`/`stream` add a turn; turns may carry an image or be text only.

    `add_turn` records a past turn with a known answer (a conversation sent back whole, as HTTP
    clients do) without generating; the next turn then reuses the KV cache it shares.
    """

    def __init__(
        self, pipeline: Pipeline, sampling: SamplingConfig = GREEDY, prompt: PromptConfig | None = None
    ):
        self.pipeline = pipeline
        self.sampling = check_sampling(sampling)
        self.prompt: PromptConfig = prompt or pipeline.prompt
        self.positions: list[Position] = []
        self.images: dict[str, np.ndarray] = {}
        self.turns = 0
        self.pending = ""  # text that goes before the next turn's template (the separator)

    def ask(
        self, question: str, image: ImageSource | None = None, sampling: SamplingConfig | None = None
    ) -> Answer:
        turn = self.stream(question, image, sampling)
        for _ in turn:
            pass
        assert turn.answer is not None  # set when the turn ends
        return turn.answer

    def stream(
        self,
        question: str,
        image: ImageSource | None = None,
        sampling: SamplingConfig | None = None,
        constraint: TokenConstraint | None = None,
        cancel: threading.Event | None = None,
    ) -> Turn:
        """A turn as an iterator of text pieces. `constraint` masks each next token (and then the
        separator no longer ends the answer: the constraint does); `cancel` set ends it at the next token."""
        sampling = self.sampling if sampling is None else sampling  # an empty dict is no default
        return Turn(self, question, image, sampling, constraint, cancel)

    def add_turn(
        self, question: str, image: ImageSource | None = None, answer: str | list[int] = ""
    ) -> Timings:
        """Record a finished turn whose answer is known (text, or the token ids it was generated as);
        nothing is evaluated (the next turn prefills what the cache lacks). Timings of its image."""
        check_question(question)
        pipe = self.pipeline
        timings = Timings()
        images, keys = dict(self.images), []
        if image is not None:
            with pipe.gate:
                key, images[key] = pipe.encode_image(image, timings)
            keys.append(key)
        ids = pipe.tokenizer.encode(answer) if isinstance(answer, str) else [int(t) for t in answer]
        positions = self.next_positions(question, keys)
        positions += ids
        self.extend(positions, images, self.prompt.separator)
        return timings

    def prompt_text(self, question: str, with_image: bool) -> str:
        """The text this turn adds (the full first-turn prompt, or separator + the later-turn template)."""
        if self.turns == 0:
            return self.prompt.first_turn(question, with_image)
        return self.pending + self.prompt.turn(question, with_image)

    def next_positions(self, question: str, image_keys: list[str]) -> list[Position]:
        """The history plus this turn's prompt: its text tokens with each image's rows in its slot."""
        pipe = self.pipeline
        text = self.prompt_text(question, with_image=bool(image_keys))
        held = len(self.positions)
        fewest = -(-len(text.encode("utf-8")) // pipe.max_token_bytes) + len(image_keys) * pipe.image_tokens
        if held + fewest + 1 > pipe.n_ctx:  # refused before tokenizing (a 10 MB question costs 1 GB there)
            raise ContextOverflowError(held, fewest + 1, pipe.n_ctx)
        segments = split_prompt(
            text, pipe.tokenizer, len(image_keys), add_bos=self.turns == 0 and self.prompt.add_bos
        )
        positions = list(self.positions)
        for i, ids in enumerate(segments.texts):
            positions += ids
            if i < len(image_keys):
                positions += [(image_keys[i], r) for r in range(pipe.image_tokens)]
        return positions

    def extend(self, positions: list[Position], images: dict[str, np.ndarray], pending: str) -> None:
        """Record a finished turn: the whole history now, the images it holds, the text before the next."""
        self.positions = list(positions)
        held = {p[0] for p in self.positions if not isinstance(p, int)}
        self.images = {k: v for k, v in images.items() if k in held}
        self.pending = pending
        self.turns += 1


class Turn:
    """One turn as an iterator of text pieces; `answer` is set when it ends (exhausted or closed)."""

    def __init__(
        self,
        chat: Chat,
        question: str,
        image: ImageSource | None,
        sampling: SamplingConfig,
        constraint: TokenConstraint | None = None,
        cancel: threading.Event | None = None,
    ):
        check_question(question)
        self.chat, self.question, self.image = chat, question, image
        self.sampling = check_sampling(sampling)
        self.constraint, self.cancel = constraint, cancel
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

    def _run(self) -> Generator[str, None, None]:
        pipe, chat = self.chat.pipeline, self.chat
        with pipe.gate:
            pipe.check_open()
            yield from self._locked(pipe, chat)

    def _locked(self, pipe: Pipeline, chat: Chat) -> Generator[str, None, None]:
        t_start = time.perf_counter()
        timings = Timings()
        images = dict(chat.images)
        keys = []
        if self.image is not None:
            key, embeds = pipe.encode_image(self.image, timings)
            images[key] = embeds
            keys.append(key)
        positions = chat.next_positions(self.question, keys)
        if len(positions) + 1 > pipe.n_ctx:
            held = len(chat.positions)  # +1: room for at least one answer token
            raise ContextOverflowError(held, len(positions) - held + 1, pipe.n_ctx)

        pre = pipe.prefix.prefill(positions, images)
        timings.add_prefill(pre)
        logits = pre.logits
        sampler = Sampler(self.sampling)
        constraint = self.constraint
        stream = AnswerStream(pipe.token_bytes, "" if constraint is not None else chat.prompt.separator)
        eos = pipe.tokenizer.eos_id
        ids: list[int] = []
        stop = "closed"
        t_decode = time.perf_counter()
        closed = False
        try:
            while True:
                if self.cancel is not None and self.cancel.is_set():
                    stop = "cancelled"
                    break
                token = sampler(logits, ids, constraint.allowed(logits) if constraint is not None else None)
                if not ids:
                    timings.first_token_ms = (time.perf_counter() - t_start) * 1e3
                if token == eos:
                    stop = "eos"
                    break
                if constraint is not None:
                    constraint.accept(token)
                ids.append(token)
                piece, at_sep = stream.push(token)
                if piece:
                    yield piece
                if at_sep:
                    stop = "separator"
                    break
                if constraint is not None and constraint.done():
                    stop = "constraint"
                    break
                if len(ids) >= self.sampling.max_new_tokens:
                    stop = "max_new_tokens"
                    break
                if len(pipe.prefix) + 1 > pipe.n_ctx:
                    stop = "context"
                    break
                logits = pipe.prefix.step(token)
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
        kept, leftover = _history_ids(ids, stream, pipe.token_bytes)
        chat.extend(positions + kept, images, leftover + chat.prompt.separator)
        if stop == "closed":
            text = stream.text[: stream.shown]
        elif stream.answer_chars is not None:
            text = stream.text[: stream.answer_chars]
        else:
            text = stream.text
        self.answer = Answer(text.strip(), tuple(ids), stop, timings, len(positions))


class _Layout:
    """What `Chat` reads of a pipeline to lay out turns without running anything: the tokenizer and the
    image slot size; an image is its key (a string the caller picks), nothing is encoded."""

    def __init__(self, tokenizer: Any, image_tokens: int, prompt: PromptConfig):
        self.tokenizer, self.image_tokens, self.prompt = tokenizer, image_tokens, prompt
        self.n_ctx = 1 << 30
        self.max_token_bytes = 1
        self.gate = contextlib.nullcontext()

    def encode_image(self, image: object, timings: Timings) -> tuple[str, np.ndarray]:
        return str(image), np.zeros(0, np.float32)


def layout_chat(tokenizer: Any, image_tokens: int, prompt: PromptConfig) -> Chat:
    """A `Chat` that only lays turns out (`add_turn`, `next_positions`, `extend`), for training data and
    evaluation sets built in the exact layout the runtime prefills: images are keys (`str(image)`),
    (key, row) in the positions; `tokenizer` needs `encode` and `bos_id`."""
    return Chat(cast(Pipeline, _Layout(tokenizer, image_tokens, prompt)), prompt=prompt)


def chat_positions(
    tokenizer: Any,
    image_tokens: int,
    prompt: PromptConfig,
    history: Sequence[tuple[str, str | None, str]],
    question: str,
    image: str | None = None,
) -> tuple[list[Position], list[tuple[int, list[int]]]]:
    """The positions the runtime prefills for `question` (with image key `image`, or text only) after
    the past turns `history` (question, image key or None, answer), each recorded as `Chat.add_turn`
    records a conversation sent back whole; and (start, token ids) of each past answer in them."""
    chat = layout_chat(tokenizer, image_tokens, prompt)
    answers = []
    for q, key, answer in history:
        chat.add_turn(q, key, answer)
        ids = tokenizer.encode(answer)
        answers.append((len(chat.positions) - len(ids), ids))
    return chat.next_positions(question, [] if image is None else [image]), answers


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


def _open_decoder(path: Path, **kwargs) -> LanguageDecoder:
    from .language.decoder import Decoder  # the ggml half; imported on use

    return Decoder(path, **kwargs)


def check_question(question: object) -> str:
    """A question is UTF-8 text without the prompt's image slot (images go in with image=)."""
    question = check_text(question, "question")
    if IMAGE_PLACEHOLDER in question:
        raise ConfigError(
            f"question: expected no {IMAGE_PLACEHOLDER} (the prompt's image slot; attach images with "
            "image=), found one in the text"
        )
    return question


def trained_context(path: Path) -> int:
    """The context length the GGUF states (read from its header; no weights are touched)."""
    from .language.decoder_model import read_hparams
    from .language.gguf_file import GGUFFile

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
