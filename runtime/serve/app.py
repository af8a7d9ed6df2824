"""The HTTP layer: OpenAI's routes on Starlette, over one Engine.

    GET  /                     the web page (static/index.html: no build step, no CDN)
    GET  /health               200 {"status": "ok", ...} when ready, 503 while loading
    GET  /v1/models[/{id}]     the one model
    POST /v1/chat/completions  text + image_url parts, stream (SSE), sampling, stop, response_format
    POST /v1/embeddings        the (Q, H) image embeddings of data: URI inputs, flattened row by row

With an API key set, /v1/* needs `Authorization: Bearer KEY` (401 otherwise). Every error has OpenAI's
shape. A streamed answer's HTTP status is sent with its first piece, so errors found before it (context
overflow, a bad image) are still plain 4xx responses.

One handler per route, each a module-level function (ROUTES lists them); they find the Engine in
`request.app.state.engine`, where `create_app` puts it. `create_app` only wires routes, error handlers
and the lifespan (which starts the engine and closes it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Job, Result
from .errors import APIError, BadRequest, NotFound, PayloadTooLarge, ServerError, Unauthorized
from .schema import ChatRequest, EmbeddingRequest, image_ref, parse, plan_chat

POLL_S = 0.25  # how often a waiting handler checks whether its client is still there


def create_app(engine: Engine) -> Starlette:
    """The routes below on `engine` (kept in `app.state.engine`; the lifespan starts and closes it)."""
    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.engine = engine
    return app


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    engine: Engine = app.state.engine
    engine.start()
    try:
        yield
    finally:
        await engine.close()


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


# -- routes ----------------------------------------------------------------------------------------


async def index(request: Request) -> Response:
    page = resources.files(__package__).joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})


async def health(request: Request) -> Response:
    engine = engine_of(request)
    body = engine.health()
    status = {"ready": 200, "loading": 503, "closed": 503}.get(engine.state, 500)
    headers = {"Retry-After": "5"} if status == 503 else {}
    return JSONResponse(body, status, headers=headers)


async def models(request: Request) -> Response:
    engine = engine_of(request)
    auth(request, engine)
    return JSONResponse({"object": "list", "data": [model_card(engine)]})


async def model(request: Request) -> Response:
    engine = engine_of(request)
    auth(request, engine)
    if request.path_params["model_id"] != engine.cfg.model_name:
        raise NotFound(
            f"The model {request.path_params['model_id']!r} does not exist", "model", "model_not_found"
        )
    return JSONResponse(model_card(engine))


async def chat_completions(request: Request) -> Response:
    engine = engine_of(request)
    auth(request, engine)
    req = parse(ChatRequest, await read_body(request, engine.cfg.max_body_bytes))
    pipe = engine.ready()
    limit = pipe.image_limits.max_bytes
    plan = plan_chat(req, engine.cfg.sampling, engine.cfg.allow_remote_images, limit)
    constraint = engine.constraint(plan)
    job = await engine.submit(lambda j: engine.chat(j, plan, constraint))
    meta = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": engine.cfg.model_name,
    }
    first = await next_event(job, request)  # before any byte goes out: errors keep their status
    if first[0] == "error":
        raise first[1]
    if plan.stream:
        return StreamingResponse(
            sse(job, first, meta, plan.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    event = first
    while event[0] == "piece":  # the worker joins the pieces into Result.text
        event = await next_event(job, request)
    if event[0] == "error":
        raise event[1]
    result: Result = event[1]
    return JSONResponse(
        {
            **meta,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage(result),
            "timings": result.timings,
        }
    )


async def embeddings(request: Request) -> Response:
    engine = engine_of(request)
    auth(request, engine)
    req = parse(EmbeddingRequest, await read_body(request, engine.cfg.max_body_bytes))
    if req.dimensions is not None:
        raise BadRequest("dimensions is not supported by this server", "dimensions", "unsupported")
    pipe = engine.ready()
    inputs = [req.input] if isinstance(req.input, str) else req.input
    limit = pipe.image_limits.max_bytes
    refs = [image_ref(x, engine.cfg.allow_remote_images, limit, f"input.{i}") for i, x in enumerate(inputs)]
    job = await engine.submit(lambda j: engine.embed(j, refs))
    kind, value = await next_event(job, request)
    if kind == "error":
        raise value
    data = []
    for i, e in enumerate(value):
        flat = np.ascontiguousarray(e, dtype="<f4").reshape(-1)
        vec = base64.b64encode(flat.tobytes()).decode() if req.encoding_format == "base64" else flat.tolist()
        data.append({"object": "embedding", "index": i, "embedding": vec, "shape": list(e.shape)})
    n = sum(e.shape[0] for e in value)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": engine.cfg.model_name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
    )


ROUTES = [
    Route("/", index),
    Route("/health", health),
    Route("/v1/models", models),
    Route("/v1/models/{model_id:path}", model),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]


# -- errors ----------------------------------------------------------------------------------------


async def on_api_error(request: Request, e: APIError) -> Response:
    return JSONResponse(e.body(), e.status, headers=e.headers)


async def on_http_error(request: Request, e: HTTPException) -> Response:
    err = APIError(str(e.detail), code={404: "not_found", 405: "method_not_allowed"}.get(e.status_code))
    return JSONResponse(err.body(), e.status_code, headers=getattr(e, "headers", None))


async def on_error(request: Request, e: Exception) -> Response:
    err = ServerError(f"internal error: {type(e).__name__}")
    return JSONResponse(err.body(), err.status)


EXCEPTION_HANDLERS: dict[Any, Callable[..., Awaitable[Response]]] = {  # exception type -> handler
    APIError: on_api_error,
    HTTPException: on_http_error,
    Exception: on_error,
}


# -- helpers ---------------------------------------------------------------------------------------


def model_card(engine: Engine) -> dict:
    return {
        "id": engine.cfg.model_name,
        "object": "model",
        "created": int(engine.started),
        "owned_by": "local",
    }


def auth(request: Request, engine: Engine) -> None:
    """With an API key set: `Authorization: Bearer KEY` or Unauthorized."""
    key = engine.cfg.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized(
            "Incorrect API key provided" if given else "Missing API key: send Authorization: Bearer KEY",
            code="invalid_api_key",
        )


async def read_body(request: Request, cap: int) -> dict:
    """The JSON object the request carries, at most `cap` bytes (declared or read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(f"the request body is over {cap} bytes", code="body_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > cap:
            raise PayloadTooLarge(f"the request body is over {cap} bytes", code="body_too_large")
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(
            f"We could not parse the JSON body of your request ({e})", code="invalid_json"
        ) from None
    if not isinstance(parsed, dict):
        raise BadRequest("the JSON body must be an object", code="invalid_json")
    return parsed


async def sse(job: Job, first: tuple, meta: dict, include_usage: bool) -> AsyncIterator[str]:
    """A chat completion as server-sent events, from its first event on."""
    finished = False

    def chunk(delta: dict, finish: str | None = None, **extra: object) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return (
            "data: "
            + json.dumps({**meta, "object": "chat.completion.chunk", "choices": [choice], **extra})
            + "\n\n"
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while True:
            kind, value = event
            if kind == "piece":
                yield chunk({"content": value})
            elif kind == "error":
                yield "data: " + json.dumps(value.body()) + "\n\n"
                finished = True
                return
            else:
                yield chunk({}, value.finish_reason, timings=value.timings)
                if include_usage:
                    body = {
                        **meta,
                        "object": "chat.completion.chunk",
                        "choices": [],
                        "usage": usage(value),
                    }
                    yield "data: " + json.dumps(body) + "\n\n"
                yield "data: [DONE]\n\n"
                finished = True
                return
            event = await job.events.get()
    finally:
        if not finished:  # the client went away (Starlette cancels this generator): stop generating
            job.stop("disconnected")


def usage(r: Result) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
    }


async def next_event(job: Job, request: Request) -> tuple:
    """The job's next event; a client that disconnects meanwhile stops the job."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.stop("disconnected")
                raise APIError("client disconnected", code="client_disconnected") from None


CSP = (  # the page loads nothing from elsewhere
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'"
)
