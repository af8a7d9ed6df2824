"""`tinygptv-edge serve` on the tiny model, driven by the official `openai` client over 127.0.0.1.

Answers are compared with `Pipeline` on the same files (greedy), so the HTTP layer adds nothing and
loses nothing. Slow-decoder servers (serve_helpers.SlowDecoder) make queueing, timeouts, disconnects
and shutdown observable without long runs.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.torch

from helpers.serve import require_serve_stack  # noqa: E402

require_serve_stack()
openai = pytest.importorskip("openai", reason="the openai client (dev extra) is not installed")

from helpers.serve import LiveServer, data_uri, loader, png, serve_argv, user  # noqa: E402

from tinygptv_edge.runtime.config import IMAGE_PLACEHOLDER  # noqa: E402
from tinygptv_edge.runtime.sampling import SamplingConfig  # noqa: E402
from tinygptv_edge.runtime.serve.engine import ServeConfig  # noqa: E402
from tinygptv_edge.runtime.text.prompt import split_prompt  # noqa: E402

N = 8
GREEDY = SamplingConfig(max_new_tokens=N)
MODEL = "tinygptv-edge"


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, object, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def get(url: str) -> tuple[int, object, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def ask(client, messages, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", N)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


# -- answers ---------------------------------------------------------------------------------------


def test_health_and_models(server):
    status, _, body = get(server.url + "/health")
    assert status == 200 and body["status"] == "ok"
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("other")


def test_answer_equals_pipeline(server, pipe):
    img = png(1)
    got = ask(server.client(), [user("what is in the picture?", img)])
    want = pipe.ask("what is in the picture?", img, GREEDY)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == {"max_new_tokens": "length"}.get(want.stop, "stop")
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == want.prompt_tokens + len(want.token_ids)
    text_only = ask(server.client(), [user("say something")])
    assert text_only.choices[0].message.content == pipe.ask("say something", None, GREEDY).text


def test_system_prompt_prefix_is_evaluated_once_at_start(server, pipe):
    """Every conversation starts with BOS + system prompt + separator: warmed at start, then kept by
    the KV cache whichever conversation ran last, so a new conversation never evaluates it."""
    p = pipe.prompt
    system = [pipe.tokenizer.bos_id] * p.add_bos + pipe.tokenizer.encode(p.system + p.separator)
    text = p.first_turn("", with_image=True)
    head = split_prompt(text, pipe.tokenizer, text.count(IMAGE_PLACEHOLDER), add_bos=p.add_bos).texts[0]
    assert list(head[: len(system)]) == system and server.engine.warmed == len(head)
    for i, msg in enumerate([user("a fresh picture", png(21)), user("text only"), user("another", png(22))]):
        got = ask(server.client(), [msg])
        assert got.usage.prompt_tokens_details.cached_tokens >= len(system), i
        assert got.model_extra["timings"]["prefill_tokens"] <= got.usage.prompt_tokens - len(system)


def test_streaming_equals_plain(server, pipe):
    img = png(2)
    chunks = list(
        ask(server.client(), [user("describe it", img)], stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    want = pipe.ask("describe it", img, GREEDY)
    assert text == want.text and len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_multi_turn_with_earlier_image_reuses_the_kv_prefix(server, pipe):
    img = png(3)
    c = server.client()
    first = ask(c, [user("first question", img)])
    a1 = first.choices[0].message.content
    history = [user("first question", img), {"role": "assistant", "content": a1}]
    second = ask(c, [*history, user("and then?")])
    chat = pipe.chat(GREEDY)
    chat.ask("first question", img)
    want = chat.ask("and then?")
    assert second.choices[0].message.content == want.text
    assert second.usage.prompt_tokens == want.prompt_tokens
    # the first conversation was in the KV cache: only the new turn's text was evaluated
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    new_text = len(pipe.tokenizer.encode("###" + pipe.prompt.turn("and then?", False)))
    assert second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens <= new_text + 1
    assert second.model_extra["timings"]["images_cached"] == 1  # the earlier image skipped the vision graph


def test_a_repeated_image_is_restored_from_a_kv_snapshot(server, pipe):
    """Image A, image B, then A with another question: A's rows come back from the snapshot taken
    when B overwrote them (--cache-ram), so only the new question is evaluated; answers unchanged."""
    a, b = png(31), png(32)
    c = server.client()
    ask(c, [user("first question", a)])
    ask(c, [user("first question", b)])
    got = ask(c, [user("a different question", a)])
    assert got.choices[0].message.content == pipe.ask("a different question", a, GREEDY).text
    question = len(
        pipe.tokenizer.encode(
            pipe.prompt.first_turn("a different question", True).split(IMAGE_PLACEHOLDER)[1]
        )
    )
    evaluated = got.usage.prompt_tokens - got.usage.prompt_tokens_details.cached_tokens
    assert evaluated <= question + 1, (evaluated, question)


def test_system_message_replaces_the_system_prompt(server, pipe):
    import dataclasses

    got = ask(server.client(), [{"role": "system", "content": "You are terse."}, user("hello")])
    prompt = dataclasses.replace(pipe.prompt, system="You are terse.")
    assert got.choices[0].message.content == pipe.chat(GREEDY, prompt).ask("hello").text


def test_stop_sequences(server, pipe):
    full = pipe.ask("tell me", None, SamplingConfig(max_new_tokens=16)).text
    assert len(full) > 4
    stop = full[2:4]
    got = ask(server.client(), [user("tell me")], max_tokens=16, stop=[stop])
    assert got.choices[0].message.content == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = ask(server.client(), [user("tell me")], max_tokens=16, stop=stop, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]
    )


def test_sampling_with_seed_matches_pipeline(server, pipe):
    got = ask(server.client(), [user("q")], temperature=0.7, top_p=0.9, seed=5, max_tokens=N)
    want = pipe.ask(
        "q", None, SamplingConfig(max_new_tokens=N, do_sample=True, temperature=0.7, top_p=0.9, seed=5)
    )
    assert got.choices[0].message.content == want.text


SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["colour", "count"],
    "additionalProperties": False,
}


def test_json_schema_answers_parse_and_validate(server):
    c = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        got = ask(
            c, [user("describe", png(seed))], max_tokens=60, response_format=fmt, temperature=1.0, seed=seed
        )
        assert got.choices[0].finish_reason == "stop"
        data = json.loads(got.choices[0].message.content)
        assert set(data) == {"colour", "count"} and data["colour"] in ("red", "green", "blue")
        assert isinstance(data["count"], int) and 0 <= data["count"] <= 99
    streamed = ask(c, [user("describe", png(0))], max_tokens=60, response_format=fmt, stream=True)
    assert set(json.loads("".join(x.choices[0].delta.content or "" for x in streamed if x.choices))) == {
        "colour",
        "count",
    }
    obj = ask(c, [user("anything")], max_tokens=100, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_image_embeddings_endpoint(server, pipe):
    img = png(4)
    got = server.client().embeddings.create(model=MODEL, input=[data_uri(img), data_uri(png(5))])
    want = pipe.embed_image(img)
    assert len(got.data) == 2 and got.data[0].model_extra["shape"] == list(want.shape)
    np.testing.assert_allclose(
        np.asarray(got.data[0].embedding, np.float32).reshape(want.shape), want, rtol=1e-6
    )
    status, _, body = post(
        server.url + "/v1/embeddings", json.dumps({"model": MODEL, "input": data_uri(img)}).encode()
    )
    assert status == 200 and len(body["data"][0]["embedding"]) == want.size
    # the embedding was cached: a chat about the same image skips the vision graph
    assert ask(server.client(), [user("q", img)]).model_extra["timings"]["images_cached"] == 1


# -- errors ----------------------------------------------------------------------------------------


def test_bad_requests_are_400_in_openai_shape(server):
    c = server.client()
    status, _, body = post(server.url + "/v1/chat/completions", b"{not json")
    assert (
        status == 400
        and body["error"]["code"] == "invalid_json"
        and body["error"]["type"] == "invalid_request_error"
    )
    cases = {
        "unknown_parameter": dict(extra_body={"bogus": 1}),
        "unsupported": dict(n=2),
    }
    for code, kw in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, [user("q")], **kw)
        assert e.value.code == code, e.value.body
    bad_base64 = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
        }
    ]
    local_path = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]
    remote = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}
    ]
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png(1))}}] * 2}]
    order = [{"role": "assistant", "content": "hi"}, user("q")]
    for messages, code in (
        (bad_base64, "invalid_base64"),
        (local_path, "invalid_image_url"),
        (remote, "remote_images_disabled"),
        (two, "too_many_images"),
        (order, "invalid_value"),
        ([user("not an image", b"GIF89a but not really")], "invalid_image_format"),
        ([user("cut short", png(1)[:300])], "invalid_image"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, messages)
        assert e.value.code == code, e.value.body


def test_more_refusals(server):
    c = server.client()
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    no_schema = {"type": "json_schema", "json_schema": {"name": "x"}}
    for fmt in (bad_schema, no_schema):
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, [user("q")], response_format=fmt)
        assert e.value.param.startswith("response_format"), e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model=MODEL, input=["a text, not an image"])
    assert e.value.code == "invalid_image_url"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # declared, never sent
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200000000\r\n\r\n"
        )
        head = b""
        while b"body_too_large" not in head and (more := sock.recv(4096)):  # headers and body may split
            head += more
    assert head.startswith(b"HTTP/1.1 413") and b"body_too_large" in head
    status, _, body = get(server.url + "/v1/nowhere")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_image_over_the_runtime_limits_is_400(server):
    import io

    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, "PNG")  # 36 MP, a small file: over the 32 MP pixel cap
    with pytest.raises(openai.BadRequestError) as e:
        ask(server.client(), [user("q", buf.getvalue())])
    assert e.value.code == "image_too_large" and "pixel" in e.value.message


def test_prompt_over_the_context_is_400_with_token_counts(server):
    with pytest.raises(openai.BadRequestError) as e:
        ask(server.client(), [user("word " * 300)])
    assert e.value.code == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in e.value.message and "resulted in" in e.value.message
    assert ask(server.client(), [user("short")]).choices[0].message.content is not None  # still serving


def test_api_key(files):
    cfg = ServeConfig(api_key="s3cret")
    with LiveServer(loader(files), cfg) as s:
        assert s.client(api_key="s3cret").models.list().data[0].id == MODEL
        for key in ("wrong", "s3cret "[:-2]):
            with pytest.raises(openai.AuthenticationError) as e:
                ask(s.client(api_key=key), [user("q")])
            assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
        status, _, _ = post(s.url + "/v1/chat/completions", b"{}")
        assert status == 401
        assert get(s.url + "/health")[0] == 200  # health and the page stay open


def test_loading_is_503_then_ready(files):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return loader(files)()

    with LiveServer(slow_load, wait_ready=False) as s:
        status, headers, body = get(s.url + "/health")
        assert status == 503 and body["status"] == "loading" and int(headers["Retry-After"]) >= 1
        with pytest.raises(openai.InternalServerError) as e:
            ask(s.client(), [user("q")])
        assert e.value.status_code == 503 and e.value.code == "loading"
        gate.set()
        s.wait_ready()
        assert get(s.url + "/health")[0] == 200 and ask(s.client(), [user("q")]).choices


# -- concurrency, timeouts, disconnects, shutdown --------------------------------------------------


def test_load_every_request_completes_or_gets_503(files, pipe):
    """8 clients x 5 requests against a queue of 2: answers match their own question, or a clean 503."""
    questions = {(c, r): f"client {c} request {r}" for c in range(8) for r in range(5)}
    want = {k: pipe.ask(q, None, GREEDY).text for k, q in questions.items()}
    results: dict = {}
    start = threading.Barrier(8)
    with LiveServer(loader(files, delay=0.03), ServeConfig(max_queue=2)) as s:

        def client_run(c):
            client = s.client()
            start.wait()
            for r in range(5):
                try:
                    got = ask(client, [user(questions[c, r])])
                    results[c, r] = got.choices[0].message.content
                except openai.InternalServerError as e:
                    results[c, r] = (e.status_code, e.response.headers.get("retry-after"))

        threads = [threading.Thread(target=client_run, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        health = get(s.url + "/health")[2]
    assert len(results) == 40
    ok = [k for k, v in results.items() if isinstance(v, str)]
    refused = [v for v in results.values() if not isinstance(v, str)]
    assert all(results[k] == want[k] for k in ok)  # none mixed up
    assert all(code == 503 and int(after) >= 1 for code, after in refused)
    assert ok and refused and health["completed"] == len(ok) and health["refused"] == len(refused)


def stream_raw(
    url: str, messages, max_tokens: int
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_disconnect_stops_generation(files):
    with LiveServer(loader(files, delay=0.03)) as s:
        conn, resp = stream_raw(s.url, [user("talk for a long time")], max_tokens=200)
        assert resp.status == 200
        while b'"delta": {"content"' not in resp.readline():  # the first answer piece
            pass
        decoder = s.engine.pipe.prefix.decoder
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 10
        while get(s.url + "/health")[2]["cancelled"] < 1:
            assert time.monotonic() < deadline, "the server did not notice the disconnect"
            time.sleep(0.05)
        evals = decoder.evals
        time.sleep(0.3)
        assert decoder.evals == evals < 100  # stopped, far from 200 tokens
        health = get(s.url + "/health")[2]
        assert health["running"] == 0 and health["completed"] == 0
        assert ask(s.client(), [user("q")], max_tokens=2).choices  # the server stays up


def test_abandoned_queued_request_never_runs(files):
    with LiveServer(loader(files, delay=0.03)) as s:
        conn, resp = stream_raw(s.url, [user("first")], max_tokens=100)  # holds the model ~3 s
        assert resp.status == 200
        waiting = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        body = {"model": MODEL, "messages": [user("queued")], "max_tokens": 40}
        waiting.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        deadline = time.monotonic() + 5
        while get(s.url + "/health")[2]["queue"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting.sock.shutdown(socket.SHUT_RDWR)  # gone while it waits
        waiting.close()
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        deadline = time.monotonic() + 10
        while (h := get(s.url + "/health")[2])["queue"] or h["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert h["completed"] == 1 and h["cancelled"] == 1
        first = s.engine.pipe.chat().next_positions("first", [])
        assert list(s.engine.pipe.prefix.held[: len(first)]) == first  # the queued prompt was never evaluated
        conn.close()


def test_timeout_is_504_and_the_server_stays_up(files):
    with LiveServer(loader(files, delay=0.03), ServeConfig(timeout=0.5)) as s:
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            ask(s.client(), [user("q")], max_tokens=200)
        assert e.value.status_code == 504 and e.value.code == "timeout" and time.monotonic() - t0 < 5
        assert get(s.url + "/health")[2]["timed_out"] == 1
        assert ask(s.client(), [user("q")], max_tokens=2).choices


def test_full_queue_is_503_with_retry_after(files):
    with LiveServer(loader(files, delay=0.05), ServeConfig(max_queue=0)) as s:
        conn, resp = stream_raw(s.url, [user("long")], max_tokens=40)
        assert resp.status == 200
        with pytest.raises(openai.InternalServerError) as e:
            ask(s.client(), [user("q")])
        assert e.value.status_code == 503 and e.value.code == "overloaded"
        assert int(e.value.response.headers["retry-after"]) >= 1
        conn.close()


def test_retry_after_is_the_measured_wait(files):
    """40 tokens at 0.05 s each: a job takes ~2 s; with one running and two waiting, a refused request
    is told to come back after about the running job's rest plus two job times, not 1 s."""
    with LiveServer(loader(files, delay=0.05), ServeConfig(max_queue=2)) as s:
        conn, resp = stream_raw(s.url, [user("first")], max_tokens=40)  # measured: one whole job
        resp.read()
        conn.close()
        deadline = time.monotonic() + 10  # the worker records the job's time just after the last piece
        while s.engine._job_s is None and time.monotonic() < deadline:
            time.sleep(0.01)
        job_s = s.engine._job_s
        assert job_s is not None and job_s > 1.0
        conns = []
        for i in range(3):  # sent, not read: one runs, two wait
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
            body = {"model": MODEL, "messages": [user(f"q{i}")], "max_tokens": 40, "temperature": 0}
            conn.request(
                "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
            )
            conns.append(conn)
        deadline = time.monotonic() + 10
        while s.engine.health()["queue"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.InternalServerError) as e:
            ask(s.client(), [user("q")])
        wait = int(e.value.response.headers["retry-after"])
        assert 2 * job_s <= wait <= 3 * job_s + 1, (wait, job_s)
        assert "s of work ahead" in e.value.message
        for conn in conns:
            conn.close()


