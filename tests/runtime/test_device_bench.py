"""`tinygptv-edge bench` on the tiny model's exports, and `--low-memory auto` (runtime/memory_plan.py).

No timing thresholds: the fields must exist, be finite and positive, and agree with each other.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tinygptv_edge.cli import main
from tinygptv_edge.runtime.cli.device_bench import DeviceBenchConfig
from tinygptv_edge.runtime.errors import ConfigError, ModelFileError
from tinygptv_edge.runtime.language.kernels import ops as kquant
from tinygptv_edge.runtime.memory_plan import MARGIN, mem_available_bytes, plan_memory

pytestmark = pytest.mark.torch

pytest.importorskip("torch")  # the fixture exports the tiny model
pytest.importorskip("tinygptv_edge.runtime.language.decoder")

FAST = ["--threads", "1", "--repeats", "1", "--prompt-tokens", "8", "--decode-tokens", "3"]


@pytest.fixture(scope="module")
def dist(tiny, tmp_path_factory):
    """A dist/ folder as `make export-onnx export-gguf` leaves it (FP32 vision, Q8_0 language)."""
    from tinygptv_edge.export.gguf.export import export_gguf
    from tinygptv_edge.export.onnx.export import export_vision

    out = tmp_path_factory.mktemp("bench") / "dist"
    out.mkdir()
    export_vision(tiny.model, out)
    export_gguf(tiny.model, tiny.tokenizer, out / "language.q8_0.gguf", "Q8_0")
    return out


def device_bench_json(capsys, dist, *extra: str) -> dict:
    code = main(["bench", "--dist", str(dist), *FAST, "--bandwidth-mib", "8", "--json", *extra])
    out, _ = capsys.readouterr()
    assert code == 0
    return json.loads(out)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_fields_exist_and_agree(dist, capsys):
    r = device_bench_json(capsys, dist)
    res, mem, models = r["results"], r["memory"], r["models"]
    for key in ("load_s", "vision_ms_per_image", "vision_ms_cold", "first_token_ms", "first_token_ms_cold",
                "question_prefill_tok_s", "prefill_tok_s", "decode_tok_s", "bandwidth_bytes_s",
                "decode_ceiling_tok_s", "decode_vs_ceiling"):  # fmt: skip
        assert positive(res[key]), (key, res[key])
    # time to first token contains the image's time (same runs: one warm question)
    assert res["first_token_ms"] >= res["vision_ms_per_image"]
    assert res["question_prefill_tokens"] > 0 and res["prefill_batch_tokens"] == 8
    assert res["decode_run_tokens"] == 3 and res["bandwidth_buffer_bytes"] == 8 * 1024**2
    assert 0 < models["weight_bytes_per_token"] < models["language_bytes"]
    assert res["decode_ceiling_tok_s"] == pytest.approx(
        res["bandwidth_bytes_s"] / models["weight_bytes_per_token"]
    )
    assert res["decode_vs_ceiling"] == pytest.approx(res["decode_tok_s"] / res["decode_ceiling_tok_s"])
    assert mem["peak_rss_bytes"] > models["language_bytes"]  # the process holds at least the mapped model
    assert mem["mode"] == "auto" and isinstance(mem["low_memory"], bool) and mem["reason"]
    assert r["settings"]["threads"] == 1 and r["settings"]["repeats"] == 1 and r["settings"]["n_ctx"] > 11
    ggml = r["features"]["ggml"]
    assert ggml and all(isinstance(v, bool) for v in ggml.values())
    assert ("avx2" in ggml) or ("neon" in ggml)
    assert r["features"]["kernel_path"] == kquant.active_path()
    assert r["features"]["onnxruntime"]["device"] == "CPU"
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    # what fits this board: the files measured and every language level, from the same formulas
    fits = r["fits"]
    assert fits["resident_need_bytes"] == mem["resident_need_bytes"]
    assert fits["low_memory_need_bytes"] == mem["low_memory_need_bytes"]
    assert (
        fits["vision_bytes"] == models["vision_bytes"] and fits["language_bytes"] == models["language_bytes"]
    )
    if fits["mem_available_bytes"] is not None:  # Linux
        assert fits["mem_total_bytes"] >= fits["mem_available_bytes"] == mem["available_bytes"]
        assert fits["fits_resident"] is (fits["resident_need_bytes"] <= fits["mem_available_bytes"])
        auto = plan_memory("auto", dist / "vision.fp32.onnx", dist / "language.q8_0.gguf",
                           available=fits["mem_available_bytes"])  # fmt: skip
        assert fits["auto_mode"] == ("low-memory" if auto.low_memory else "resident")
    levels = {lv["level"]: lv for lv in fits["levels"]}
    assert {"F32", "Q8_0", "Q4_0", "Q4_K_M", "Q2_K"} <= set(levels)
    assert levels["Q8_0"]["language_bytes"] == models["language_bytes"]  # the measured file's own level
    for lv in levels.values():
        assert set(lv["low_memory_peak_bytes"]) == {"f16", "q8_0", "q4_0"} == set(lv["fits"])


def test_low_memory_on_and_the_table(dist, capsys):
    r = device_bench_json(capsys, dist, "--low-memory", "on")
    assert r["memory"]["low_memory"] is True and r["memory"]["reason"].startswith(
        "low-memory mode (--low-memory on)"
    )
    assert positive(r["results"]["decode_tok_s"]) and positive(r["results"]["vision_ms_per_image"])
    code = main(["bench", "--dist", str(dist), *FAST, "--bandwidth-mib", "4"])
    out, _ = capsys.readouterr()
    assert code == 0
    labels = ("ggml CPU features", "native kernel path", "time to first token", "decode ceiling", "peak RSS",
              "MemTotal / MemAvailable", "these files, low-memory", "--low-memory auto picks",
              "Q4_0 (")  # fmt: skip
    for label in labels:
        assert label in out


def test_bad_arguments(dist, capsys):
    assert main(["bench", "--dist", str(dist), "--repeats", "0"]) == 2
    assert "repeats" in capsys.readouterr().err
    assert main(["bench", "--dist", str(dist), "--language", str(dist / "nope.gguf")]) == 2
    assert "language model not found" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        DeviceBenchConfig(prompt_tokens=True)


def test_plan_memory_auto_picks_from_what_is_available(dist):
    v, lang = dist / "vision.fp32.onnx", dist / "language.q8_0.gguf"
    plenty = plan_memory("auto", v, lang, available=1 << 40)
    assert plenty.low_memory is False and not plenty.tight and plenty.reason.startswith("resident mode")
    need, low = plenty.resident_need, plenty.low_memory_need
    assert MARGIN < low < need
    assert need >= v.stat().st_size + lang.stat().st_size + MARGIN
    short = plan_memory("auto", v, lang, available=need - 1)
    assert short.low_memory is True and not short.tight and short.reason.startswith("low-memory mode")
    tiny = plan_memory("auto", v, lang, available=low - 1)
    assert tiny.low_memory is True and tiny.tight
    forced = plan_memory("off", v, lang, available=need - 1)
    assert forced.low_memory is False and forced.tight  # asked for: resident, with a warning
    assert plan_memory("on", v, lang, available=1 << 40).low_memory is True
    # a longer context needs more for the resident KV cache
    assert (
        plan_memory("auto", v, lang, n_ctx=256).resident_need
        > plan_memory("auto", v, lang, n_ctx=16).resident_need
    )
    with pytest.raises(ConfigError, match="expected one of"):
        plan_memory("sometimes", v, lang)
    with pytest.raises(ModelFileError, match="vision model not found"):
        plan_memory("auto", dist / "missing.onnx", lang)


def test_mem_available_reads_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       2000000 kB\nMemFree:         100000 kB\nMemAvailable:    1500000 kB\n")
    assert mem_available_bytes(f) == 1500000 * 1024
    f.write_text("MemTotal:       2000000 kB\n")
    assert mem_available_bytes(f) is None
    assert mem_available_bytes(tmp_path / "absent") is None


def test_run_accepts_low_memory_modes(dist, capsys):
    img = dist.parent / "photo.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    answers = []
    for flag in (["--low-memory"], ["--low-memory", "auto"], ["--low-memory", "off"]):
        argv = ["run", "--dist", str(dist), "--image", str(img), "--prompt", "q", "--threads", "1",
                "--max-new-tokens", "4", "--json", *flag]  # fmt: skip
        assert main(argv) == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
    assert answers[0] == answers[1] == answers[2]  # the mode changes memory, never the answer


def test_device_bench_does_not_import_torch(dist):
    argv = ["bench", "--dist", str(dist), *FAST, "--bandwidth-mib", "4", "--json"]
    forbidden = ["torch", "transformers", "onnx", "gguf"]
    code = (
        f"import sys; from tinygptv_edge.cli import main; rc = main({argv!r}); assert rc == 0, rc; "
        f"bad = [m for m in {forbidden!r} if m in sys.modules]; assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("command", ["run", "bench", "serve"])
def test_low_memory_flag_is_the_same_everywhere(command):
    from tinygptv_edge.cli import build_parser

    parser = build_parser(only=command)
    assert parser.parse_args([command]).low_memory == "auto"
    assert parser.parse_args([command, "--low-memory", "off"]).low_memory == "off"
    assert parser.parse_args([command, "--low-memory"]).low_memory == "on"  # the bare flag run had
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--low-memory", "maybe"])


@pytest.mark.parametrize("command", ["run", "bench", "serve"])
def test_kv_type_flag_is_the_same_everywhere(command):
    if command == "serve":
        pytest.importorskip("starlette", reason="the serve extra is not installed")
    from tinygptv_edge.cli import build_parser

    parser = build_parser(only=command)
    assert parser.parse_args([command]).kv_type == "f16"
    assert parser.parse_args([command, "--kv-type", "q8_0"]).kv_type == "q8_0"
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--kv-type", "q8"])


def test_plan_memory_counts_the_kv_type(dist):
    v, lang = dist / "vision.fp32.onnx", dist / "language.q8_0.gguf"
    from tinygptv_edge.runtime.memory_plan import kv_bytes_per_position

    f16, q8 = (plan_memory("on", v, lang, available=1 << 40, kv_type=k) for k in ("f16", "q8_0"))
    (p16, trained), (p8, _) = kv_bytes_per_position(lang), kv_bytes_per_position(lang, "q8_0")
    assert p8 != p16 and q8.resident_need - f16.resident_need == (p8 - p16) * trained
    with pytest.raises(ConfigError, match="kv-type"):
        plan_memory("on", v, lang, kv_type="q8")
