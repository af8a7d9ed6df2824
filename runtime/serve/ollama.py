"""ollama's API on the same Engine, for clients that speak only ollama (docs/serve.md, "ollama clients").

    POST /api/chat      messages (+ base64 `images`), format "json" | a JSON schema, options, stream
    POST /api/generate  prompt (+ images, system), the same options; a one-turn chat
    GET  /api/tags      the one model          POST /api/show  its details, template, capabilities
    GET  /api/version   the API level followed GET  /api/ps    the model, loaded

Answers stream as NDJSON by default (one JSON object a line, `"done": true` last, durations in
nanoseconds), as ollama does; `"stream": false` gives one object. `format` takes the same constraint
path as OpenAI's `response_format`. Errors are ollama's `{"error": "message"}` with the HTTP status.
`keep_alive` is accepted (the model stays loaded); `options` that set up a runtime (num_ctx, num_gpu,
num_thread, ...) are accepted and change nothing: the server's own settings hold (/api/show says them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .common import auth, collect, engine_of, events, read_body, start
from .engine import Engine, Result
from .errors import APIError, BadRequest, NotFound
from .schema import ChatRequest, ResponseFormat, parse, plan_chat

API_VERSION = "0.12.0"  # the ollama API level these routes follow (clients compare it with their minimum)


class _Ollama(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Options(_Ollama):
    """ollama's `options`: the sampling ones are used; the runtime ones are accepted and change nothing."""

    # used
    num_predict: int | None = None  # -1 / -2: until the context is full
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: list[str] | str | None = None
    repeat_penalty: float | None = Field(default=None, gt=0)
    # accepted, no effect: the server's settings (context, threads, memory) hold
    num_ctx: int | None = None
    num_keep: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    repeat_last_n: int | None = None
    penalize_newline: bool | None = None
    # samplers this server lacks: accepted at their neutral value only
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


