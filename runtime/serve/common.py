"""What every API's handlers share (OpenAI's in app.py, ollama's in ollama.py, llama-server's in
llama.py): the Engine, the API key, the body, and a ChatPlan run as a job.

    plan --start(request, plan)--> (job, first event)   errors before the first piece keep their status
         --collect(...)--> Result                        the whole answer
         --events(job, first)--> ("piece", text)* then ("done", Result) | ("error", APIError)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import AsyncGenerator

from starlette.requests import Request

from ..errors import ConfigError
from ..text.tokenizer import check_text
from .engine import Engine, Job, Result
from .errors import APIError, BadRequest, PayloadTooLarge, Unauthorized
from .schema import ChatPlan

POLL_S = 0.25  # how often a waiting handler checks whether its client is still there
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a UTF-16 surrogate gets into JSON text


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


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
    if SURROGATE_ESCAPE.search(data):
        _check_strings(parsed, "")
    return parsed


def _check_strings(value: object, param: str) -> None:
    """Every string in a body is UTF-8 text. JSON can spell a lone surrogate (`"\\ud800"`), which no
    tokenizer, encoder or image decoder takes: refused here, once for every route, naming where it is."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, param or "body")
            _check_strings(v, f"{param}.{k}" if param else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{param}.{i}" if param else str(i))
    elif isinstance(value, str):
        try:
            check_text(value, param)
        except ConfigError as e:
            raise BadRequest(str(e), param, "invalid_value") from None


async def next_event(job: Job, request: Request) -> tuple:
    """The job's next event; a client that disconnects meanwhile stops the job."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.stop("disconnected")
                raise APIError("client disconnected", code="client_disconnected") from None


async def start(request: Request, engine: Engine, plan: ChatPlan) -> tuple[Job, tuple]:
    """Admit the plan's answer and wait for its first event (an error there is raised: its status
    still goes out, as no byte has)."""
    constraint = engine.constraint(plan)
    job = await engine.submit(lambda j: engine.chat(j, plan, constraint))
    first = await next_event(job, request)
    if first[0] == "error":
        raise first[1]
    return job, first


async def collect(job: Job, request: Request, first: tuple) -> Result:
    """The whole answer (the worker joins the pieces into Result.text)."""
    event = first
    while event[0] == "piece":
        event = await next_event(job, request)
    if event[0] == "error":
        raise event[1]
    return event[1]


async def events(job: Job, first: tuple) -> AsyncGenerator[tuple, None]:
    """The job's events from `first` to its last ("done" or "error"); a stream closed before that (the
    client went away: Starlette cancels it) stops generating. Iterate under contextlib.aclosing."""
    finished = False
    try:
        event = first
        while True:
            if event[0] != "piece":
                finished = True
            yield event
            if finished:
                return
            event = await job.events.get()
    finally:
        if not finished:
            job.stop("disconnected")


def package_version() -> str:
    """tinygptv-edge's installed version ("dev" from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tinygptv-edge")
    except PackageNotFoundError:
        return "dev"


def usage(r: Result) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
    }
