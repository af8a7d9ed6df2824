"""`GET /openapi.json`: an OpenAPI 3.1 document made from the server's own pydantic models.

    OPERATIONS (method, path) -> Operation(request model, answer model or media type, error model, ...)
        --document(routes)--> {"openapi": "3.1.0", "paths": ..., "components": {"schemas": ...}}

The request models are the ones the handlers validate with (schema.py, ollama.py, llama.py) and the
answer models are responses.py's, so the document cannot say something the server does not check. Every
route the app serves must have a row here and every row a route: `document` raises OpenAPIError naming
the one missing. Written by hand rather than with a framework's generator because the server is
Starlette (no FastAPI) and the table is short; pydantic's `models_json_schema` does the schemas.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.routing import BaseRoute, Route

from ..errors import TinyGPTVError
from . import llama, ollama
from . import responses as r
from .schema import ChatRequest, EmbeddingRequest

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
REF = "#/components/schemas/{model}"


class OpenAPIError(TinyGPTVError):
    """The route table and the OpenAPI table disagree."""


@dataclass(frozen=True)
class Operation:
    summary: str
    answer: type[BaseModel] | str  # the 200 body: a model (application/json) or a media type (text)
    request: type[BaseModel] | None = None  # the JSON body, for POST
    error: type[BaseModel] = r.Error  # the body of every other status
    stream: str | None = None  # the media type of the answer when the request asks for a stream
    auth: bool = True  # `Authorization: Bearer KEY` when the server has --api-key
    also: dict[int, type[BaseModel]] = field(default_factory=dict)  # more statuses with their own body
    tag: str = "openai"


OPERATIONS: dict[tuple[str, str], Operation] = {
    # OpenAI (app.py)
    ("GET", "/"): Operation("The web page", "text/html", auth=False, tag="page"),
    ("GET", "/openapi.json"): Operation("This document", "application/json", auth=False, tag="page"),
    ("GET", "/health"): Operation(
        "200 when ready; 503 while loading or shutting down", r.Health, auth=False, also={503: r.Health}
    ),
    ("GET", "/v1/models"): Operation("The one model", r.ModelList),
    ("GET", "/v1/models/{model_id}"): Operation("The model's card (404 for another id)", r.ModelCard),
    ("POST", "/v1/chat/completions"): Operation(
        "Chat completion (text and image_url parts)", r.ChatCompletion, ChatRequest, stream=SSE
    ),
    ("POST", "/v1/embeddings"): Operation("Image embeddings", r.Embeddings, EmbeddingRequest),
    # llama-server (llama.py)
    **{
        ("POST", path): Operation(
            "llama-server's completion", r.Completion, llama.CompletionRequest, stream=SSE, tag="llama"
        )
        for path in ("/completion", "/completions")
    },
    ("POST", "/v1/completions"): Operation(
        "OpenAI's legacy completions", r.TextCompletion, llama.CompletionRequest, stream=SSE, tag="llama"
    ),
    ("POST", "/tokenize"): Operation("Text to token ids", r.Tokens, llama.TokenizeRequest, tag="llama"),
    ("POST", "/detokenize"): Operation(
        "Token ids to text", r.Detokenized, llama.DetokenizeRequest, tag="llama"
    ),
    ("GET", "/props"): Operation("Server and generation settings", r.Props, auth=False, tag="llama"),
    ("GET", "/metrics"): Operation("Prometheus text", "text/plain", auth=False, tag="llama"),
    # ollama (ollama.py)
    ("POST", "/api/chat"): Operation(
        "ollama chat", r.OllamaChatAnswer, ollama.OllamaChat, r.OllamaError, NDJSON, tag="ollama"
    ),
    ("POST", "/api/generate"): Operation(
        "ollama generate", r.OllamaGenerateAnswer, ollama.OllamaGenerate, r.OllamaError, NDJSON, tag="ollama"
    ),
    ("GET", "/api/tags"): Operation("ollama's model list", r.Tags, auth=False, tag="ollama"),
    ("POST", "/api/show"): Operation(
        "ollama's model details", r.ShowAnswer, ollama.OllamaShow, r.OllamaError, auth=False, tag="ollama"
    ),
    ("GET", "/api/ps"): Operation("ollama's loaded models", r.RunningModels, auth=False, tag="ollama"),
    ("GET", "/api/version"): Operation(
        "The ollama API level followed", r.VersionAnswer, auth=False, tag="ollama"
    ),
}


def document(routes: Sequence[BaseRoute], version: str = "0") -> dict[str, Any]:
    """The OpenAPI 3.1 document for `routes` (the app's ROUTES), from OPERATIONS."""
    served = set()
    for route in routes:
        if not isinstance(route, Route):
            raise OpenAPIError(f"expected starlette Routes, got {type(route).__name__} for {route!r}")
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            served.add((method, _path(route.path)))
    missing = sorted(served - OPERATIONS.keys())
    if missing:
        raise OpenAPIError(f"expected an OPERATIONS row for every route, got none for {missing}")
    stale = sorted(OPERATIONS.keys() - served)
    if stale:
        raise OpenAPIError(f"expected every OPERATIONS row to be a served route, got no route for {stale}")

    ops = [(key, OPERATIONS[key]) for key in sorted(served, key=lambda k: (k[1], k[0]))]
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for _, op in ops:
        if op.request is not None:
            models.append((op.request, "validation"))
        for m in (op.answer, op.error, *op.also.values()):
            if isinstance(m, type):
                models.append((m, "serialization"))
    models = list(dict.fromkeys(models))
    refs, defs = models_json_schema(models, by_alias=True, ref_template=REF)

    def content(m: type[BaseModel] | str, mode: JsonSchemaMode, stream: str | None = None) -> dict:
        if isinstance(m, str):
            return {m: {"schema": {} if m.endswith("json") else {"type": "string"}}}
        body = {"application/json": {"schema": refs[(m, mode)]}}
        if stream is not None:  # events, not one document: docs/serve.md says what each carries
            body[stream] = {"schema": {"description": "the answer as events (the request's stream: true)"}}
        return body

    paths: dict[str, dict[str, Any]] = {}
    for (method, path), op in ops:
        spec: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path)}",
            "tags": [op.tag],
            "responses": {
                "200": {"description": "OK", "content": content(op.answer, "serialization", op.stream)},
                **{
                    str(status): {"description": "see the body", "content": content(m, "serialization")}
                    for status, m in op.also.items()
                },
                "default": {"description": "an error", "content": content(op.error, "serialization")},
            },
        }
        params = re.findall(r"{(\w+)}", path)
        if params:
            spec["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
            ]
        if op.request is not None:
            spec["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(op.request, "validation")]}},
            }
        if op.auth:
            spec["security"] = [{"bearer": []}, {}]  # {}: a server without --api-key needs none
        paths.setdefault(path, {})[method.lower()] = spec
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tinygptv-edge serve",
            "version": version,
            "description": "OpenAI's, ollama's and llama-server's APIs on one model (docs/serve.md).",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _path(starlette_path: str) -> str:
    """Starlette's `/v1/models/{model_id:path}` as OpenAPI's `/v1/models/{model_id}`."""
    return re.sub(r"{(\w+):\w+}", r"{\1}", starlette_path)