NEUTRAL = {
    "typical_p": (1, 1.0),
    "tfs_z": (1, 1.0),
    "mirostat": (0,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
}

Format = Literal["", "json"] | dict[str, Any]


class OllamaMessage(_Ollama):
    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: list[str] | None = None
    thinking: str | None = None


class _Generation(_Ollama):
    model: str
    format: Format | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: str | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaChat(_Generation):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerate(_Generation):
    prompt: str = ""
    images: list[str] | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    raw: bool | None = None
    context: list[int] | None = None


class OllamaShow(_Ollama):
    model: str | None = None
    name: str | None = None  # the older spelling
    verbose: bool | None = None


# -- routes ----------------------------------------------------------------------------------------


def ollama_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """ollama's error shape: `{"error": "message"}` with the status."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as e:
            return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


@ollama_errors
async def chat(request: Request) -> Response:
    engine = engine_of(request)
    auth(request, engine)
    req: OllamaChat = parse(OllamaChat, await read_body(request, engine.cfg.max_body_bytes))
    _check(req)
    if req.tools:
        raise BadRequest(f"{req.model} does not support tools", "tools", "unsupported")
    if not req.messages:  # ollama's way to load a model
        engine.ready()
        return JSONResponse(_head(engine) | {"message": _msg(""), "done": True, "done_reason": "load"})
    messages = [_openai_message(m, i) for i, m in enumerate(req.messages)]
    return await _answer(request, engine, req, messages, "message")


@ollama_errors
async def generate(request: Request) -> Response:
    engine = engine_of(request)
    auth(request, engine)
    req: OllamaGenerate = parse(OllamaGenerate, await read_body(request, engine.cfg.max_body_bytes))
    _check(req)
    for name in ("suffix", "template", "context"):
        if getattr(req, name):
            raise BadRequest(f"{name} is not supported by this server", name, "unsupported")
    if req.raw:
        raise BadRequest(
            "raw is not supported: this model answers in its own chat template", "raw", "unsupported"
        )
    if not req.prompt and not req.images:  # ollama's way to load a model
        engine.ready()
        return JSONResponse(_head(engine) | {"response": "", "done": True, "done_reason": "load"})
    messages = [] if req.system is None else [{"role": "system", "content": req.system}]
    messages.append(_openai_message(OllamaMessage(role="user", content=req.prompt, images=req.images), 0))
    return await _answer(request, engine, req, messages, "response")


async def tags(request: Request) -> Response:
    engine = engine_of(request)
    return JSONResponse({"models": [_card(engine)]})


async def ps(request: Request) -> Response:
    engine = engine_of(request)
    if engine.state != "ready":
        return JSONResponse({"models": []})
    card = _card(engine)
    size = card["size"]
    return JSONResponse(
        {
            "models": [
                card
                | {
                    "expires_at": "2318-01-01T00:00:00Z",  # kept loaded while the server runs
                    "size_vram": 0,
                    "size": size,
                    "context_length": engine.pipe.n_ctx if engine.pipe is not None else None,
                }
            ]
        }
    )


@ollama_errors
async def show(request: Request) -> Response:
    engine = engine_of(request)
    req: OllamaShow = parse(OllamaShow, await read_body(request, engine.cfg.max_body_bytes))
    name = req.model or req.name or ""
    if _base(name) != engine.cfg.model_name:
        raise NotFound(f"model '{name}' not found", "model", "model_not_found")
    pipe = engine.ready()
    card = _card(engine)
    template = pipe.prompt.first_turn("{{ .Prompt }}", with_image=pipe.vision is not None)
    info: dict[str, Any] = {
        "general.architecture": "tinygptv",
        "general.basename": engine.cfg.model_name,
        "tinygptv.context_length": pipe.n_ctx,
        "tinygptv.embedding_length": pipe.n_embd,
        "tinygptv.vision.image_tokens": pipe.image_tokens,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.vocab_size": pipe.tokenizer.vocab_size,
    }
    params = [f"num_ctx {pipe.n_ctx}", f"num_predict {engine.cfg.sampling.max_new_tokens}"]
    s = engine.cfg.sampling
    params.append(f"temperature {s.temperature if s.do_sample else 0}")
    if s.do_sample:
        params += [f"top_k {s.top_k}", f"top_p {s.top_p}", f"repeat_penalty {s.repetition_penalty}"]
    files = "\n".join(f"FROM {f}" for f in engine.info.get("files", [])) or f"FROM {engine.cfg.model_name}"
    return JSONResponse(
        {
            "modelfile": f"# served by tinygptv-edge\n{files}\nSYSTEM {json.dumps(pipe.prompt.system)}\n",
            "parameters": "\n".join(params),
            "template": template,
            "system": pipe.prompt.system,
            "details": card["details"],
            "model_info": info,
            "capabilities": ["completion", "vision"] if pipe.vision is not None else ["completion"],
            "modified_at": card["modified_at"],
        }
    )


async def version(request: Request) -> Response:
    return JSONResponse({"version": API_VERSION})


ROUTES = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/tags", tags),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/ps", ps),
    Route("/api/version", version),
]


# -- helpers ---------------------------------------------------------------------------------------


def _check(req: _Generation) -> None:
    if req.think:
        raise BadRequest(f"{req.model} does not support thinking", "think", "unsupported")
    if req.logprobs:
        raise BadRequest("logprobs is not supported by this server", "logprobs", "unsupported")
    opts = req.options
    if opts is None:
        return
    for name, ok in NEUTRAL.items():
        value = getattr(opts, name)
        if value is not None and value not in ok:
            raise BadRequest(f"options.{name}={value!r} is not supported by this server", name, "unsupported")


def _openai_message(m: OllamaMessage, i: int) -> dict:
    """An ollama message as the OpenAI message plan_chat reads (images as data: URIs)."""
    if not m.images:
        return {"role": m.role, "content": m.content}
    parts: list[dict] = [
        {
            "type": "image_url",
            "image_url": {"url": img if img.startswith("data:") else f"data:image/*;base64,{img}"},
        }
        for img in m.images
    ]
    return {"role": m.role, "content": [*parts, {"type": "text", "text": m.content}]}


def _openai_request(req: _Generation, messages: list[dict], engine: Engine) -> ChatRequest:
    o = req.options or Options()
    limit = o.num_predict
    if limit is not None and limit < 0:  # -1: unbounded, -2: fill the context
        limit = engine.pipe.n_ctx if engine.pipe is not None else None
    fmt = None
    if isinstance(req.format, dict):
        fmt = ResponseFormat.of_schema(req.format)
    elif req.format == "json":
        fmt = ResponseFormat.of_schema(None)
    stop = [o.stop] if isinstance(o.stop, str) else o.stop
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_tokens": limit or None,
        "temperature": min(o.temperature, 2.0) if o.temperature is not None else None,
        "top_p": o.top_p,
        "top_k": o.top_k,
        "min_p": o.min_p,
        "repeat_penalty": o.repeat_penalty,
        "seed": o.seed if o.seed is None or o.seed >= 0 else None,  # ollama's -1: a random seed
        "stop": stop[:4] if stop else None,
    }
    r = parse(ChatRequest, {k: v for k, v in body.items() if v is not None})
    r.response_format = fmt
    return r


async def _answer(
    request: Request, engine: Engine, req: _Generation, messages: list[dict], field: str
) -> Response:
    t0 = time.perf_counter_ns()
    pipe = engine.ready()
    openai_req = _openai_request(req, messages, engine)
    plan = plan_chat(
        openai_req, engine.cfg.sampling, engine.cfg.allow_remote_images, pipe.image_limits.max_bytes
    )
    plan.stream = req.stream
    job, first = await start(request, engine, plan)

    def piece(text: str) -> dict:
        return {field: _msg(text)} if field == "message" else {field: text}

    if not req.stream:
        result = await collect(job, request, first)
        return JSONResponse(_head(engine) | piece(result.text) | _final(result, t0))

    async def lines() -> AsyncIterator[str]:
        async with contextlib.aclosing(events(job, first)) as stream:
            async for kind, value in stream:
                if kind == "piece":
                    yield json.dumps(_head(engine) | piece(value) | {"done": False}) + "\n"
                elif kind == "error":
                    yield json.dumps({"error": value.message}) + "\n"
                else:
                    yield json.dumps(_head(engine) | piece("") | _final(value, t0)) + "\n"

    return StreamingResponse(
        lines(), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"}
    )


def _msg(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _head(engine: Engine) -> dict:
    return {"model": engine.cfg.model_name, "created_at": _now()}


def _final(r: Result, t0_ns: int) -> dict:
    t = r.timings
    ns = lambda ms: int(ms * 1e6)  # noqa: E731
    return {
        "done": True,
        "done_reason": r.finish_reason,
        "total_duration": time.perf_counter_ns() - t0_ns,
        "load_duration": 0,
        "prompt_eval_count": r.prompt_tokens,
        "prompt_eval_duration": ns(t.get("prefill_ms", 0) + t.get("image_ms", 0)),
        "eval_count": r.completion_tokens,
        "eval_duration": ns(t.get("decode_ms", 0)),
    }


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _base(name: str) -> str:
    return name[: -len(":latest")] if name.endswith(":latest") else name


def _card(engine: Engine) -> dict:
    files = [f for f in engine.info.get("files", []) if os.path.isfile(f)]
    size = sum(os.path.getsize(f) for f in files)
    stamp = max((os.path.getmtime(f) for f in files), default=engine.started)
    digest = hashlib.sha256(json.dumps([engine.cfg.model_name, files, size, stamp]).encode()).hexdigest()
    name = f"{engine.cfg.model_name}:latest"
    return {
        "name": name,
        "model": name,
        "modified_at": datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "size": size,
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "tinygptv",
            "families": ["tinygptv", "clip"],
            "parameter_size": engine.info.get("parameter_size", "3B"),
            "quantization_level": engine.info.get("quantization_level", ""),
        },
    }
