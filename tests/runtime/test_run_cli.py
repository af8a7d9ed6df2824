"""`tinygptv-edge run` on the committed exports of the shipped model (tests/data): plain, streamed, JSON,
chat, dist/ defaults, errors, no torch. Runs in the torch-free tier."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers.shipped_data import DATA, language_file
from PIL import Image

from tinygptv_edge.cli import main

pytest.importorskip("tinygptv_edge.runtime.language.decoder")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """A dist/ folder as `make export-onnx export-gguf` leaves it (FP32 vision, Q8_0 language)."""
    out = tmp_path_factory.mktemp("cli") / "dist"
    out.mkdir()
    shutil.copyfile(DATA / "vision.fp32.onnx", out / "vision.fp32.onnx")
    shutil.copyfile(language_file("Q8_0"), out / "language.q8_0.gguf")
    img = out.parent / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(img)
    return out


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["run", *argv, "--threads", "1", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    return code, out, err


def test_plain_stream_and_json_agree(dist, capsys):
    img = str(dist.parent / "photo.png")
    code, plain, _ = cli(capsys, "--dist", str(dist), "--image", img, "--prompt", "what is it?")
    assert code == 0
    code, streamed, _ = cli(
        capsys, "--dist", str(dist), "--image", img, "--prompt", "what is it?", "--stream"
    )
    assert code == 0 and streamed == plain
    code, out, _ = cli(capsys, "--dist", str(dist), "--image", img, "--prompt", "what is it?", "--json")
    data = json.loads(out)
    assert data["answer"] + "\n" == plain and data["tokens"] >= 1
    assert set(data["timings"]) >= {"image_ms", "prefill_tok_s", "decode_tok_s", "first_token_ms"}
    assert data["timings"]["image_ms"] > 0 and data["timings"]["prefill_tok_s"] > 0


def test_stream_json_lines(dist, capsys):
    img = str(dist.parent / "photo.png")
    code, out, _ = cli(capsys, "--dist", str(dist), "--image", img, "--prompt", "q", "--stream", "--json")
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and "answer" in lines[-1]
    assert "".join(x["piece"] for x in lines[:-1]) == lines[-1]["answer"]


def test_explicit_paths_and_sampling_flags(dist, capsys):
    args = ["--vision", str(dist / "vision.fp32.onnx"), "--language", str(dist / "language.q8_0.gguf")]
    flags = ["--sample", "--seed", "3", "--top-k", "20", "--prompt", "hi"]
    a = cli(capsys, *args, *flags)
    b = cli(capsys, *args, *flags)
    assert a[0] == 0 and a[1] == b[1]


def test_chat_mode_on_stdin(dist, capsys, monkeypatch):
    img = dist.parent / "photo.png"
    lines = f"first question\n/image {img}\nwith a picture\n/image nope.png\n/reset\nagain\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out, err = cli(capsys, "--dist", str(dist), "--chat", "--json")
    answers = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and len(answers) == 3
    assert answers[1]["timings"]["image_ms"] > 0 and answers[0]["timings"]["image_ms"] == 0
    assert "no image file" in err


def test_errors_are_reported_not_raised(dist, tmp_path, capsys):
    code, _, err = cli(capsys, "--dist", str(tmp_path), "--prompt", "q")
    assert code == 2 and "make export-onnx" in err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    code, _, err = cli(capsys, "--dist", str(dist), "--image", str(bad), "--prompt", "q")
    assert code == 2 and "error:" in err
    code, _, err = cli(capsys, "--dist", str(dist), "--prompt", "q", "--top-p", "2")
    assert code == 2 and "top_p" in err


def test_defaults_to_dist_in_the_working_directory(dist, capsys, monkeypatch, tmp_path):
    shutil.copytree(dist, tmp_path / "dist")
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "--prompt", "q")
    assert code == 0 and out.endswith("\n")


def test_run_does_not_import_torch(dist, tmp_path):
    argv = ["run", "--dist", str(dist), "--prompt", "q", "--max-new-tokens", "2", "--threads", "1"]
    code = (
        f"import sys; from tinygptv_edge.cli import main; rc = main({argv!r}); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    # outside the source root, whose tinygptv_edge/ would shadow a non-editable install
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
