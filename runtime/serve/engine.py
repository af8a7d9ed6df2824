"""One model, one worker thread, a bounded queue: the server's requests run here one at a time.

    handler --submit(work)--> Job (admitted if running + waiting <= 1 + max_queue, else 503)
        worker thread: work(job) --job.emit(kind, value)--> asyncio queue --> handler (SSE / JSON)
    job.stop(reason) ("timeout" | "disconnected" | "shutdown") sets the job's cancel event: a job not
    started yet is skipped, a running turn ends at its next token.

A conversation sent back whole is replayed into a Chat (`Chat.add_turn`): answers this server gave are
remembered as the token ids it generated (keyed by the text it returned), so the replayed history is
the same positions the KV cache holds and only the new turn is evaluated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import urllib.request
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast, overload

from ..errors import (
    ConfigError,
    ContextOverflowError,
    ImageError,
    ImageFormatError,
    ImageTooLargeError,
    PipelineBusyError,
    TinyGPTVError,
)
from ..pipeline import Answer, Chat, Pipeline, Timings
from ..sampling import GREEDY, SamplingConfig
from ..vision.images import ImageLimits
from .errors import APIError, BadRequest, Overloaded, ServerError, Timeout
from .gbnf import gbnf_constraint
from .grammar import GrammarConstraint, Grammars
from .metrics import Metrics
from .schema import ChatPlan, ImageRef, RemoteImage


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "tinygptv-edge"
    max_queue: int = 8  # requests waiting behind the running one
    timeout: float = 600.0  # seconds per request, queue wait included
    api_key: str | None = None
    allow_remote_images: bool = False
    remote_timeout: float = 10.0  # seconds to fetch a remote image
    max_body_bytes: int = 96 * 1024 * 1024
    sampling: SamplingConfig = GREEDY
    remember_answers: int = 256  # answers kept as token ids for exact history replay

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_body_bytes", "remember_answers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"ServeConfig.{name}: expected an integer >= 0, got {v!r}")
        for name in ("timeout", "remote_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"ServeConfig.{name}: expected a number of seconds > 0, got {v!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError("ServeConfig.api_key: expected a non-empty string or None")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError(f"ServeConfig.model_name: expected a non-empty string, got {self.model_name!r}")


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    timings: dict
    stop: str = ""  # the runtime's reason (Answer.stop) or "word" (a stop sequence)


class Job:
    """One request's link between the event loop and the worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.reason: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = False  # set by the worker when it takes the job
        self._lock = threading.Lock()  # orders `start` against `stop`: exactly one side answers a stop

    def emit(self, kind: str, value: object = None) -> None:
        """From the worker: hand an event to the handler ("piece", "done", "error")."""
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def stop(self, reason: str) -> None:
        """From the event loop: cancel; a job still waiting in the queue is answered at once."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            self.cancel.set()
            if not self.started:
                self.events.put_nowait(("error", self.error()))

    def start(self) -> bool:
        """From the worker: take the job; False when it was stopped while waiting (already answered)."""
        with self._lock:
            self.started = True
            return not self.cancel.is_set()

    def error(self) -> APIError:
        if self.reason == "timeout":
            return Timeout("the request took longer than the server's --timeout")
        if self.reason == "shutdown":
            return Overloaded("the server is shutting down", retry_after=5, code="shutting_down")
        return ServerError(f"the request was cancelled ({self.reason})")


class Engine:
    """Loads the pipeline in the worker thread, then runs admitted jobs one at a time."""

    def __init__(self, load: Callable[[], Pipeline], cfg: ServeConfig | None = None):
        self.cfg = cfg or ServeConfig()
        self._load_fn = load
        self.state = "loading"  # "loading" | "ready" | "failed" | "closed"
        self.error: str | None = None
        self.pipe: Pipeline | None = None
        self.grammars: Grammars | None = None
        self.warmed = 0  # positions evaluated at start
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tinygptv-serve")
        self._admitted = 0
        self._jobs: set[Job] = set()
        self._answers: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._job_s: float | None = None  # running mean of a job's time (None: none finished yet)
        self._running_since: float | None = None  # perf_counter() when the running job started
        self.stats: Counter = Counter()
        self.metrics = Metrics()
        self.started = time.time()
        self.exception: BaseException | None = None  # why the model did not load
        self.on_failed: Callable[[BaseException], None] | None = None  # called in the worker thread
        self.on_ready: Callable[[Pipeline], None] | None = None
        self.info: dict = {}  # what the CLI knows of the model: "files", "quantization_level", ...

    # -- lifetime ------------------------------------------------------------------------------
    def start(self):
        """Begin loading (in the worker thread); returns its future."""
        return self._executor.submit(self._load)

    def _load(self) -> None:
        try:
            pipe = self._load_fn()
            self.warmed = pipe.warm()  # BOS + system prompt: every conversation starts with it
            self.grammars = Grammars(pipe.tokenizer, pipe.prompt.separator)
            self.pipe = pipe
            if self.state == "loading":  # not closed meanwhile
                self.state = "ready"
        except Exception as e:  # noqa: BLE001 - reported by /health and every request
            self.state, self.error, self.exception = "failed", f"{type(e).__name__}: {e}", e
            if self.on_failed is not None:
                self.on_failed(e)
            return
        if self.on_ready is not None:
            self.on_ready(pipe)

    async def close(self) -> None:
        """Cancel what still runs or waits, then free the models (after the running turn ends)."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.cancel_all()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_pipe)
        self._executor.shutdown(wait=True)

    def cancel_all(self, reason: str = "shutdown") -> None:
        """Stop every job (event loop side): queued ones are answered at once, a running answer ends at
        its next token; their clients get `Job.error()` (503 shutting_down for "shutdown")."""
        for job in list(self._jobs):
            job.stop(reason)

    def _close_pipe(self) -> None:
        if self.pipe is not None:
            self.pipe.close()

    def health(self) -> dict:
        return {
            "status": {"ready": "ok"}.get(self.state, self.state),
            "model": self.cfg.model_name,
            "queue": max(0, self._admitted - 1),
            "running": min(1, self._admitted),
            **{
                k: self.stats[k]
                for k in ("completed", "cancelled", "timed_out", "refused", "rejected", "failed")
            },
            **({"error": self.error} if self.error else {}),
        }

    # -- admission -------------------------------------------------------------------------------
    def ready(self) -> Pipeline:
        """The loaded pipeline; else raise the error a request gets when the server cannot take it at all."""
        if self.state == "loading":
            raise Overloaded("the model is still loading", retry_after=5, code="loading")
        if self.state == "failed":
            raise ServerError(f"the model failed to load: {self.error}", code="load_failed")
        if self.state == "closed":
            raise Overloaded("the server is shutting down", retry_after=5, code="shutting_down")
        return self._loaded()

    def _loaded(self) -> Pipeline:
        """The pipeline, for work admitted once it loaded (`ready`)."""
        assert self.pipe is not None  # set before state "ready"
        return self.pipe

    async def submit(self, work: Callable[[Job], None]) -> Job:
        """Admit `work` (503 when the queue is full) and start it when the worker is free."""
        self.ready()
        if self._admitted >= 1 + self.cfg.max_queue:
            self.stats["refused"] += 1
            wait = self.expected_wait()
            raise Overloaded(
                f"the queue is full ({self.cfg.max_queue} waiting, about {wait:.1f} s of work ahead); "
                "retry later",
                retry_after=wait,
            )
        loop = asyncio.get_running_loop()
        job = Job(loop)
        self._admitted += 1
        self._jobs.add(job)
        job.timer = loop.call_later(self.cfg.timeout, job.stop, "timeout")
        future = loop.run_in_executor(self._executor, self._run, job, work)
        future.add_done_callback(lambda _: self._finish(job))
        return job

    def expected_wait(self) -> float:
        """Seconds until the worker could start a new job: what the running job likely has left, plus
        the mean job time (measured) for each waiting one. Before any job finished, the running one's
        time so far stands for the mean."""
        elapsed = time.perf_counter() - self._running_since if self._running_since is not None else 0.0
        mean = self._job_s if self._job_s is not None else max(elapsed, 1.0)
        running = min(1, self._admitted)
        return running * max(mean - elapsed, 0.0) + max(0, self._admitted - running) * mean

    def _finish(self, job: Job) -> None:
        self._admitted -= 1
        self._jobs.discard(job)
        if job.timer is not None:  # set at admission
            job.timer.cancel()

    def _run(self, job: Job, work: Callable[[Job], None]) -> None:
        if not job.start():  # timed out or abandoned while it waited (already answered)
            self.stats["timed_out" if job.reason == "timeout" else "cancelled"] += 1
            return
        t0 = self._running_since = time.perf_counter()
        try:
            work(job)
        except Exception as e:  # noqa: BLE001 - every failure reaches the client in OpenAI's shape
            err = api_error(e)
            self.stats["failed" if err.status >= 500 else "rejected"] += 1  # 4xx: the request's fault
            job.emit("error", err)
        finally:
            took = time.perf_counter() - t0
            self._job_s = took if self._job_s is None else 0.8 * self._job_s + 0.2 * took
            self._running_since = None

    # -- work ------------------------------------------------------------------------------------
    def constraint(self, plan: ChatPlan) -> GrammarConstraint | None:
        self.ready()
        assert self.grammars is not None  # set before state "ready"
        if plan.grammar:
            return gbnf_constraint(self.grammars, plan.grammar)
        return self.grammars.for_format(plan.response_format, plan.sampling.max_new_tokens)

    def chat(self, job: Job, plan: ChatPlan, constraint: GrammarConstraint | None) -> None:
        """Worker side of a chat completion: emits ("piece", text)* then ("done", Result) or ("error", e)."""
        pipe = self._loaded()
        prompt = pipe.prompt if plan.system is None else dataclasses.replace(pipe.prompt, system=plan.system)
        chat = pipe.chat(plan.sampling, prompt)
        earlier: list[Timings] = []  # image timings of the replayed turns
        for past in plan.history:
            known = self._answers.get(past.answer)
            ids_or_text: str | list[int] = list(known) if known else past.answer
            earlier.append(chat.add_turn(past.question, self.image(past.image), ids_or_text))
        turn = chat.stream(plan.question, self.image(plan.image), plan.sampling, constraint, job.cancel)
        stops = StopFilter(plan.stop)
        hit = False
        try:
            for piece in turn:
                out, hit = stops.push(piece)
                if out:
                    job.emit("piece", out)
                if hit:
                    break
            else:
                if tail := stops.flush():
                    job.emit("piece", tail)
        finally:
            turn.close()
        answer = turn.answer
        assert answer is not None  # the turn ended (closed or exhausted)
        if answer.stop == "cancelled":  # timed out, abandoned or shut down mid-answer
            self.stats["timed_out" if job.reason == "timeout" else "cancelled"] += 1
            job.emit("error", job.error())
            return
        self._remember(chat, answer, stops.text)
        t = answer.timings
        for e in earlier:
            t.add_images(e)
        finish = "length" if answer.stop in ("max_new_tokens", "context") and not hit else "stop"
        self.stats["completed"] += 1
        result = Result(
            text=stops.text,
            finish_reason=finish,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=len(answer.token_ids),
            cached_tokens=answer.prompt_tokens - t.prefill_tokens,
            timings={k: round(v, 3) if isinstance(v, float) else v for k, v in t.to_dict().items()},
            stop="word" if hit else answer.stop,
        )
        self.metrics.observe(result)
        job.emit("done", result)

    def embed(self, job: Job, images: list[ImageRef]) -> None:
        out = []
        for ref in images:
            if job.cancel.is_set():
                job.emit("error", job.error())
                return
            out.append(self._loaded().embed_image(self.image(ref)))
        self.stats["completed"] += 1
        job.emit("done", out)

    @overload
    def image(self, ref: ImageRef) -> bytes: ...
    @overload
    def image(self, ref: None) -> None: ...

    def image(self, ref: ImageRef | None) -> bytes | None:
        """Bytes of an image reference (remote ones fetched here, size-capped)."""
        if not isinstance(ref, RemoteImage):
            return ref
        cap = self.pipe.image_limits.max_bytes if self.pipe is not None else ImageLimits().max_bytes
        try:
            with urllib.request.urlopen(ref.url, timeout=self.cfg.remote_timeout) as r:  # noqa: S310
                data = r.read(cap + 1)
        except OSError as e:
            raise BadRequest(f"cannot fetch image {ref.url}: {e}", "messages", "image_fetch_failed") from None
        if len(data) > cap:
            raise BadRequest(f"image {ref.url} is over {cap} bytes", "messages", "image_too_large")
        return data

    def _remember(self, chat: Chat, answer: Answer, text: str) -> None:
        """Keep the answer's token ids under the text returned, when the text is exactly what they say."""
        if not self.cfg.remember_answers or chat.pending != chat.prompt.separator:
            return
        ids = cast(tuple[int, ...], tuple(chat.positions[answer.prompt_tokens :]))  # the answer: token ids
        if not text or self._loaded().tokenizer.decode(ids).strip() != text:
            return
        self._answers[text] = ids
        self._answers.move_to_end(text)
        while len(self._answers) > self.cfg.remember_answers:
            self._answers.popitem(last=False)


