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
    code, _, err = cli(capsys, "--dist", str(dist), "--prompt", "q", "--sample", "--top-p", "2")
    assert code == 2 and "top_p" in err


def test_temperature_implies_sampling_and_greedy_only_flags_are_refused(dist, capsys):
    from tinygptv_edge.runtime.cli.run import register, sampling_from_args

    parser = __import__("argparse").ArgumentParser()
    register(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["run", *a])  # noqa: E731
    s = sampling_from_args(parse("--temperature", "0.7"))
    assert s.do_sample and s.temperature == 0.7  # not silently ignored: it samples
    assert not sampling_from_args(parse("--sample", "--temperature", "0")).do_sample  # 0: greedy
    assert sampling_from_args(parse("--temperature", "0.7", "--top-k", "5")).top_k == 5
    code, _, err = cli(capsys, "--dist", str(dist), "--prompt", "q", "--top-k", "5")
    assert code == 2 and "--top-k applies only when sampling" in err and "--temperature" in err
    args = ["--dist", str(dist), "--prompt", "hi", "--seed", "3"]
    assert cli(capsys, *args, "--temperature", "0.8")[1] == cli(capsys, *args, "--temperature", "0.8")[1]


def test_unknown_flags_print_the_subcommands_usage_with_llama_cpp_hints(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "-m", "model.gguf", "--mmproj", "mmproj.gguf", "-p", "hi", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: tinygptv-edge run ")
    assert "unrecognized arguments: -m model.gguf --mmproj mmproj.gguf -p hi --bogus" in err
    assert (
        "-m: llama.cpp's flag; here use --language" in err
        and "--mmproj: llama.cpp's flag; here use --vision" in err
    )
    assert "-p: llama.cpp's flag; here use --prompt" in err
    with pytest.raises(SystemExit):
        main(["serve", "--ctx-size", "512"])
    err = capsys.readouterr().err
    assert err.startswith("usage: tinygptv-edge serve ") and "here use --n-ctx" in err


def test_swapped_model_files_say_which_flag(dist, capsys):
    vision, language = str(dist / "vision.fp32.onnx"), str(dist / "language.q8_0.gguf")
    code, _, err = cli(capsys, "--vision", language, "--language", language, "--prompt", "q")
    assert (
        code == 2
        and "this looks like a GGUF file (the language model)" in err
        and "pass it as --language" in err
    )
    code, _, err = cli(capsys, "--vision", vision, "--language", vision, "--prompt", "q")
    assert (
        code == 2
        and "this looks like an ONNX file (the vision model)" in err
        and "pass it as --vision" in err
    )
    # the runtime's loaders check it too, for every entry point (Pipeline, bench, serve)
    from tinygptv_edge.runtime.errors import ModelFileError, TinyGPTVError
    from tinygptv_edge.runtime.pipeline import Pipeline

    with pytest.raises(ModelFileError, match="looks like a GGUF file"):
        Pipeline(language, language, n_threads=1)
    with pytest.raises(TinyGPTVError, match="looks like an ONNX file"):
        Pipeline(vision, vision, n_threads=1)


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
