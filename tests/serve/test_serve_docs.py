"""The server examples in README.md and docs/serve.md, run as written on the shipped model.

The shipped model's committed exports (tests/data: INT8 vision + Q4_0 language, as `make demo` writes
them to dist/) are served on 127.0.0.1; every ```python block and every curl command of those pages is
run in a folder laid out like a checkout after `make demo` (dist/, export/data/example.png), with the
port changed, and the answers the comments promise ("cyan", "four", ...) must be in what they print.
Torch-free: runs wherever the runtime installs.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("tinygptv_edge.runtime.language.decoder")
for _mod in ("starlette", "uvicorn", "pydantic", "llguidance"):
    pytest.importorskip(_mod, reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("openai", reason="the openai client (dev extra) is not installed")
pytest.importorskip("ollama", reason="the ollama client (dev extra) is not installed")

from helpers.serve import LiveServer  # noqa: E402
from helpers.shipped_data import DATA  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PAGES = (ROOT / "docs" / "serve.md", ROOT / "README.md")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """dist/ as `make demo` leaves it, and export/data/example.png."""
    out = tmp_path_factory.mktemp("docs")
    (out / "dist" / "calib-images").mkdir(parents=True)
    shutil.copyfile(DATA / "vision.int8.onnx", out / "dist" / "vision.int8.onnx")
    shutil.copyfile(DATA / "language.q4_0.gguf", out / "dist" / "language.q4_0.gguf")
    shutil.copyfile(DATA / "images" / "test_00000.png", out / "dist" / "calib-images" / "calib_00000.png")
    (out / "export" / "data").mkdir(parents=True)
    shutil.copyfile(ROOT / "export" / "data" / "example.png", out / "export" / "data" / "example.png")
    return out


@pytest.fixture(scope="module")
def server(checkout):
    from tinygptv_edge.runtime.pipeline import Pipeline

    dist = checkout / "dist"
    with LiveServer(
        lambda: Pipeline(dist / "vision.int8.onnx", dist / "language.q4_0.gguf", n_threads=2)
    ) as s:
        yield s


def blocks(lang: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for code in re.findall(rf"```{lang}\n(.*?)```", page.read_text(), re.S):
            found.append((page.name, code))
    return found


def promised(code: str) -> list[str]:
    """The answers a block's comments promise: `print(...)  # cyan`, `# "content": "four"`,
    `# ... "response": "blue"` (not `# {"shapes": ...}`: the count is the model's guess)."""
    words = []
    for line in code.splitlines():
        if "#" not in line:
            continue
        comment = line.split("#", 1)[1].strip()
        m = re.search(r'"(?:content|response)": "([^"]+)"', comment)
        if m is None and "print(" in line:
            m = re.match(r"([a-z][a-z ]*[a-z])(?:\s+\(.*\))?$", comment)
        if m:
            words.append(m.group(1))
    return words


def test_python_examples_run_and_answer_as_their_comments_say(server, checkout, monkeypatch):
    monkeypatch.chdir(checkout)
    runs = 0
    for page, code in blocks("python"):
        if "127.0.0.1:8080" not in code and "Pipeline(" not in code:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}"), page, "exec"), {})  # noqa: S102
        for word in promised(code):
            assert word in out.getvalue(), (page, word, out.getvalue())
        runs += 1
    assert runs >= 4  # serve.md: openai, ollama; README: Pipeline, openai


@pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("bash") is None, reason="needs curl and bash"
)
def test_curl_examples_run_and_answer_as_their_comments_say(server, checkout):
    runs = 0
    for page, code in blocks("bash"):
        if "curl" not in code or "127.0.0.1:8080" not in code:
            continue
        script = code.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}")
        script = "\n".join(
            line for line in script.splitlines() if "tinygptv-edge serve" not in line and "make " not in line
        )
        out = subprocess.run(
            ["bash", "-e", "-c", script], cwd=checkout, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, (page, out.stderr)
        for word in promised(code):
            assert f'"{word}"' in out.stdout, (page, word, out.stdout[:2000])  # a whole JSON string
        runs += 1
    assert runs >= 4  # README's serve it; serve.md: call it, ollama, llama-server
