"""ollama's API (`/api/*`) on the tiny model, driven by the official `ollama` Python client over 127.0.0.1.

Answers are compared with `Pipeline` on the same files (greedy): the ollama routes map onto the same
ChatPlan as OpenAI's, so they must give the same text.
"""

from __future__ import annotations

import base64
import json
import urllib.request

import pytest

pytestmark = pytest.mark.torch

from helpers.serve import require_serve_stack  # noqa: E402

require_serve_stack()
ollama = pytest.importorskip("ollama", reason="the ollama client (dev extra) is not installed")

from helpers.serve import LiveServer, loader, png  # noqa: E402

from tinygptv_edge.runtime.sampling import SamplingConfig  # noqa: E402

N = 8
GREEDY = SamplingConfig(max_new_tokens=N)
MODEL = "tinygptv-edge"
OPTS = {"temperature": 0, "num_predict": N}


@pytest.fixture(scope="module")
def server(files):
    with LiveServer(loader(files)) as s:
        s.engine.info = {"files": [str(f) for f in files], "quantization_level": "F32"}
        yield s


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


def test_chat_with_an_image_equals_pipeline(client, pipe, tmp_path):
    img = png(3)
    path = tmp_path / "photo.png"
    path.write_bytes(img)
    want = pipe.ask("what is in the picture?", img, GREEDY)
    for image in (img, str(path)):  # bytes and a path: the client sends base64 either way
        got = client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "what is in the picture?", "images": [image]}],
            options=OPTS,
        )
        assert got.message.role == "assistant" and got.message.content == want.text
        assert got.done and got.done_reason == ("length" if want.stop == "max_new_tokens" else "stop")
        assert got.prompt_eval_count == want.prompt_tokens and got.eval_count == len(want.token_ids)
        assert got.total_duration > 0 and got.eval_duration >= 0 and got.created_at


def test_chat_streams_ndjson_and_keeps_history(client, pipe):
    chat = pipe.chat(GREEDY)
    first = chat.ask("hello", png(4)).text
    want = chat.ask("and the colours?").text
    # the first answer as the server gave it: remembered as the tokens it generated, replayed exactly
    got = client.chat(
        model=MODEL, messages=[{"role": "user", "content": "hello", "images": [png(4)]}], options=OPTS
    )
    assert got.message.content == first
    messages = [
        {"role": "user", "content": "hello", "images": [png(4)]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and the colours?"},
    ]
    parts = list(client.chat(model=MODEL, messages=messages, options=OPTS, stream=True))
    assert len(parts) >= 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == want
    assert parts[-1].eval_count >= 1 and parts[-1].prompt_eval_count > got.prompt_eval_count


def test_generate_equals_pipeline_and_streams(client, pipe):
    img = png(5)
    want = pipe.ask("describe it", img, GREEDY).text
    got = client.generate(model=MODEL, prompt="describe it", images=[img], options=OPTS)
    assert got.response == want and got.done
    parts = list(client.generate(model=MODEL, prompt="describe it", images=[img], options=OPTS, stream=True))
    assert "".join(p.response for p in parts) == want and parts[-1].done
    system = pipe.chat(GREEDY, pipe.prompt.__class__(**{**vars(pipe.prompt), "system": "Be brief."}))
    got = client.generate(model=MODEL, prompt="hi", system="Be brief.", options=OPTS)
    assert got.response == system.ask("hi").text


def test_format_json_and_schema_parse(client):
    schema = {
        "type": "object",
        "properties": {
            "colour": {"type": "string", "enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    got = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "colour and count?", "images": [png(6)]}],
        format=schema,
        options={"temperature": 0, "num_predict": 60},
    )
    answer = json.loads(got.message.content)
    assert answer["colour"] in ("red", "green", "blue") and isinstance(answer["count"], int)
    got = client.generate(
        model=MODEL, prompt="as json", format="json", options={"temperature": 0, "num_predict": 60}
    )
    # free strings close before the length limit (runtime/serve/grammar.py), even on the random tiny model
    assert got.done_reason == "stop" and isinstance(json.loads(got.response), dict)


def test_options_seed_stop_and_sampling(client, pipe):
    sampled = SamplingConfig(max_new_tokens=N, do_sample=True, temperature=0.9, top_k=20, seed=11)
    want = pipe.ask("tell me", None, sampled).text
    opts = {"temperature": 0.9, "top_k": 20, "seed": 11, "num_predict": N, "num_ctx": 8192, "num_thread": 2}
    got = client.generate(model=MODEL, prompt="tell me", options=opts, keep_alive="5m")
    assert got.response == want
    full = client.generate(model=MODEL, prompt="tell me", options=OPTS).response
    if len(full) > 3:
        stop = full[2:4]
        cut = client.generate(model=MODEL, prompt="tell me", options={**OPTS, "stop": [stop]}).response
        assert cut == full[: full.index(stop)].strip() or full.startswith(cut)


def test_tags_show_ps_version(client, server, pipe):
    models = client.list().models
    assert [m.model for m in models] == [f"{MODEL}:latest"]
    assert models[0].size > 0 and models[0].details.family == "tinygptv"
    info = client.show(MODEL)
    assert "vision" in info.capabilities and info.modelinfo["tinygptv.context_length"] == pipe.n_ctx
    assert "{{ .Prompt }}" in info.template
    assert client.show(f"{MODEL}:latest").details.format == "gguf"
    with pytest.raises(ollama.ResponseError) as e:
        client.show("llava")
    assert e.value.status_code == 404 and "not found" in e.value.error
    running = client.ps().models
    assert running[0].model == f"{MODEL}:latest" and running[0].context_length == pipe.n_ctx
    with urllib.request.urlopen(server.url + "/api/version") as r:
        assert json.loads(r.read())["version"].count(".") == 2


def test_load_requests_and_errors_in_ollama_shape(client, server):
    got = client.generate(model=MODEL, prompt="")  # ollama's "load the model"
    assert got.done and got.done_reason == "load"
    assert client.chat(model=MODEL, messages=[]).done_reason == "load"
    for kw, word in (
        ({"options": {"mirostat": 2}}, "mirostat"),
        ({"options": {"no_such_option": 1}}, "no_such_option"),
        ({"think": True}, "thinking"),
    ):
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model=MODEL, prompt="hi", **kw)
        assert e.value.status_code == 400 and word in e.value.error
    bad = base64.b64encode(b"not an image").decode()
    req = urllib.request.Request(
        server.url + "/api/generate",
        json.dumps({"model": MODEL, "prompt": "hi", "images": [bad], "stream": False}).encode(),
        {"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    body = json.loads(e.value.read())
    assert e.value.code == 400 and isinstance(body["error"], str) and "image" in body["error"]


def test_raw_ndjson_is_the_default(server, pipe):
    req = urllib.request.Request(
        server.url + "/api/chat",
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "options": OPTS}
        ).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.read().decode().splitlines() if x]
    assert lines[-1]["done"] is True and "done_reason" in lines[-1]
    assert "".join(x["message"]["content"] for x in lines) == pipe.ask("hello", None, GREEDY).text
