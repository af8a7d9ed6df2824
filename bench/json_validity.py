"""Benchmark (not a test): how often constrained JSON answers of `tinygptv-edge serve` parse and validate.

    a fresh `tinygptv-edge serve` on the shipped model's exports (dist/, `make demo` makes them), on a free
    127.0.0.1 port; this process is the client (the official `openai` package)
    grid: schemas (free strings, integers, enums, booleans, arrays, nested objects, json_object) x images
          (export/data/example.png + calibration images) x questions x temperatures (0 and 0.7), each
          request at the server's default max_tokens
    per request: parsed? valid against its schema? finish_reason (a `length` finish means a cut answer)

Target (issue #30): 100% valid over >= 200 requests, no `length` finish. Exit 1 when any answer is
invalid. Run from the repository root after `make demo`:

    .venv/bin/python bench/json_validity.py                  # the full grid (256 requests)
    .venv/bin/python bench/json_validity.py --dist DIR --temperatures 0
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

SCHEMAS: dict[str, dict | None] = {
    "free_string_and_integer": {  # the schema of docs/serve.md
        "type": "object",
        "properties": {"animal": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["animal", "count"],
    },
    "caption": {"type": "object", "properties": {"caption": {"type": "string"}}, "required": ["caption"]},
    "two_free_strings": {
        "type": "object",
        "properties": {"colour": {"type": "string"}, "shape": {"type": "string"}},
        "required": ["colour", "shape"],
    },
    "enum": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue", "yellow", "cyan", "purple"]}},
        "required": ["colour"],
    },
    "boolean_and_bounded_integer": {
        "type": "object",
        "properties": {
            "has_circle": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 20},
        },
        "required": ["has_circle", "n"],
    },
    "array_of_strings": {
        "type": "object",
        "properties": {"shapes": {"type": "array", "items": {"type": "string"}}},
        "required": ["shapes"],
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "scene": {
                "type": "object",
                "properties": {"background": {"type": "string"}, "objects": {"type": "integer"}},
                "required": ["background", "objects"],
            }
        },
        "required": ["scene"],
    },
    "json_object": None,
}
QUESTIONS = (
    "What is in the picture?",
    "Describe the image.",
    "What colour is the circle?",
    "How many objects are in the picture?",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"serve not ready after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    import jsonschema
    from openai import OpenAI

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dist", default="dist", help="folder with vision.int8.onnx and language.q4_0.gguf")
    p.add_argument("--images", type=int, default=4, help="images: example.png + N-1 calibration images")
    p.add_argument("--temperatures", default="0,0.7")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    dist = Path(a.dist)
    images = [Path("export/data/example.png"), *sorted((dist / "calib-images").glob("*.png"))[: a.images - 1]]
    temps = [float(t) for t in a.temperatures.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tinygptv_edge", "serve", "--dist", str(dist), "--port", str(port),
           "--threads", str(a.threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, proc)
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        rows, t0 = [], time.time()
        for (name, schema), image, question, temp in itertools.product(
            SCHEMAS.items(), images, QUESTIONS, temps
        ):
            uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
            fmt = (
                {"type": "json_object"}
                if schema is None
                else {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
            )
            r = client.chat.completions.create(
                model="tinygptv",
                messages=[{"role": "user", "content": [
                    {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": uri}}]}],
                response_format=fmt,
                temperature=temp,
                seed=1,
            )  # fmt: skip
            text, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
            try:
                obj = json.loads(text)
                jsonschema.validate(obj, schema if schema is not None else {"type": "object"})
                valid = True
            except (ValueError, jsonschema.ValidationError):
                valid = False
            rows.append((name, image.name, question, temp, finish, valid, text))
        seconds = time.time() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    invalid = [r for r in rows if not r[5]]
    finishes = Counter(r[4] for r in rows)
    valid = len(rows) - len(invalid)
    print(f"{len(rows)} requests in {seconds:.0f} s: {valid} valid, {len(invalid)} invalid; "
          f"finish_reason {dict(finishes)}")  # fmt: skip
    per_schema = Counter(r[0] for r in rows if r[5])
    for name in SCHEMAS:
        n = sum(1 for r in rows if r[0] == name)
        print(f"  {name:28s} {per_schema[name]}/{n} valid")
    for r in invalid[:10]:
        print("  invalid:", r[:5], repr(r[6][:100]))
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
