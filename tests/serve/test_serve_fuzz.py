"""API fuzzing (issue #32): request bodies generated from the server's own pydantic request models
(their JSON schemas walked into hypothesis strategies: every field, type, enum and boundary;
hypothesis-jsonschema does not run on this hypothesis release), then bent out of
shape (a field's value replaced by any JSON), sent over loopback to a live server on the tiny model.

Checked for every response: no 5xx; the body is what the route's API promises: JSON with OpenAI's
error shape (OpenAI and llama-server routes) or ollama's `{"error": ...}`, a chat completion / stream
that parses and ends in `[DONE]` or an error event, NDJSON that ends with `"done": true`.

Bounded for the suite (a few dozen examples a route, under a minute); a longer run by hand:

    TINYGPTV_FUZZ_EXAMPLES=300 .venv/bin/python -m pytest -q -s -m fuzz tests/serve/test_serve_fuzz.py
"""

from __future__ import annotations

import copy
import http.client
import json
import os

import pytest

pytestmark = [pytest.mark.fuzz, pytest.mark.torch]

pytest.importorskip("torch")  # the fixture exports the tiny model
pytest.importorskip("tinygptv_edge.runtime.language.decoder")
for _mod in ("starlette", "uvicorn", "pydantic", "llguidance"):
    pytest.importorskip(_mod, reason="the serve extra is not installed (pip install -e '.[serve]')")
jsonschema = pytest.importorskip("jsonschema")

from helpers.serve import LiveServer, export_files, loader  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tinygptv_edge.runtime.serve import llama, ollama  # noqa: E402
from tinygptv_edge.runtime.serve.schema import ChatRequest, EmbeddingRequest  # noqa: E402

EXAMPLES = int(os.environ.get("TINYGPTV_FUZZ_EXAMPLES", "25"))
COUNT = {"requests": 0, "5xx": 0}
LENGTHS = ("max_tokens", "max_completion_tokens", "n_predict", "num_predict")

OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
        }
    },
}
OLLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
CHAT = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "object": {"const": "chat.completion"},
        "choices": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "message": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {"content": {"type": "string"}},
                    },
                    "finish_reason": {"enum": ["stop", "length"]},
                },
            },
        },
    },
}
CHUNK = {
    "type": "object",
    "required": ["object", "choices"],
    "properties": {"object": {"const": "chat.completion.chunk"}},
}


