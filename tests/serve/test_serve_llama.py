"""llama-server's routes and request fields on the tiny model, as raw HTTP over 127.0.0.1.

The request bodies are the ones llama.cpp's tools/server/README.md shows for curl (`/completion` with
`n_predict`, `/tokenize`, `/detokenize`, `grammar`, `json_schema`, `response_format.schema`, multimodal
prompts), sent unchanged apart from shorter answers; answers are compared with `Pipeline` (greedy).
"""

from __future__ import annotations

import base64
import http.client
import json
import re

import pytest

pytestmark = pytest.mark.torch

from helpers.serve import require_serve_stack  # noqa: E402

require_serve_stack()

from helpers.serve import LiveServer, loader, png  # noqa: E402

from tinygptv_edge.runtime.sampling import SamplingConfig  # noqa: E402
from tinygptv_edge.runtime.serve.app import create_app  # noqa: E402
from tinygptv_edge.runtime.serve.engine import Engine  # noqa: E402

N = 8
GREEDY = SamplingConfig(max_new_tokens=N)


def request(url: str, method: str, path: str, body: object = None, headers: dict | None = None):
    """(status, headers, text): what curl would show."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=60)
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    return r.status, r.headers, text


def post(url: str, path: str, body: object) -> tuple[int, dict]:
    status, _, text = request(url, "POST", path, body)
    return status, json.loads(text)


def test_completion_as_in_the_readme(server, pipe):
    # curl --request POST --url http://localhost:8080/completion --header "Content-Type: application/json"
    #   --data '{"prompt": "Building a website can be done in 10 simple steps:","n_predict": 128}'
    readme = '{"prompt": "Building a website can be done in 10 simple steps:","n_predict": 128}'
    status, _, text = request(server.url, "POST", "/completion", readme)
    body = json.loads(text)
    want = pipe.ask(
        "Building a website can be done in 10 simple steps:", None, SamplingConfig(max_new_tokens=128)
    )
    assert status == 200 and body["content"] == want.text and body["stop"] is True
    assert body["tokens_predicted"] == len(want.token_ids) and body["tokens_evaluated"] == want.prompt_tokens
    assert body["stop_type"] == {"max_new_tokens": "limit"}.get(want.stop, "eos")
    t = body["timings"]
    assert t["predicted_n"] == len(want.token_ids) and t["prompt_ms"] > 0 and "predicted_per_second" in t


def test_completion_streams_data_events(server, pipe):
    want = pipe.ask("hello", None, GREEDY).text
    status, headers, text = request(
        server.url, "POST", "/completion", {"prompt": "hello", "n_predict": N, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert len(events) >= 2 and events[-1]["stop"] is True and not any(e["stop"] for e in events[:-1])
    assert "".join(e["content"] for e in events) == want


def test_completion_with_an_image_both_spellings(server, pipe):
    img = png(9)
    want = pipe.ask("what is this?", img, GREEDY).text
    b64 = base64.b64encode(img).decode()
    multimodal = {
        "prompt": {"prompt_string": "<__media__> what is this?", "multimodal_data": [b64]},
        "n_predict": N,
    }
    legacy = {"prompt": "[img-12] what is this?", "image_data": [{"data": b64, "id": 12}], "n_predict": N}
    for body in (multimodal, legacy):
        status, got = post(server.url, "/completion", body)
        assert status == 200 and got["content"] == want, got


def test_v1_completions(server, pipe):
    want = pipe.ask("can be reconciled by", None, GREEDY)
    body = {"model": "llama", "prompt": "can be reconciled by", "max_tokens": N, "temperature": 0}
    status, got = post(server.url, "/v1/completions", body)
    assert status == 200 and got["object"] == "text_completion"
    assert got["choices"][0]["text"] == want.text and got["usage"]["completion_tokens"] == len(want.token_ids)
    status, _, text = request(server.url, "POST", "/v1/completions", {**body, "stream": True})
    chunks = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    assert "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1]) == want.text


def test_sampling_fields(server, pipe):
    cfg = SamplingConfig(
        max_new_tokens=N, do_sample=True, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
        repetition_penalty=1.1, seed=5,
    )  # fmt: skip
    want = pipe.ask("tell me", None, cfg).text
    body = {
        "prompt": "tell me", "n_predict": N, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
        "repeat_penalty": 1.1, "seed": 5, "cache_prompt": True, "repeat_last_n": 64,
    }  # fmt: skip
    status, got = post(server.url, "/completion", body)
    assert status == 200 and got["content"] == want
    s = got["generation_settings"]
    assert (s["top_k"], s["min_p"], s["repeat_penalty"], s["seed"]) == (40, 0.05, 1.1, 5)


def test_grammar_gbnf(server):
    # the README's grammar field: GBNF text (llama.cpp grammars/README.md)
    gbnf = 'root ::= answer\nanswer ::= ("yes" | "no") " " [0-9]'
    for path, key in (("/completion", "content"), ("/v1/chat/completions", None)):
        if key:
            status, got = post(server.url, path, {"prompt": "yes or no?", "n_predict": 20, "grammar": gbnf})
            text = got[key]
        else:
            msgs = [{"role": "user", "content": "yes or no?"}]
            status, got = post(
                server.url, path, {"model": "x", "messages": msgs, "max_tokens": 20, "grammar": gbnf}
            )
            text = got["choices"][0]["message"]["content"]
        assert status == 200 and re.fullmatch(r"(yes|no) [0-9]", text), got
    status, got = post(server.url, "/completion", {"prompt": "q", "grammar": "root ::= (unclosed"})
    assert status == 400 and got["error"]["param"] == "grammar"


def test_json_schema_spellings(server):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["n"],
    }
    msgs = [{"role": "user", "content": "a number"}]
    for path, body in (
        ("/completion", {"prompt": "a number", "n_predict": 40, "json_schema": schema}),
        ("/v1/chat/completions", {"model": "x", "messages": msgs, "max_tokens": 40, "json_schema": schema}),
        (
            "/v1/chat/completions",
            {
                "model": "x",
                "messages": msgs,
                "max_tokens": 40,
                "response_format": {"type": "json_object", "schema": schema},
            },
        ),
        (
            "/v1/chat/completions",
            {
                "model": "x",
                "messages": msgs,
                "max_tokens": 40,
                "response_format": {"type": "json_schema", "schema": schema},
            },
        ),
        (
            "/v1/chat/completions",
            {
                "model": "x",
                "messages": msgs,
                "max_tokens": 40,
                "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},  # no name
            },
        ),
    ):
        status, got = post(server.url, path, body)
        text = got["content"] if path == "/completion" else got["choices"][0]["message"]["content"]
        assert status == 200 and 1 <= json.loads(text)["n"] <= 5, (path, got)
    both = {"model": "x", "messages": msgs, "json_schema": schema, "grammar": 'root ::= "a"'}
    status, got = post(server.url, "/v1/chat/completions", both)
    assert status == 400 and "at most one" in got["error"]["message"]


def test_harmless_openai_fields_are_accepted(server, pipe):
    want = pipe.ask("hello", None, GREEDY).text
    body = {
        "model": "x", "messages": [{"role": "user", "content": "hello"}], "max_tokens": N, "temperature": 0,
        "tool_choice": "none", "parallel_tool_calls": False, "service_tier": "auto", "cache_prompt": True,
        "top_k": 40, "n_predict": N,
    }  # fmt: skip
    status, got = post(server.url, "/v1/chat/completions", body)
    assert status == 200 and got["choices"][0]["message"]["content"] == want
    status, got = post(server.url, "/v1/chat/completions", {**body, "tool_choice": "required"})
    assert status == 400 and got["error"]["param"].startswith("tool_choice")


def test_tokenize_detokenize(server, pipe):
    status, got = post(server.url, "/tokenize", {"content": "Hello world"})
    assert status == 200 and got["tokens"] == pipe.tokenizer.encode("Hello world")
    status, pieces = post(server.url, "/tokenize", {"content": "Hello world", "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == got["tokens"]
    assert "".join(p["piece"] for p in pieces["tokens"]) == "Hello world"
    status, back = post(server.url, "/detokenize", {"tokens": got["tokens"]})
    assert status == 200 and back["content"] == "Hello world"
    status, bad = post(server.url, "/detokenize", {"tokens": [10**9]})
    assert status == 400


def test_props_and_metrics(server, pipe):
    status, _, text = request(server.url, "GET", "/props")
    props = json.loads(text)
    assert status == 200 and props["default_generation_settings"]["n_ctx"] == pipe.n_ctx
    assert props["modalities"]["vision"] is True and props["total_slots"] == 1
    post(server.url, "/completion", {"prompt": "hello", "n_predict": 4})
    post(server.url, "/completion", {"prompt": "hello", "n_predict": 4})  # the prompt again: cache hits
    status, headers, text = request(server.url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"
    }
    for name in (
        'tinygptv_requests_total{outcome="completed"}',
        "tinygptv_requests_queued",
        "tinygptv_prompt_tokens_total",
        "tinygptv_tokens_predicted_total",
        "tinygptv_prompt_tokens_cached_total",
        "tinygptv_first_token_seconds_sum",
        "tinygptv_first_token_seconds_count",
        "tinygptv_decode_seconds_sum",
    ):
        assert name in values, name
    assert values['tinygptv_requests_total{outcome="completed"}'] >= 2
    assert (
        values["tinygptv_prompt_tokens_cached_total"] > 0 and values["tinygptv_first_token_seconds_sum"] > 0
    )
    assert "# TYPE tinygptv_first_token_seconds summary" in text


def test_refused_fields_name_themselves(server):
    for body, param in (
        ({"prompt": "q", "n_probs": 5}, "n_probs"),
        ({"prompt": "q", "mirostat": 2}, "mirostat"),
        ({"prompt": "q", "no_such": 1}, "no_such"),
        ({"prompt": ["a", "b"]}, "prompt"),
    ):
        status, got = post(server.url, "/completion", body)
        assert status == 400 and got["error"]["param"] == param, got


def test_cors_preflight_and_headers(files):
    engine = Engine(loader(files))
    import threading
    import time

    import uvicorn

    app = create_app(engine, cors_origins=["http://app.example"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        pre = {
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        }
        status, headers, _ = request(url, "OPTIONS", "/v1/chat/completions", headers=pre)
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in headers["access-control-allow-methods"]
        status, headers, _ = request(url, "GET", "/health", headers={"Origin": "http://app.example"})
        assert headers["access-control-allow-origin"] == "http://app.example"
        status, headers, _ = request(
            url, "OPTIONS", "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"}
        )
        assert status == 400 and "access-control-allow-origin" not in headers
    finally:
        server.should_exit = True
        thread.join(30)


def test_api_key_guards_the_answering_routes_of_every_api(files):
    from tinygptv_edge.runtime.serve.engine import ServeConfig

    with LiveServer(loader(files), ServeConfig(api_key="sesame")) as s:
        for path, body in (
            ("/completion", {"prompt": "hi", "n_predict": 2}),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
            ("/tokenize", {"content": "hi"}),
            ("/api/generate", {"model": "m", "prompt": "hi", "stream": False}),
            ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}),
        ):
            status, got = post(s.url, path, body)
            assert status == 401, (path, got)
            assert isinstance(got["error"], str if path.startswith("/api/") else dict)  # each API's shape
            status, _, text = request(s.url, "POST", path, body, {"Authorization": "Bearer sesame"})
            assert status == 200, (path, text)
        for path in ("/metrics", "/props", "/api/tags", "/api/version", "/health"):
            assert request(s.url, "GET", path)[0] == 200, path


@pytest.mark.parametrize(
    "path, body",
    [
        ("/completion", {"prompt": "talk for a long time", "n_predict": 200, "stream": True}),
        ("/v1/completions", {"prompt": "talk for a long time", "max_tokens": 200, "stream": True}),
        ("/api/generate", {"model": "m", "prompt": "talk for a long time", "options": {"num_predict": 200}}),
    ],
)
def test_a_disconnect_mid_stream_stops_generation(files, path, body):
    """llama-server's SSE and ollama's NDJSON streams end their job when the client goes away."""
    import socket
    import time

    with LiveServer(loader(files, delay=0.03)) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.readline()  # the first piece
        decoder = s.engine.pipe.prefix.decoder
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 10
        while s.engine.health()["cancelled"] < 1:
            assert time.monotonic() < deadline, "the server did not notice the disconnect"
            time.sleep(0.05)
        evals = decoder.evals
        time.sleep(0.3)
        assert decoder.evals == evals < 100  # stopped, far from 200 tokens
        assert s.engine.health()["running"] == 0