def test_health_counts_4xx_as_rejected_not_failed(server):
    before = get(server.url + "/health")[2]
    with pytest.raises(openai.BadRequestError):
        ask(server.client(), [user("q", b"not an image at all")])
    after = get(server.url + "/health")[2]
    assert after["failed"] == before["failed"] and after["rejected"] == before["rejected"] + 1


def test_image_url_as_a_bare_string(server, pipe):
    img = png(2)
    content = [{"type": "image_url", "image_url": data_uri(img)}, {"type": "text", "text": "what is it?"}]
    got = ask(server.client(), [{"role": "user", "content": content}])
    assert got.choices[0].message.content == pipe.ask("what is it?", img, GREEDY).text


def test_graceful_shutdown_finishes_in_flight(files):
    s = LiveServer(loader(files, delay=0.02), shutdown_timeout=20)
    conn, resp = stream_raw(s.url, [user("q")], max_tokens=30)
    first = resp.readline()
    assert first.startswith(b"data: ")
    stopper = threading.Thread(target=s.stop)
    stopper.start()
    rest = resp.read().decode()
    stopper.join(30)
    assert '"finish_reason": "length"' in rest and rest.rstrip().endswith("data: [DONE]")
    assert not s.thread.is_alive() and s.engine.state == "closed"


