"""The HTTP layer: OpenAI's routes on Starlette, over one Engine (ollama's: ollama.py; llama-server's:
llama.py; both in ROUTES too).

    GET  /                     the web page (static/index.html: no build step, no CDN)
    GET  /openapi.json         the OpenAPI 3.1 document of every route (openapi.py)
    GET  /health               200 {"status": "ok", ...} when ready, 503 while loading
    GET  /v1/models[/{id}]     the one model (404 for another id)
    POST /v1/chat/completions  text + image_url parts, stream (SSE), sampling, stop, response_format
    POST /v1/embeddings        the (Q, H) image embeddings of data: URI inputs, flattened row by row

With an API key set, /v1/* needs `Authorization: Bearer KEY` (401 otherwise). Every error has OpenAI's
shape. A streamed answer's HTTP status is sent with its first piece, so errors found before it (context
overflow, a bad image) are still plain 4xx responses.

One handler per route, each a module-level function (ROUTES lists them); they find the Engine in
`request.app.state.engine`, where `create_app` puts it. `create_app` only wires routes, error handlers,
CORS (`cors_origins`) and the lifespan (which starts the engine and closes it).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import llama, ollama
from .common import auth, collect, engine_of, events, next_event, package_version, read_body, start, usage
from .engine import Engine, Job
from .errors import APIError, BadRequest, NotFound, ServerError
from .openapi import document
from .schema import ChatRequest, EmbeddingRequest, image_ref, parse, plan_chat


def create_app(engine: Engine, cors_origins: list[str] | None = None) -> Starlette:
    """The routes below on `engine` (kept in `app.state.engine`; the lifespan starts and closes it).
    `cors_origins`: the browser origins allowed to call the API ("*": any), OPTIONS preflights answered."""
    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=["Retry-After"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan, middleware=middleware
    )
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


# -- routes ----------------------------------------------------------------------------------------


async def index(request: Request) -> Response:
    page = resources.files(__package__).joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})


async def openapi(request: Request) -> Response:
    """The OpenAPI 3.1 document of every route (openapi.py), made once per app."""
    doc = getattr(request.app.state, "openapi", None)
    if doc is None:
        doc = request.app.state.openapi = document(request.app.routes, package_version())
    return JSONResponse(doc)


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
    meta = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": engine.cfg.model_name,
    }
    job, first = await start(request, engine, plan)  # before any byte goes out: errors keep their status
    if plan.stream:
        return StreamingResponse(
            sse(job, first, meta, plan.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    result = await collect(job, request, first)
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
    Route("/openapi.json", openapi),
    Route("/health", health),
    Route("/v1/models", models),
    Route("/v1/models/{model_id:path}", model),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    *llama.ROUTES,
    *ollama.ROUTES,
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


async def sse(job: Job, first: tuple, meta: dict, include_usage: bool) -> AsyncIterator[str]:
    """A chat completion as server-sent events, from its first event on."""

    def chunk(delta: dict, finish: str | None = None, **extra: object) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return (
            "data: "
            + json.dumps({**meta, "object": "chat.completion.chunk", "choices": [choice], **extra})
            + "\n\n"
        )

    yield chunk({"role": "assistant", "content": ""})
    async with contextlib.aclosing(events(job, first)) as stream:
        async for kind, value in stream:
            if kind == "piece":
                yield chunk({"content": value})
            elif kind == "error":
                yield "data: " + json.dumps(value.body()) + "\n\n"
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


CSP = (  # the page loads nothing from elsewhere
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'"
)
