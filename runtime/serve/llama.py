"""llama-server's routes on the same Engine, for clients and scripts written against llama.cpp's server.

    POST /completion      {"prompt", "n_predict", ...}: llama-server's native answer (`content`, `stop`,
                          `stop_type`, `timings`); `"stream": true` sends `data: {...}` events
    POST /v1/completions  OpenAI's legacy completions (`choices[0].text`), the same fields accepted
    POST /tokenize        {"content", "with_pieces"?} -> {"tokens"}
    POST /detokenize      {"tokens"} -> {"content"}
    GET  /props           context, default generation settings, template, modalities
    GET  /metrics         Prometheus text (metrics.py)

The model answers in its chat template only, so a `prompt` is this turn's question (the template is put
around it, as /v1/chat/completions does), not raw text to continue. Images come as llama-server sends
them: `image_data: [{"data": BASE64, "id": N}]` (the `[img-N]` marker is removed from the prompt) or
`{"prompt_string", "multimodal_data": [BASE64]}`. Sampling: `n_predict`, `temperature`, `top_k`,
`top_p`, `min_p`, `repeat_penalty`, `seed`, `stop`; constraints: `grammar` (GBNF), `json_schema`,
`response_format`. `cache_prompt` is accepted (the KV cache is always reused); llama-server's samplers
this server lacks are accepted at their neutral values only.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .common import auth, collect, engine_of, events, package_version, read_body, start, usage
from .engine import Engine, Result
from .errors import BadRequest
from .schema import ChatPlan, ResponseFormat, StreamOptions, constraint_format, image_ref, parse, sampling

MARKER = re.compile(r"\[img-\d+\]|<__media__>")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageData(_Strict):
    data: str
    id: int | None = None


class MultimodalPrompt(_Strict):
    prompt_string: str
    multimodal_data: list[str] | None = None


class CompletionRequest(_Strict):
    """llama-server's /completion fields and OpenAI's /v1/completions fields, in one model."""

    prompt: str | list[str] | MultimodalPrompt = ""
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n_predict: int | None = Field(default=None, ge=-1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = None  # accepted: the penalty looks at the whole answer
    seed: int | None = None  # -1: a random seed
    stop: str | list[str] | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    image_data: list[ImageData] | None = None
    cache_prompt: bool | None = None
    id_slot: int | None = None
    n_keep: int | None = None
    timings_per_token: bool | None = None
    samplers: list[str] | str | None = None
    user: str | None = None
    # accepted at their neutral value only
    n_probs: int | None = None
    ignore_eos: bool | None = None
    typical_p: float | None = None
    mirostat: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


NEUTRAL: dict[str, tuple] = {
    "n_probs": (0,),
    "ignore_eos": (False,),
    "typical_p": (1, 1.0),
    "mirostat": (0,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (0,),
    "suffix": ("",),
}


class TokenizeRequest(_Strict):
    content: str
    add_special: bool | None = False
    parse_special: bool | None = None
    with_pieces: bool | None = False


class DetokenizeRequest(_Strict):
    tokens: list[int]


# -- routes ----------------------------------------------------------------------------------------


async def completion(request: Request) -> Response:
    """llama-server's native /completion."""
    engine, req, plan = await _plan(request)
    job, first = await start(request, engine, plan)
    base = {"model": engine.cfg.model_name, "id_slot": 0, "index": 0}
    if not plan.stream:
        result = await collect(job, request, first)
        return JSONResponse(base | {"content": result.text} | _final(engine, plan, result))

    async def sse() -> AsyncIterator[str]:
        async with contextlib.aclosing(events(job, first)) as stream:
            async for kind, value in stream:
                if kind == "piece":
                    body = base | {"content": value, "stop": False}
                elif kind == "error":
                    body = value.body()
                else:
                    body = base | {"content": ""} | _final(engine, plan, value)
                yield "data: " + json.dumps(body) + "\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers=STREAM_HEADERS)


async def completions(request: Request) -> Response:
    """OpenAI's legacy /v1/completions."""
    engine, req, plan = await _plan(request)
    job, first = await start(request, engine, plan)
    meta = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": engine.cfg.model_name,
    }

    def choice(text: str, finish: str | None) -> dict:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    if not plan.stream:
        result = await collect(job, request, first)
        return JSONResponse(
            meta
            | {"choices": [choice(result.text, result.finish_reason)], "usage": usage(result)}
            | {"timings": result.timings}
        )

    async def sse() -> AsyncIterator[str]:
        async with contextlib.aclosing(events(job, first)) as stream:
            async for kind, value in stream:
                if kind == "piece":
                    yield "data: " + json.dumps(meta | {"choices": [choice(value, None)]}) + "\n\n"
                elif kind == "error":
                    yield "data: " + json.dumps(value.body()) + "\n\n"
                else:
                    last = meta | {"choices": [choice("", value.finish_reason)], "timings": value.timings}
                    yield "data: " + json.dumps(last) + "\n\n"
                    if plan.include_usage:
                        yield "data: " + json.dumps(meta | {"choices": [], "usage": usage(value)}) + "\n\n"
                    yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers=STREAM_HEADERS)


async def tokenize(request: Request) -> Response:
    engine = engine_of(request)
    auth(request, engine)
    req: TokenizeRequest = parse(TokenizeRequest, await read_body(request, engine.cfg.max_body_bytes))
    tok = engine.ready().tokenizer
    ids = tok.encode(req.content)
    if req.add_special and engine.ready().prompt.add_bos:
        ids = [tok.bos_id, *ids]
    if not req.with_pieces:
        return JSONResponse({"tokens": ids})
    pieces = []
    for i in ids:
        raw = tok.decode([i], skip_special_tokens=False)
        pieces.append({"id": i, "piece": raw})
    return JSONResponse({"tokens": pieces})