class StopFilter:
    """Cuts streamed text at the first of `stops`, holding back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.text = ""  # everything let through

    def push(self, piece: str) -> tuple[str, bool]:
        self.buf += piece
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buf = self.buf[: min(found)], ""
            self.text += out
            return out, True
        hold = max((_overlap(self.buf, s) for s in self.stops), default=0)
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(out) :]
        self.text += out
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        self.text += out
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def api_error(e: BaseException) -> APIError:
    """The runtime's typed errors as OpenAI errors."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        total = e.n_past + e.n_new
        return BadRequest(
            f"This model's maximum context length is {e.n_ctx} tokens. However, your messages resulted "
            f"in {total} tokens ({e.n_past} of history + {e.n_new} for this turn and one answer token).",
            "messages",
            "context_length_exceeded",
        )
    if isinstance(e, ImageTooLargeError):
        return BadRequest(f"image refused: {e}", "messages", "image_too_large")
    if isinstance(e, ImageFormatError):
        return BadRequest(f"image refused: {e}", "messages", "invalid_image_format")
    if isinstance(e, ImageError):
        return BadRequest(f"image refused: {e}", "messages", "invalid_image")
    if isinstance(e, PipelineBusyError):
        return Overloaded(str(e), retry_after=1)
    if isinstance(e, ConfigError):
        return BadRequest(str(e), None, "invalid_value")
    if isinstance(e, TinyGPTVError):
        return ServerError(str(e))
    return ServerError(f"internal error: {type(e).__name__}: {e}")
