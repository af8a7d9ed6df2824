"""The report on an evaluation set in splits: per-split exact match and where a level starts to drop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinygptv_edge.calib import evalset as E
from tinygptv_edge.calib.matrix import Cell
from tinygptv_edge.calib.report import Budget, recommend, summarize_cell
from tinygptv_edge.runtime.errors import EvalSetError, ReportError


def _set(tmp_path, answers_by_split):
    from PIL import Image

    im = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    rows = [(im, f"q{i}", a, "t", sp) for sp, ans in answers_by_split.items() for i, a in enumerate(ans)]
    return E.load_evalset(E.write_evalset(tmp_path / "set", rows))


def _cell(vision, language, answers):
    n = len(answers)
    z = np.zeros(n)
    return Cell(vision, language, answers, z, np.ones(n, bool), z, z, z)


def test_split_field_is_read_written_and_optional(tmp_path):
    s = _set(tmp_path, {"a": ["x"] * 3, "b": ["y"] * 2})
    assert s.splits == ["a", "b"] and [it.split for it in s.items] == ["a"] * 3 + ["b"] * 2
    one = [(s.load_image("img_00000.png"), "q", "x", "t")]
    plain = E.load_evalset(E.write_evalset(tmp_path / "plain", one))
    assert plain.splits == [E.DEFAULT_SPLIT]
    (tmp_path / "bad").mkdir()
    bad = '{"image": "a.png", "question": "q", "answer": "x", "split": 3}\n'
    (tmp_path / "bad" / E.QUESTIONS).write_text(bad)
    with pytest.raises(EvalSetError, match="'split'"):
        E.load_evalset(tmp_path / "bad")


def test_per_split_change_and_first_drop(tmp_path):
    s = _set(tmp_path, {"test": ["x"] * 60, "test-phrasing": ["x"] * 60, "test-camera": ["x"] * 60})
    ref = _cell("fp32", "F32", ["x"] * 180)
    # q4 holds on test, loses half of test-phrasing and all of test-camera; q8 holds everywhere
    q4 = _cell("fp32", "Q4_0", ["x"] * 60 + (["x", "no"] * 30) + ["no"] * 60)
    q8 = _cell("fp32", "Q8_0", ["x"] * 179 + ["no"])
    rows = []
    for cell, size in ((ref, 400), (q8, 200), (q4, 100)):
        row = summarize_cell(cell, ref, s, size, n_boot=300, seed=0)
        row["pareto"] = True
        rows.append(row)
    by = rows[2]["by_split"]
    assert list(by) == ["test", "test-phrasing", "test-camera"]
    assert by["test"]["em"] == 100.0 and by["test-phrasing"]["em"] == 50.0 and by["test-camera"]["em"] == 0.0
    assert not by["test"]["drop_significant"] and by["test-phrasing"]["drop_significant"]
    rec = recommend(rows, Budget())
    assert rec["cell"] == "fp32 + Q8_0"  # q4 is smaller but drops on a split
    assert rec["split_drops"] == {"fp32 + Q8_0": None, "fp32 + Q4_0": "test-phrasing"}
    assert "fp32 + Q4_0 starts to drop on test-phrasing (-50.0 points" in rec["text"]
    assert "fp32 + Q8_0 holds on every split" in rec["text"]
    assert "on every split" in rec["rule"]


def test_vqa_splits_as_one_evaluation_folder(tmp_path):
    pytest.importorskip("tinygptv_edge.export.train.vqa")
    s = E.load_evalset(E.write_vqa_splits(tmp_path / "v", 2, ["test", "test-phrasing", "test-layout"]))
    assert s.splits == ["test", "test-phrasing", "test-layout"]
    plain = E.load_evalset(E.write_vqa_evalset(tmp_path / "t", 2)).items  # the test split alone
    first = [(it.question, it.answer, it.qtype) for it in s.items if it.split == "test"]
    assert first == [(it.question, it.answer, it.qtype) for it in plain]
    test_q = [it.question for it in s.items if it.split == "test"]
    reworded = [it.question for it in s.items if it.split == "test-phrasing"]
    assert len(test_q) == len(reworded) and not set(test_q) & set(reworded)
    with pytest.raises(EvalSetError, match="expected one of"):
        E.write_vqa_splits(tmp_path / "x", 1, ["dev"])


@pytest.mark.torch
def test_report_config_checks_splits():
    pytest.importorskip("torch")  # report_run builds levels through the exporters
    from tinygptv_edge.calib.report_run import ReportConfig

    with pytest.raises(ReportError, match="splits"):
        ReportConfig(splits=" , ")


def test_report_on_a_set_in_splits(tiny_single, tmp_path):
    """End to end on the tiny model: the JSON has per-split rows, the Markdown a per-split table."""
    from tinygptv_edge.cli import main

    pytest.importorskip("tinygptv_edge.export.train.vqa")
    out = tmp_path / "report"
    argv = ["report", "--out", str(out), "--model", str(tiny_single), "--n-images", "2",
            "--splits", "test,test-camera", "--n-calib", "2", "--vision", "int8-minmax", "--language", "Q8_0",
            "--cells", "axes", "--no-probe", "--no-noise-floor", "--n-boot", "50"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["evalset"]["splits"] == ["test", "test-camera"]
    for row in doc["cells"]:
        assert set(row["by_split"]) == {"test", "test-camera"}
    assert "Where each level starts to drop" in doc["recommendation"]["text"]
    md = (out / "report.md").read_text()
    assert "## Exact match % per evaluation split" in md
    assert (out / "evalset-test+test-camera-2" / E.QUESTIONS).is_file()
