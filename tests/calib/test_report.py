"""The accuracy report end to end on the tiny model, plus its selection rules and input checks."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tinygptv_edge.calib import evalset as E
from tinygptv_edge.calib.report import Budget, pareto, recommend
from tinygptv_edge.runtime.errors import EvalSetError, ReportError


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        im = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        rows += [
            (im, "What colour is the circle?", "red", "colour"),
            (im, f"How many? ({i})", "two", "count"),
        ]
    return E.write_evalset(tmp_path_factory.mktemp("eval") / "set", rows)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"c{i}.png")
    return folder


def test_report_end_to_end(tiny_single, eval_dir, calib_dir, tmp_path, capsys):
    from tinygptv_edge.cli import main

    out = tmp_path / "report"
    argv = ["report", "--out", str(out), "--model", str(tiny_single), "--eval-dir", str(eval_dir),
            "--calib-images", str(calib_dir), "--vision", "int8-minmax", "--language", "Q8_0",
            "--n-boot", "200", "--max-size-mib", "100"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Under total size <= 100 MiB" in printed

    doc = json.loads((out / "report.json").read_text())
    cells = {(r["vision"], r["language"]): r for r in doc["cells"]}
    assert set(cells) == {(v, lg) for v in ("fp32", "int8-minmax") for lg in ("F32", "Q8_0")}
    ref = cells[("fp32", "F32")]
    assert ref["reference"] and ref["kl"]["max"] == 0.0 and ref["flip_rate"] == 0.0
    assert ref["em_change"] == 0.0 and ref["same_top1"] == 100.0 and ref["ppl_ratio"] == 1.0

    from tinygptv_edge.calib.report_html import plot_kl

    # `--vision fp32 --language Q8_0`: the vision axis holds no level; its panel is left empty
    only_language = {**doc, "cells": [r for r in doc["cells"] if r["vision"] == "fp32"]}
    assert len(plot_kl(only_language)) > 1000
    q8 = cells[("fp32", "Q8_0")]
    assert 0.0 < q8["kl"]["mean"] <= q8["kl"]["p99"] <= q8["kl"]["max"]
    assert q8["size_bytes"] < ref["size_bytes"]
    assert any(r["pareto"] for r in doc["cells"])
    assert doc["recommendation"]["cell"] in {r["name"] for r in doc["cells"]}
    # axes: cosine/SQNR of the INT8 embeddings; the reference against itself is exact
    axes = {a["level"]: a for a in doc["vision_axis"]}
    assert axes["fp32"]["cosine_min"] == pytest.approx(1.0) and axes["fp32"]["sqnr_db"] is None
    assert 0.9 < axes["int8-minmax"]["cosine_mean"] < 1.0 and axes["int8-minmax"]["sqnr_db"] > 10
    # cost: sizes, bits per weight and a probe per file
    lang = doc["artifacts"]["language"]
    assert lang["F32"]["bpw"] == pytest.approx(32.0) and 8.0 < lang["Q8_0"]["bpw"] < 9.5
    for half in ("vision", "language"):
        for a in doc["artifacts"][half].values():
            assert a["probe"]["peak_rss_mib"] > 0, a
    assert lang["Q8_0"]["probe"]["decode_tok_s"] > 0 and lang["Q8_0"]["probe"]["prefill_tok_s"] > 0
    assert lang["Q8_0"]["probe"]["runs"] == 3  # speeds from three fresh processes, with their range
    lo, hi = lang["Q8_0"]["probe"]["range"]["decode_tok_s"]
    assert lo <= lang["Q8_0"]["probe"]["decode_tok_s"] <= hi
    assert doc["noise_floor"]["kl"]["max"] < 1e-6
    prov = doc["provenance"]
    assert len(prov["source_checkpoint_sha256"]) == 64 and len(prov["calibration_set_sha256"]) == 64
    assert prov["evalset_sha256"] == E.load_evalset(eval_dir).sha256
    assert doc["examples"] and doc["examples"][0]["question"]

    md = (out / "report.md").read_text()
    assert md.startswith("# ") and "## Recommendation" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| Q8_0 |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 18  # 16 columns

    page = (out / "report.html").read_text()
    HTMLParser().feed(page)
    assert page.rstrip().endswith("</html>")
    assert len(re.findall(r"data:image/png;base64,", page)) >= 3 + len(doc["examples"])
    assert "http://" not in page and "https://" not in page  # self-contained

    # a second run reuses every export (the manifest vouches for them)
    arts = out / "artifacts"
    before = {p.name: p.stat().st_mtime_ns for p in arts.iterdir() if p.suffix in (".onnx", ".gguf")}
    argv2 = argv[:-4] + ["--cells", "axes", "--no-probe", "--no-noise-floor", "--n-boot", "50"]
    assert main(argv2) == 0
    after = {p.name: p.stat().st_mtime_ns for p in arts.iterdir() if p.suffix in (".onnx", ".gguf")}
    assert after == before
    doc2 = json.loads((out / "report.json").read_text())
    assert len(doc2["cells"]) == 3 and doc2["noise_floor"] is None
    assert doc2["cells_mode"] == "axes" and [x["name"] for x in doc2["unmeasured"]] == ["int8-minmax + Q8_0"]
    for name in ("report.md", "report.html"):  # the mode and the unmeasured pair, named in each rendering
        text = (out / name).read_text()
        assert "axes mode" in text and "int8-minmax + Q8_0" in text and "not measured" in text

    # a level that cannot be evaluated is recorded with its error; the others still run
    from tinygptv_edge.calib import matrix as MX
    from tinygptv_edge.runtime.language.decoder import Decoder

    bad = tmp_path / "bad.gguf"
    bad.write_bytes((arts / "language.q8_0.gguf").read_bytes()[:3000])
    with Decoder(arts / "language.f32.gguf", n_ctx=64) as dec:
        prep = MX.prepare(E.load_evalset(eval_dir, limit=2), dec.tokenizer, dec.prompt, tiny_cfg(tiny_single))
    paths = {"F32": str(arts / "language.f32.gguf"), "bad": str(bad)}
    res = MX.run_matrix(prep, {"fp32": str(arts / "vision.fp32.onnx")}, paths,
                        MX.choose_cells(["fp32"], ["F32", "bad"], "full"), 1, noise_floor=False)  # fmt: skip
    assert list(res.cells) == [("fp32", "F32")]
    assert "evaluation failed" in res.failed[("language", "bad")]


def tiny_cfg(folder: Path):
    from tinygptv_edge.runtime.config import TinyGPTVConfig

    return TinyGPTVConfig.load(folder / "config.json").preprocess


def _row(name, size, em, lo_change=-1.0, kl=0.01, ref=False):
    return {"name": name, "vision": name.split("+")[0], "language": name.split("+")[-1], "reference": ref,
            "size_bytes": size, "em": em, "em_ci": [em - 5, em + 5], "em_change": em - 80.0,
            "em_change_ci": [lo_change, lo_change + 4], "flip_rate": 1.0, "kl": {"mean": kl}}  # fmt: skip


def test_recommend_and_pareto_rules():
    mib = 2**20
    rows = [
        _row("fp32+F32", 100 * mib, 80.0, ref=True, lo_change=-2),
        _row("a+Q8", 40 * mib, 80.0, lo_change=-2),
        _row("b+Q4", 20 * mib, 78.0, lo_change=-5),  # change CI [-5, -1]: significantly worse
        _row("c+Q5", 30 * mib, 79.0, lo_change=-3),
        _row("d+Q3", 35 * mib, 70.0, lo_change=-14),  # dominated by c+Q5
    ]
    assert pareto(rows) == ["a+Q8", "b+Q4", "c+Q5"]
    assert recommend(rows, Budget())["cell"] == "c+Q5"  # smallest not significantly worse
    assert recommend(rows, Budget(max_size_mib=25))["cell"] == "b+Q4"
    assert recommend(rows, Budget(max_size_mib=45))["cell"] == "a+Q8"  # best accuracy that fits
    assert recommend(rows, Budget(min_accuracy=79.5))["cell"] == "a+Q8"  # smallest that reaches it
    assert recommend(rows, Budget(max_drop=1.5))["cell"] == "c+Q5"
    rec = recommend(rows, Budget(max_size_mib=10))
    assert rec["cell"] is None and rec["ok"] is False and "No measured pair meets" in rec["text"]
    assert "MiB" in recommend(rows, Budget(max_size_mib=45))["text"]
    with pytest.raises(ReportError, match="expected a number"):
        Budget(max_size_mib=-1)


def test_evalset_errors_name_the_problem(tmp_path, eval_dir):
    s = E.load_evalset(eval_dir)
    assert len(s.items) == 6 and len(s.images) == 3 and s.types == ["colour", "count"]
    assert E.load_evalset(eval_dir, limit=2).sha256 != s.sha256
    cases = {
        '{"image": "a.png", "question": "q"}': "missing answer",
        '{"image": "../a.png", "question": "q", "answer": "x"}': "inside the folder",
        '{"image": "a.png", "question": "q", "answer": ""}': "non-empty string",
        "[1, 2]": "expected a JSON object",
        '{"image": "nope.png", "question": "q", "answer": "x"}': "not found",
    }
    for i, (line, msg) in enumerate(cases.items()):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / E.QUESTIONS).write_text(line + "\n")
        with pytest.raises(EvalSetError, match=msg):
            E.load_evalset(d)
    with pytest.raises(EvalSetError, match="expected questions.jsonl"):
        E.load_evalset(tmp_path)


def test_vqa_split_as_evaluation_folder(tmp_path):
    pytest.importorskip("tinygptv_edge.export.train.vqa")
    s = E.load_evalset(E.write_vqa_evalset(tmp_path / "vqa", n_images=2, split="test"))
    assert len(s.images) == 2 and len(s.items) >= 2 * 5
    assert {"colour", "count"} <= set(s.types)
    again = E.load_evalset(E.write_vqa_evalset(tmp_path / "vqa2", n_images=2, split="test"))
    assert again.sha256 == s.sha256  # deterministic by seed


def test_failed_level_is_reported_not_hidden(tiny_single, calib_dir, tmp_path, monkeypatch):
    from tinygptv_edge.calib import artifacts as A
    from tinygptv_edge.calib.levels import VISION_LEVELS
    from tinygptv_edge.export.checkpoints.single import load_single
    from tinygptv_edge.export.onnx import quant as onnx_quant
    from tinygptv_edge.export.onnx.calib_data import load_folder
    from tinygptv_edge.export.onnx.presets import get_preset
    from tinygptv_edge.runtime.errors import QuantizationError
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    model, _ = load_single(tiny_single)
    pixels = load_folder(calib_dir, model.cfg.preprocess, 4)
    b = A.Builder(model, Tokenizer.from_file(tiny_single), {"model.safetensors": "x"}, tmp_path,
                  A.Calibration(pixels, ["q"], "test"), get_preset("x86-vnni"))  # fmt: skip

    def refuse(*_a, **_k):
        raise QuantizationError("calibration collapsed (test)")

    monkeypatch.setattr(onnx_quant, "quantize_vision", refuse)
    art = b.vision(VISION_LEVELS["int8-entropy"])
    assert art.error == "calibration collapsed (test)" and not art.path
    assert b.vision(VISION_LEVELS["fp32"]).error == ""  # the reference still builds
    doc = {"artifacts": {"vision": {"int8-entropy": art.to_dict()}, "language": {}}}
    from tinygptv_edge.calib.report_md import failed_rows, table

    text = table(*failed_rows(doc))
    assert "int8-entropy" in text and "calibration collapsed" in text


@pytest.mark.slow
def test_shipped_model_report(tmp_path):
    """The shipped model: F16 and Q8_0 must stay within a hair of F32 (a broken export shows here)."""
    from tinygptv_edge.calib.report_run import ReportConfig, make_report
    from tinygptv_edge.export.checkpoints.default import default_model_dir

    if not (default_model_dir() / "model.safetensors").is_file():
        pytest.skip("the shipped default model is not there (make train-default)")
    cfg = ReportConfig(out=str(tmp_path), n_images=20, vision="int8-minmax", language="F16,Q8_0",
                       cells="axes", probe=False, n_boot=500, splits="test")  # fmt: skip
    doc = json.loads(make_report(cfg)["report.json"].read_text())
    rows = {r["name"]: r for r in doc["cells"]}
    ref = rows["fp32 + F32"]
    assert ref["em"] > 20.0, "the shipped model should answer many synthetic questions"
    for name in ("fp32 + F16", "fp32 + Q8_0"):
        assert rows[name]["kl"]["mean"] < 1e-3 and rows[name]["flip_rate"] <= 3.0, rows[name]
    assert rows["int8-minmax + F32"]["em_change_ci"][1] >= 0.0


def test_memory_budget_from_report_to_exports(tiny_single, eval_dir, calib_dir, tmp_path, capsys):
    """`report --memory-budget` prices every cell from its real files; `export-onnx` and `export-gguf
    --memory-budget --report` then export the two levels of the pair the report recommends."""
    from tinygptv_edge.cli import main
    from tinygptv_edge.runtime.memory_plan import kv_bytes_per_position, low_memory_need, vision_file_bytes

    out = tmp_path / "report"
    argv = ["report", "--out", str(out), "--model", str(tiny_single), "--eval-dir", str(eval_dir),
            "--calib-images", str(calib_dir), "--vision", "int8-minmax", "--language", "Q8_0",
            "--n-boot", "50",
            "--no-probe", "--no-noise-floor", "--memory-budget", "64G", "--kv-type", "q4_0"]  # fmt: skip
    assert main(argv) == 0
    assert "predicted low-memory peak (KV q4_0) <= 64.00 GiB" in capsys.readouterr().out
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema"] >= 3 and doc["budget"]["memory_bytes"] == 64 * 2**30
    arts = doc["artifacts"]
    for r in doc["cells"]:  # each cell's peak, from its own files
        v, lg = arts["vision"][r["vision"]]["path"], arts["language"][r["language"]]["path"]
        for kv in ("f16", "q8_0", "q4_0"):
            per_pos, trained = kv_bytes_per_position(lg, kv)
            want = low_memory_need(vision_file_bytes(v), Path(lg).stat().st_size, per_pos, trained)
            assert r["low_memory_peak_bytes"][kv] == want, (r["name"], kv)
    assert "Predicted low-memory peak" in (out / "report.md").read_text()

    # a budget only the smallest peak meets (in bytes, as a bare number): that cell, or one that ties it
    peaks = {r["name"]: r["low_memory_peak_bytes"]["f16"] for r in doc["cells"]}
    tight = min(peaks.values())
    assert main(["report", "--out", str(out), "--render-only", "--memory-budget", str(tight)]) == 0
    rec = json.loads((out / "report.json").read_text())["recommendation"]
    assert rec["ok"] and peaks[rec["cell"]] == tight
    chosen = next(r for r in doc["cells"] if r["name"] == rec["cell"])
    capsys.readouterr()
    assert main(["report", "--out", str(out), "--render-only", "--memory-budget", str(tight - 1)]) == 0
    rec = json.loads((out / "report.json").read_text())["recommendation"]
    assert rec["ok"] is False and "smallest predicted low-memory peak (KV f16)" in rec["text"]

    # the exporters: the same pair, each its half
    dist = tmp_path / "dist"
    budget = ["--memory-budget", str(tight), "--report", str(out / "report.json")]
    capsys.readouterr()
    assert main(["export-gguf", "--model", str(tiny_single), "--out", str(dist), *budget]) == 0
    printed = capsys.readouterr().out
    assert f"picks vision {chosen['vision']} + language {chosen['language']}" in printed
    assert sorted(p.name for p in dist.glob("*.gguf")) == [f"language.{chosen['language'].lower()}.gguf"]
    onnx_argv = ["export-onnx", "--model", str(tiny_single), "--out", str(dist),
                 "--calib-images", str(calib_dir),
                 *budget]  # fmt: skip
    assert main(onnx_argv) == 0
    printed = capsys.readouterr().out
    assert f"picks vision {chosen['vision']} + language {chosen['language']}" in printed
    graphs = sorted(p.name for p in dist.glob("*.onnx"))
    want = ["vision.fp32.onnx"] if chosen["vision"] == "fp32" else ["vision.fp32.onnx", "vision.int8.onnx"]
    assert graphs == want and "the budget's vision graph" in printed


def test_export_memory_budget_errors_say_what_to_do(tiny_single, tmp_path, capsys):
    from tinygptv_edge.cli import main

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": 2, "cells": [{"name": "fp32 + F32"}]}))
    missing = tmp_path / "none.json"
    for command in ("export-onnx", "export-gguf"):
        base = [command, "--model", str(tiny_single), "--out", str(tmp_path / "d")]
        cases = {
            ("--memory-budget", "1.5X", "--report", str(old)): "--memory-budget: expected a size",
            ("--memory-budget", "1.5G", "--report", str(missing)): "found none; run `make report`",
            ("--memory-budget", "1.5G", "--report", str(old)): "schema: expected 3 or later",
        }
        for extra, msg in cases.items():
            assert main([*base, *extra]) == 2, (command, extra)
            err = capsys.readouterr().err
            assert msg in err, (command, err)
        assert not (tmp_path / "d").exists()  # refused before anything was written
    # a report with predicted peaks: flags that pick a level themselves conflict with the budget
    good = tmp_path / "report.json"
    cell = {"name": "int8-minmax + Q8_0", "vision": "int8-minmax", "language": "Q8_0", "em_change": -1.0,
            "kl": {"mean": 0.1}, "size_bytes": 5, "low_memory_peak_bytes": {"f16": 2**30, "q8_0": 2**30,
            "q4_0": 2**30}}  # fmt: skip
    good.write_text(json.dumps({"schema": 3, "cells": [cell]}))
    budget = ["--memory-budget", "1G", "--report", str(good)]
    cases = {
        ("export-gguf", "--level", "Q4_0"): "--level Q4_0 and --memory-budget: expected one of them",
        ("export-onnx", "--int4"): "--memory-budget and --int4: expected one of them",
        ("export-onnx", "--no-int8", "--method", "entropy"): "--memory-budget and --no-int8, --method",
    }
    for (command, *extra), msg in cases.items():
        assert (
            main([command, "--model", str(tiny_single), "--out", str(tmp_path / "d"), *budget, *extra]) == 2
        )
        assert msg in capsys.readouterr().err
    argv = ["export-gguf", "--model", str(tiny_single), "--out", str(tmp_path / "d"),
            "--memory-budget", "1023M",
            "--report", str(good)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no measured pair" in err and "int8-minmax + Q8_0's, 1.00 GiB" in err
    assert not (tmp_path / "d").exists()