def _short(schema: dict) -> dict:
    """The model's JSON schema with answer lengths capped (a fuzzed max_tokens of 10**9 would only make
    the run slow), small-ish strings and arrays."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            for key in LENGTHS:
                if key in node.get("properties", {}):
                    node["properties"][key] = {
                        "anyOf": [{"type": "integer", "minimum": -3, "maximum": 4}, {"type": "null"}]
                    }
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


ROUTES = {  # path -> (request model, the error shape of its API)
    "/v1/chat/completions": (ChatRequest, OPENAI_ERROR),
    "/v1/embeddings": (EmbeddingRequest, OPENAI_ERROR),
    "/api/chat": (ollama.OllamaChat, OLLAMA_ERROR),
    "/api/generate": (ollama.OllamaGenerate, OLLAMA_ERROR),
    "/completion": (llama.CompletionRequest, OPENAI_ERROR),
    "/tokenize": (llama.TokenizeRequest, OPENAI_ERROR),
    "/detokenize": (llama.DetokenizeRequest, OPENAI_ERROR),
}

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def from_schema(node: dict, defs: dict) -> st.SearchStrategy:
    """Values valid by a (pydantic-made) JSON schema node: $ref, anyOf, enum, const, type with bounds."""
    if "$ref" in node:
        return st.deferred(lambda: from_schema(defs[node["$ref"].rsplit("/", 1)[1]], defs))
    if "anyOf" in node or "oneOf" in node:
        return st.one_of([from_schema(n, defs) for n in node.get("anyOf", node.get("oneOf"))])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    t = node.get("type")
    if t == "null":
        return st.none()
    if t == "boolean":
        return st.booleans()
    if t == "integer":
        lo = node.get("minimum", node["exclusiveMinimum"] + 1 if "exclusiveMinimum" in node else None)
        return st.integers(lo, node.get("maximum"))
    if t == "number":
        return st.floats(
            node.get("minimum", node.get("exclusiveMinimum")),
            node.get("maximum"),
            allow_nan=False,
            exclude_min="exclusiveMinimum" in node,
        )
    if t == "string":
        return st.text(max_size=24)
    if t == "array":
        items = from_schema(node.get("items", {}), defs)
        return st.lists(items, min_size=node.get("minLength", node.get("minItems", 0)), max_size=3)
    if t == "object" and "properties" in node:
        req = set(node.get("required", ()))
        props = {k: from_schema(v, defs) for k, v in node["properties"].items()}
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in req},
            optional={k: v for k, v in props.items() if k not in req},
        )
    return JSON  # an open dict[str, Any] or anything left unsaid


def bodies(model) -> st.SearchStrategy:
    """Bodies valid by the model's schema, and the same with one field's value replaced by any JSON."""
    schema = _short(model.model_json_schema(by_alias=True))
    valid = from_schema(schema, schema.get("$defs", {}))
    props = list(model.model_json_schema(by_alias=True).get("properties", {}))

    @st.composite
    def bent(draw):
        body = draw(valid)
        key = draw(st.sampled_from(props))
        body[key] = draw(JSON)
        if key in LENGTHS and isinstance(body[key], int) and body[key] > 4:
            body[key] = 4
        return body

    return st.one_of(valid, bent())


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    files = export_files(tiny, tmp_path_factory.mktemp("fuzz"))
    with LiveServer(loader(files)) as s:
        yield s
    print(f"\nfuzz: {COUNT}")


def send(port: int, path: str, body: object) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.headers.get("content-type", ""), r.read()
    finally:
        conn.close()


def check(path: str, error_shape: dict, body: dict, status: int, ctype: str, data: bytes) -> None:
    COUNT["requests"] += 1
    COUNT[f"{status // 100}xx"] = COUNT.get(f"{status // 100}xx", 0) + 1
    if status >= 500:
        COUNT["5xx"] += 1
    assert status < 500, (path, body, status, data[:500])
    if status >= 400:
        jsonschema.validate(json.loads(data), error_shape)
        return
    assert status == 200, (status, data[:300])
    if ctype.startswith("text/event-stream"):
        events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
        assert events, data[:300]
        last = events[-1] if events[-1] == "[DONE]" else json.loads(events[-1])
        # OpenAI's streams end with [DONE], llama-server's /completion with `"stop": true`
        assert last == "[DONE]" or "error" in last or last.get("stop") is True, events[-3:]
        for e in events[:-1]:
            parsed = json.loads(e)
            if "error" not in parsed and path == "/v1/chat/completions":
                jsonschema.validate(parsed, CHUNK)
    elif ctype.startswith("application/x-ndjson"):
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        assert lines and (lines[-1].get("done") is True or "error" in lines[-1]), lines[-2:]
    else:
        parsed = json.loads(data)
        if path == "/v1/chat/completions":
            jsonschema.validate(parsed, CHAT)
        elif path.startswith("/api/"):
            assert parsed.get("done") is True, parsed


@pytest.mark.parametrize("path", list(ROUTES))
def test_generated_requests_get_no_5xx_and_well_formed_answers(server, path):
    model, error_shape = ROUTES[path]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )
    @given(bodies(model))
    def run(body):
        check(path, error_shape, body, *send(server.port, path, body))

    run()


@given(st.one_of(JSON, st.binary(max_size=64)))
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_body_on_any_route_gets_no_5xx(server, body):
    for path, (_, error_shape) in ROUTES.items():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            conn.request("POST", path, raw, {"Content-Type": "application/json"})
            r = conn.getresponse()
            check(path, error_shape, {"raw": body}, r.status, r.headers.get("content-type", ""), r.read())
        finally:
            conn.close()


@pytest.mark.parametrize("penalty", [5e-324, 1e-310, 1e308])
def test_found_by_fuzzing_an_extreme_repeat_penalty_is_answered(server, penalty):
    """repeat_penalty 5e-324 made a seen token's logit infinite and sampling raised (a 500)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi hi hi"}], "max_tokens": 4}
    body |= {"temperature": 1.0, "repeat_penalty": penalty, "seed": 1}
    status, ctype, data = send(server.port, "/v1/chat/completions", body)
    assert status == 200, data[:300]
    check("/v1/chat/completions", OPENAI_ERROR, body, status, ctype, data)


LONE_SURROGATE = {  # JSON can spell a lone UTF-16 surrogate; hypothesis' text() never draws one
    "/tokenize": '{"content": "a\\ud800b"}',
    "/v1/embeddings": '{"model": "m", "input": "data:,\\udfff"}',
    "/v1/chat/completions": '{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "/api/generate": '{"model": "m", "prompt": "\\ud800", "stream": false}',
    "/completion": '{"prompt": "hi", "stop": ["\\udc80"]}',
}


@pytest.mark.parametrize("path", list(LONE_SURROGATE))
def test_found_by_probing_a_lone_surrogate_in_any_string_is_a_400_naming_it(server, path):
    """/tokenize (ConfigError from the tokenizer) and /v1/embeddings (UnicodeEncodeError unquoting the
    data: URI) answered a lone surrogate with a 500; read_body now refuses one in any string."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, LONE_SURROGATE[path].encode(), {"Content-Type": "application/json"})
        r = conn.getresponse()
        status, data = r.status, r.read()
    finally:
        conn.close()
    assert status == 400, data[:300]
    body = json.loads(data)
    message = body["error"] if path.startswith("/api/") else body["error"]["message"]
    assert "expected UTF-8 text" in message, body
    if not path.startswith("/api/"):
        assert body["error"]["param"] in {"content", "input", "messages.0.content", "stop.0"}, body
    # a surrogate pair is one character, not an error
    ok = send(server.port, "/tokenize", {"content": "\U0001f600"})
    assert ok[0] == 200, ok
