"""Benchmark (not a test): does `tinygptv-edge serve` stay flat over thousands of requests? (issue #32)

    files:   --tiny (the test suite's tiny random model, built as bench/serve.py --tiny does), or full
             size: --language L.gguf with --vision V.onnx or --stand-in-vision (bench/serve.py's tiny
             vision graph of the full output shape); bench/pipeline.py builds and caches full-size files
    server:  a fresh `tinygptv-edge serve` subprocess on a free 127.0.0.1 port, --cache-dir in --work
    load:    N requests in a row from this process (raw HTTP), a fixed mix cycled with a seeded RNG:
             OpenAI chat plain / streamed / streamed and cancelled after the first piece / JSON-constrained
             (json_object and json_schema), ollama /api/chat (NDJSON and plain) and /api/generate,
             /v1/embeddings, a 400 (bad image); images drawn from a pool larger than the in-memory image
             cache (repeats, evictions, disk-cache hits), text questions from a small pool (KV snapshots)
    records: the server's RSS (VmRSS), open fds (/proc/PID/fd) and threads (/proc/PID/task), idle, after
             the warm-up requests and at the end; prints the growth and checks it against the targets

The server's caches fill up to their budgets by design (KV snapshots: --cache-ram, 256 MiB by default;
image embeddings: 64): growth while they fill is not a leak. So the server runs with a small snapshot
budget (--cache-ram, 1 MiB here) and more distinct images than the memory cache holds; each image is
embedded once first (the memory cache full, every image on disk), then the warm-up (N/10 requests)
fills the snapshot budget; what grows after it is what the targets bound.

Targets (issue #32): RSS growth after warm-up <= 2 %, fds and threads back to their warm count.
Bounded: --requests and --max-seconds (the run stops at whichever comes first), every request has a
timeout. Run from the repository root:

    .venv/bin/python bench/soak.py --tiny --requests 2000
    .venv/bin/python bench/soak.py --language L.q4_0.gguf --stand-in-vision --requests 300

Exit status 0 when every target holds, 1 when one is missed, 2 when the server failed.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.util
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

RSS_GROWTH_MAX = 0.02


def _bench_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).with_name("serve.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def probe(pid: int) -> dict:
    """The server's resident memory (KiB), open file descriptors and threads, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {
        "rss_kib": rss,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


class Client:
    """One request at a time over fresh loopback connections (as most clients do)."""

    def __init__(self, port: int, timeout: float):
        self.port, self.timeout = port, timeout

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)

    def get(self, path: str) -> tuple[int, dict]:
        conn = self._conn()
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        conn = self._conn()
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def cancel_after_first(self, path: str, body: dict) -> int:
        """Send a streamed request, read until the first content piece, then hang up."""
        conn = self._conn()
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status == 200:
                for _ in range(8):  # the role chunk, then the first piece
                    line = r.readline()
                    if not line or b'"content": "' in line and b'"content": ""' not in line:
                        break
            conn.sock.shutdown(socket.SHUT_RDWR)
            return r.status
        finally:
            conn.close()


KINDS = ["plain", "stream", "cancel", "json_object", "json_schema", "ollama_chat", "ollama_plain",
         "ollama_generate", "embeddings", "bad_image"]  # fmt: skip