async def detokenize(request: Request) -> Response:
    engine = engine_of(request)
    auth(request, engine)
    req: DetokenizeRequest = parse(DetokenizeRequest, await read_body(request, engine.cfg.max_body_bytes))
    tok = engine.ready().tokenizer
    bad = [t for t in req.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise BadRequest(
            f"tokens: {bad[0]} is not a token id (0..{tok.vocab_size - 1})", "tokens", "invalid_value"
        )
    return JSONResponse({"content": tok.decode(req.tokens, skip_special_tokens=False)})


async def props(request: Request) -> Response:
    engine = engine_of(request)
    pipe = engine.ready()
    return JSONResponse(
        {
            "default_generation_settings": {"n_ctx": pipe.n_ctx, "params": _settings(engine.cfg.sampling)},
            "total_slots": 1,
            "model_alias": engine.cfg.model_name,
            "model_path": engine.info.get("language", ""),
            "modalities": {"vision": pipe.vision is not None, "audio": False},
            "chat_template": pipe.prompt.first_turn("{{ prompt }}", with_image=pipe.vision is not None),
            "bos_token": pipe.tokenizer.hf.id_to_token(pipe.tokenizer.bos_id),
            "eos_token": pipe.tokenizer.hf.id_to_token(pipe.tokenizer.eos_id),
            "build_info": f"tinygptv-edge {package_version()}",
        }
    )


async def metrics(request: Request) -> Response:
    engine = engine_of(request)
    return PlainTextResponse(engine.metrics.render(engine), media_type="text/plain; version=0.0.4")


ROUTES = [
    Route("/completion", completion, methods=["POST"]),
    Route("/completions", completion, methods=["POST"]),  # llama-server's alias
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/props", props),
    Route("/metrics", metrics),
]

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- helpers ---------------------------------------------------------------------------------------


async def _plan(request: Request) -> tuple[Engine, CompletionRequest, ChatPlan]:
    engine = engine_of(request)
    auth(request, engine)
    req: CompletionRequest = parse(CompletionRequest, await read_body(request, engine.cfg.max_body_bytes))
    for name, ok in NEUTRAL.items():
        value = getattr(req, name)
        if value is not None and value not in ok:
            raise BadRequest(f"{name}={value!r} is not supported by this server", name, "unsupported")
    pipe = engine.ready()
    limit = pipe.image_limits.max_bytes
    prompt, images = req.prompt, []
    if isinstance(prompt, MultimodalPrompt):
        images = [(f"prompt.multimodal_data.{i}", d) for i, d in enumerate(prompt.multimodal_data or [])]
        prompt = prompt.prompt_string
    elif isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest(f"prompt: one prompt per request, got {len(prompt)}", "prompt", "invalid_value")
        prompt = prompt[0]
    images += [(f"image_data.{i}", d.data) for i, d in enumerate(req.image_data or [])]
    if len(images) > 1:
        raise BadRequest(
            f"at most one image per request (the template has one slot), got {len(images)}",
            images[1][0],
            "too_many_images",
        )
    image = None
    if images:
        param, data = images[0]
        image = image_ref(data if data.startswith("data:") else f"data:;base64,{data}", False, limit, param)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    n_predict = req.n_predict if req.n_predict is not None and req.n_predict > 0 else None
    if req.n_predict == -1:
        n_predict = pipe.n_ctx  # llama-server's "until the context is full"
    plan = ChatPlan(
        system=None,
        history=[],
        question=MARKER.sub("", prompt).strip(),
        image=image,
        sampling=sampling(
            engine.cfg.sampling,
            max_tokens=req.max_tokens or n_predict,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repeat_penalty=req.repeat_penalty,
            seed=req.seed if req.seed is None or req.seed >= 0 else None,
        ),
        stop=[s for s in stops if s],
        response_format=constraint_format(req.response_format, req.json_schema, req.grammar),
        grammar=req.grammar or None,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )
    return engine, req, plan


def _final(engine: Engine, plan: ChatPlan, r: Result) -> dict:
    t = r.timings
    prompt_ms = t.get("prefill_ms", 0.0) + t.get("image_ms", 0.0)
    n_prompt, n_pred, pred_ms = t.get("prefill_tokens", 0), r.completion_tokens, t.get("decode_ms", 0.0)
    stop_type = {"word": "word", "max_new_tokens": "limit", "context": "limit"}.get(r.stop, "eos")
    return {
        "stop": True,
        "stop_type": stop_type,
        "stopping_word": next((s for s in plan.stop if stop_type == "word"), ""),
        "tokens_predicted": n_pred,
        "tokens_evaluated": r.prompt_tokens,
        "tokens_cached": r.cached_tokens,
        "truncated": False,
        "prompt": plan.question,
        "generation_settings": {
            "n_ctx": engine.pipe.n_ctx if engine.pipe else None,
            **_settings(plan.sampling),
        },
        "timings": {
            "cache_n": r.cached_tokens,
            "prompt_n": n_prompt,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / n_prompt if n_prompt else 0.0,
            "prompt_per_second": n_prompt / (prompt_ms / 1e3) if prompt_ms > 0 else 0.0,
            "predicted_n": n_pred,
            "predicted_ms": pred_ms,
            "predicted_per_token_ms": pred_ms / n_pred if n_pred else 0.0,
            "predicted_per_second": t.get("decode_tok_s", 0.0),
            "first_token_ms": t.get("first_token_ms", 0.0),
        },
    }


def _settings(s: Any) -> dict:
    return {
        "n_predict": s.max_new_tokens,
        "temperature": s.temperature if s.do_sample else 0.0,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repeat_penalty": s.repetition_penalty,
        "seed": s.seed if s.seed is not None else -1,
    }