def test_image_cache_on_disk_survives_a_restart(files, tmp_path):
    img = png(11)
    with LiveServer(loader(files, image_cache_dir=tmp_path)) as s:
        first = ask(s.client(), [user("q", img)])
    assert first.model_extra["timings"]["images_cached"] == 0 and list(tmp_path.glob("*.e1"))
    with LiveServer(loader(files, image_cache_dir=tmp_path)) as s:
        again = ask(s.client(), [user("q", img)])
    assert again.model_extra["timings"]["images_cached"] == 1
    assert again.choices[0].message.content == first.choices[0].message.content


# -- the command --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_starts_answers_and_stops_on_sigterm(files, tmp_path, pipe):
    port = free_port()
    cmd = serve_argv(str(files[0]), str(files[1]))
    cmd += ["--port", str(port), "--threads", "1", "--max-tokens", str(N), "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.poll() else ""
            )
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        got = client.chat.completions.create(model=MODEL, messages=[user("hello")])  # server defaults
        assert got.choices[0].message.content == pipe.ask("hello", None, GREEDY).text
        with urllib.request.urlopen(url + "/") as r:
            assert b"<script>" in r.read() and "Content-Security-Policy" in r.headers
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        err = proc.stderr.read()
        # a graceful stop exits 0 (uvicorn alone would re-raise the signal: runtime/serve/server.py)
        assert code == 0 and "Application shutdown complete" in err, err
        ready = next(line for line in err.splitlines() if line.startswith("ready: "))
        for word in (
            str(files[0]),
            str(files[1]),
            "context",
            "threads 1",
            "memory mode",
            "KV snapshot cache",
        ):
            assert word in ready, ready
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_exits_2_when_the_model_does_not_load(files, tmp_path):
    """A vision file that is no ONNX graph passes the checks made before binding, then fails to load:
    the server stops within 10 s with the typed error and the file on stderr, exit status 2."""
    bad = tmp_path / "vision.int8.onnx"
    bad.write_bytes(b"\x00" * 4096)
    port = free_port()
    cmd = serve_argv(str(bad), str(files[1]))
    t0 = time.monotonic()
    out = subprocess.run(
        [*cmd, "--port", str(port), "--threads", "1"], capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - t0
    assert out.returncode == 2 and took < 10, (out.returncode, took, out.stderr)
    assert "error: the model did not load" in out.stderr and str(bad) in out.stderr, out.stderr
    # swapped files are named before the port is bound
    cmd = serve_argv(str(files[1]), str(files[1]))
    out = subprocess.run([*cmd, "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "this looks like a GGUF file" in out.stderr and "--language" in out.stderr
    assert "Uvicorn running" not in out.stderr


def test_serve_command_errors(tmp_path, capsys):
    from tinygptv_edge.cli import main

    assert main(["serve", "--dist", str(tmp_path)]) == 2
    assert "no vision model" in capsys.readouterr().err
    cmd = [sys.executable, "-m", "tinygptv_edge.cli", "serve", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0 and "--max-queue" in out.stdout and "--api-key" in out.stdout
    assert "--cors ORIGIN" in out.stdout
