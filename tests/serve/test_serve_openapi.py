"""GET /openapi.json and API fuzzing from it with schemathesis (issue #32): every operation the document
lists gets requests generated from its schemas (valid and invalid bodies, path parameters), sent to a live
server on the tiny model; each response must not be a 5xx and must match the schema documented for its
status and media type (responses.py's models; every error has its API's error shape).

Bounded for the suite (30 generated requests an operation, about ten seconds); a longer run by hand,
with schemathesis' coverage phase too (the numbers: docs/serve.md):

    TINYGPTV_OPENAPI_EXAMPLES=100 TINYGPTV_OPENAPI_COVERAGE=1 \
        .venv/bin/python -m pytest -q -s -m fuzz tests/serve/test_serve_openapi.py
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request
from collections import Counter

import pytest
from helpers.serve import data_uri, png, require_serve_stack

require_serve_stack()
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402
from starlette.routing import Route  # noqa: E402

from tinygptv_edge.runtime.serve import app as app_module  # noqa: E402
from tinygptv_edge.runtime.serve.openapi import OPERATIONS, OpenAPIError, document  # noqa: E402

EXAMPLES = int(os.environ.get("TINYGPTV_OPENAPI_EXAMPLES", "30"))
# schemathesis' coverage phase (every schema boundary and type mismatch, ~2700 requests here): by hand only
COVERAGE = os.environ.get("TINYGPTV_OPENAPI_COVERAGE", "0") == "1"
LENGTHS = ("max_tokens", "max_completion_tokens", "n_predict", "num_predict")
COUNT: Counter = Counter()


def cap_lengths(body: object) -> object:
    """Answer lengths over 4 made 4, at any depth (ollama's sit in `options`): a generated max_tokens of
    10**9 would only make the run slow. Negative ones (-1: until the context is full) stay."""
    if isinstance(body, dict):
        for k, v in body.items():
            if k in LENGTHS and isinstance(v, int) and not isinstance(v, bool) and v > 4:
                body[k] = 4
            else:
                cap_lengths(v)
    elif isinstance(body, list):
        for v in body:
            cap_lengths(v)
    return body


# -- the document ----------------------------------------------------------------------------------


def test_every_route_is_documented_with_the_request_model_its_handler_parses():
    doc = document(app_module.ROUTES)
    assert doc["openapi"] == "3.1.0"
    served = {
        (m.lower(), r.path.replace(":path", ""))
        for r in app_module.ROUTES
        for m in (r.methods or ()) - {"HEAD"}
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == served
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatRequest"
    }
    ollama_chat = doc["paths"]["/api/chat"]["post"]["responses"]
    assert ollama_chat["default"]["content"]["application/json"]["schema"]["$ref"].endswith("/OllamaError")
    assert set(ollama_chat["200"]["content"]) == {"application/json", "application/x-ndjson"}
    # the request models forbid unknown fields, so the document does too (400 unknown_parameter)
    assert doc["components"]["schemas"]["ChatRequest"]["additionalProperties"] is False


def test_a_route_without_an_operation_row_is_an_error_naming_it():
    async def handler(request):  # never called
        raise AssertionError

    with pytest.raises(OpenAPIError, match=r"got none for \[\('GET', '/extra'\)\]"):
        document([*app_module.ROUTES, Route("/extra", handler)])
    routes = [r for r in app_module.ROUTES if not (isinstance(r, Route) and r.path == "/props")]
    with pytest.raises(OpenAPIError, match=r"got no route for \[\('GET', '/props'\)\]"):
        document(routes)
    assert ("GET", "/props") in OPERATIONS


def test_openapi_json_is_served_and_validates_as_openapi_3_1(server):
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=30) as r:
        assert r.status == 200
        doc = json.loads(r.read())
    assert doc == json.loads(json.dumps(document(app_module.ROUTES, doc["info"]["version"])))
    schema = schemathesis.openapi.from_dict(doc)  # raises on a document that is not OpenAPI
    assert len(list(schema.get_all_operations())) == len(OPERATIONS)


# One request per operation that gets its 200 (the fuzzer rarely guesses the model's name or id), each
# answer checked against the document; streamed answers are checked by test_serve_fuzz.py.
CANONICAL = {
    ("GET", "/v1/models/{model_id}"): {"path_parameters": {"model_id": "tinygptv-edge"}},
    ("POST", "/v1/chat/completions"): {
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    },
    ("POST", "/v1/embeddings"): {"body": {"model": "m", "input": data_uri(png(1))}},
    ("POST", "/v1/embeddings", "base64"): {
        "body": {"model": "m", "input": [data_uri(png(1))], "encoding_format": "base64"}
    },
    ("POST", "/api/chat"): {
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    },
    ("POST", "/api/chat", "load"): {"body": {"model": "m"}},
    ("POST", "/api/generate"): {
        "body": {"model": "m", "prompt": "hi", "images": [base64.b64encode(png(2)).decode()], "stream": False}
    },
    ("POST", "/api/show"): {"body": {"model": "tinygptv-edge:latest"}},
    ("POST", "/completion"): {"body": {"prompt": "hi", "n_predict": 4, "stop": ["x"]}},
    ("POST", "/v1/completions"): {"body": {"prompt": "hi", "max_tokens": 4}},
    ("POST", "/tokenize"): {"body": {"content": "hi there"}},
    ("POST", "/tokenize", "pieces"): {"body": {"content": "hi there", "with_pieces": True}},
    ("POST", "/detokenize"): {"body": {"tokens": [1, 2, 3]}},
    **{("GET", p): {} for p in ("/", "/openapi.json", "/health", "/v1/models", "/props", "/metrics")},
    **{("GET", p): {} for p in ("/api/tags", "/api/ps", "/api/version")},
}


@pytest.mark.parametrize("key", list(CANONICAL), ids=lambda k: " ".join(k))
def test_each_operation_answers_as_documented(server, key):
    method, path = key[:2]
    case = openapi[path][method].Case(**CANONICAL[key])
    response = case.call(base_url=server.url, timeout=60)
    assert response.status_code == 200, response.text[:300]
    case.validate_response(response, checks=[response_schema_conformance])


def test_every_operation_has_a_canonical_request():
    assert {k[:2] for k in CANONICAL} >= set(OPERATIONS) - {("POST", "/completions")}


# -- fuzzing ---------------------------------------------------------------------------------------


# The document the server serves (test_openapi_json_is_served_... checks they are equal), loaded at
# collection so schemathesis makes one test per operation; the requests go to the live server.
# (schemathesis.pytest.from_fixture, which would load it from the server, fails on pytest 9:
# it sets Function._nodeid.)
openapi = schemathesis.openapi.from_dict(
    document(app_module.ROUTES),
    config=SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": COVERAGE}}}),
)


@pytest.fixture(scope="module")
def fuzzed(server):
    t0 = time.perf_counter()
    yield server
    print(f"\nopenapi fuzz: {dict(COUNT)} in {time.perf_counter() - t0:.1f} s")


@pytest.mark.fuzz
@openapi.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_generated_requests_get_no_5xx_and_documented_answers(case, fuzzed):
    if isinstance(case.body, (dict, list)):
        cap_lengths(case.body)
    response = case.call(base_url=fuzzed.url, timeout=60)
    COUNT["requests"] += 1
    COUNT[f"{response.status_code // 100}xx"] += 1
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