def requests(rng: random.Random, images: list[bytes], model: str, tokens: int, kinds: list[str] = KINDS):
    """An endless, seeded mix of `kinds`: (kind, how, path, body, check) for `send`."""
    questions = ["What is in the picture?", "Describe it.", "What colour is it?", "Count the shapes."]

    def uri(img: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(img).decode()

    def msgs(text: str, img: bytes | None) -> list[dict]:
        if img is None:
            return [{"role": "user", "content": text}]
        parts = [{"type": "image_url", "image_url": {"url": uri(img)}}, {"type": "text", "text": text}]
        return [{"role": "user", "content": parts}]

    def chat(stream: bool, img, fmt=None) -> dict:
        body = {"model": model, "messages": msgs(rng.choice(questions), img), "max_tokens": tokens}
        body["temperature"] = rng.choice([0, 0, 0.8])
        body["stream"] = stream
        if fmt:
            body["response_format"] = fmt
        return body

    def ok_sse(data: bytes) -> bool:
        return data.rstrip().endswith(b"data: [DONE]")

    def ok_ndjson(data: bytes) -> bool:
        lines = data.strip().splitlines()
        return bool(lines) and json.loads(lines[-1]).get("done") is True

    def ok_status(want: int):
        return lambda status, data: status == want

    sse = lambda status, data: status == 200 and ok_sse(data)  # noqa: E731
    ndjson = lambda status, data: status == 200 and ok_ndjson(data)  # noqa: E731
    ollama_one = lambda status, data: status == 200 and json.loads(data).get("done") is True  # noqa: E731
    schema = {"type": "object", "properties": {"colour": {"type": "string"}, "n": {"type": "integer"}}}
    while True:
        img = rng.choice(images) if rng.random() < 0.6 else None
        kind = rng.choice(kinds)
        # (kind, how: "post" | "cancel", path, body, check(status, data) -> bool)
        if kind == "plain":
            yield kind, "post", "/v1/chat/completions", chat(False, img), ok_status(200)
        elif kind == "stream":
            yield kind, "post", "/v1/chat/completions", chat(True, img), sse
        elif kind == "cancel":
            body = chat(True, img)
            body["max_tokens"] = tokens * 8
            yield kind, "cancel", "/v1/chat/completions", body, ok_status(200)
        elif kind in ("json_object", "json_schema"):
            fmt = {"type": "json_object"} if kind == "json_object" else {
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}  # fmt: skip
            body = chat(False, img, fmt)
            body["max_tokens"] = tokens * 4
            yield kind, "post", "/v1/chat/completions", body, ok_status(200)
        elif kind in ("ollama_chat", "ollama_plain"):
            m: dict = {"role": "user", "content": rng.choice(questions)}
            if img is not None:
                m["images"] = [base64.b64encode(img).decode()]
            body = {"model": model, "messages": [m], "options": {"num_predict": tokens, "temperature": 0}}
            body["stream"] = kind == "ollama_chat"
            yield kind, "post", "/api/chat", body, ndjson if kind == "ollama_chat" else ollama_one
        elif kind == "ollama_generate":
            body = {"model": model, "prompt": rng.choice(questions), "stream": False,
                    "options": {"num_predict": tokens}}  # fmt: skip
            if img is not None:
                body["images"] = [base64.b64encode(img).decode()]
            yield kind, "post", "/api/generate", body, ollama_one
        elif kind == "embeddings":
            body = {"model": model, "input": uri(rng.choice(images))}
            yield kind, "post", "/v1/embeddings", body, ok_status(200)
        else:
            yield kind, "post", "/v1/chat/completions", chat(False, b"not an image"), ok_status(400)


def send(client: Client, how: str, path: str, body: dict, check) -> tuple[object, bool]:
    if how == "cancel":
        status = client.cancel_after_first(path, body)
        return status, status == 200
    status, data = client.post(path, body)
    return status, bool(check(status, data))


def settle(client: Client, pid: int, seconds: float = 1.0) -> dict:
    """Wait until the server is idle (nothing running or queued), then probe it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, h = client.get("/health")
        if status == 200 and not h.get("running") and not h.get("queue"):
            break
        time.sleep(0.1)
    time.sleep(seconds)  # let closed connections and finished handlers go
    return probe(pid)


def run(args: argparse.Namespace, vision: Path, language: Path) -> int:
    work = Path(args.work)
    cache = work / "image-cache"
    cache.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "tinygptv_edge.cli", "serve", "--vision", str(vision), "--language",
           str(language), "--port", str(port), "--cache-dir", str(cache), "--log-level", "warning",
           "--max-tokens", str(args.tokens), "--cache-ram", str(args.cache_ram)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = open(work / "server.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    client = Client(port, args.request_timeout)
    try:
        deadline = time.monotonic() + args.load_timeout
        while True:
            try:
                if client.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"the server did not start; see {work / 'server.log'}", file=sys.stderr)
                return 2
            time.sleep(0.2)
        start = probe(proc.pid)
        rng = random.Random(args.seed)
        images = [_png(i) for i in range(args.images)]
        for img in images:  # fill the image cache (memory: its LRU capacity; disk: every image)
            uri = "data:image/png;base64," + base64.b64encode(img).decode()
            status, _ = client.post("/v1/embeddings", {"model": "tinygptv-edge", "input": uri})
            if status != 200:
                print(f"filling the image cache: /v1/embeddings answered {status}", file=sys.stderr)
                return 2
        mix = requests(rng, images, "tinygptv-edge", args.tokens, args.kinds.split(","))
        counts: Counter = Counter()
        bad: Counter = Counter()
        statuses: Counter = Counter()
        warm = None
        t0 = time.monotonic()
        done = 0
        for i in range(args.requests):
            if time.monotonic() - t0 > args.max_seconds:
                print(f"stopped at the time bound ({args.max_seconds} s)", file=sys.stderr)
                break
            if i == args.warmup:
                warm = settle(client, proc.pid)
                print(f"warm after {i} requests: {warm}", file=sys.stderr, flush=True)
            kind, *req = next(mix)
            try:
                status, ok = send(client, *req)
            except (OSError, http.client.HTTPException) as e:
                status, ok = type(e).__name__, False
            counts[kind] += 1
            statuses[status] += 1
            if not ok:
                bad[kind] += 1
            done += 1
            if args.progress and done % args.progress == 0:
                print(f"{done} requests, {probe(proc.pid)}", file=sys.stderr, flush=True)
            if proc.poll() is not None:
                print("the server died", file=sys.stderr)
                return 2
        end = settle(client, proc.pid)
        health = client.get("/health")[1]
        if warm is None:
            warm = start
        growth = (end["rss_kib"] - warm["rss_kib"]) / warm["rss_kib"]
        checks = {
            "rss_growth": growth <= RSS_GROWTH_MAX,
            "fds": end["fds"] <= warm["fds"],
            "threads": end["threads"] <= warm["threads"],
            "answers": not bad,
        }
        report = {
            "model": args.label,
            "requests": done,
            "warmup": min(args.warmup, done),
            "kinds": dict(counts),
            "statuses": {str(k): v for k, v in statuses.items()},
            "unexpected": dict(bad),
            "start": start,
            "warm": warm,
            "end": end,
            "rss_growth_pct": round(100 * growth, 3),
            "fd_growth": end["fds"] - warm["fds"],
            "thread_growth": end["threads"] - warm["threads"],
            "health": {k: health.get(k) for k in ("completed", "cancelled", "rejected", "failed", "refused")},
            "checks": checks,
        }
        print(json.dumps(report, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        return 0 if all(checks.values()) else 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny random model (built in --work)")
    p.add_argument("--vision", help="a vision ONNX graph (full size)")
    p.add_argument("--language", help="a language GGUF (full size)")
    p.add_argument("--stand-in-vision", action="store_true", help="bench/serve.py's stand-in vision graph")
    p.add_argument("--work", default=".bench-soak", help="built files, the image cache and server.log")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=None, help="requests before the warm probe (default N/10)")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop sending after this long")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--load-timeout", type=float, default=600.0)
    p.add_argument("--tokens", type=int, default=8, help="max_tokens of a request")
    p.add_argument("--images", type=int, default=96, help="distinct images (the memory cache holds 64)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--cache-ram",
        type=int,
        default=1,
        help="the server's KV snapshot budget (MiB): small, so the warm-up fills it (see the docstring)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS), help="the request kinds to mix (default: all)")
    p.add_argument("--progress", type=int, default=200, help="print a probe every this many requests")
    p.add_argument("--json", help="write the report here too")
    args = p.parse_args()
    if args.warmup is None:
        args.warmup = max(1, args.requests // 10)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.tiny:
        vision, language = _bench_serve().build_tiny(work / "tiny", say)
        args.label = "tiny"
    else:
        if not args.language:
            p.error("give --tiny, or --language (and --vision or --stand-in-vision)")
        language = Path(args.language)
        if args.vision:
            vision = Path(args.vision)
        elif args.stand_in_vision:
            vision = _bench_serve().build_stand_in_vision(work, say)
        else:
            p.error("full size needs --vision or --stand-in-vision")
        args.label = f"{language.name} + {vision.name}"
    return run(args, vision, language)


if __name__ == "__main__":
    sys.exit(main())
