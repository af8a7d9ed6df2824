"""The report says what it measured and what it did not (issue #33): the cell mode and unmeasured pairs,
budgets over measured pairs only, speeds from repeated runs, the sample's resolution, wrong answers as
worst examples, readable size axes. Documents are built from hand-made cells: no model runs here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tinygptv_edge.calib.evalset import EvalItem, EvalSet
from tinygptv_edge.calib.matrix import Cell, MatrixResult, VisionAxis
from tinygptv_edge.calib.report import Budget, build_document, recommend, sample_note
from tinygptv_edge.calib.report_md import render_markdown, speed

MIB = 2**20
# (level, file MiB): the reference halves are large, the quantized ones small
VISION = {"fp32": 4.0, "int8-minmax": 1.42}
LANGUAGE = {"F32": 8.0, "Q8_0": 2.1, "Q4_0": 1.07}


def _evalset(n: int, answers: list[str] | None = None) -> EvalSet:
    answers = answers or ["red"] * n
    items = [EvalItem(f"img{i % 3}.png", f"What colour? ({i})", answers[i], "colour") for i in range(n)]
    return EvalSet(Path("/nonexistent"), items, "0" * 64)


def _cell(v: str, lg: str, answers: list[str], kl: float = 0.0) -> Cell:
    n = len(answers)
    kl_q = np.full(n, kl) + np.linspace(0, 1e-3, n)  # distinct, so the ranking is defined
    return Cell(
        v, lg, answers, np.repeat(kl_q, 2), np.ones(2 * n, bool), np.zeros(2 * n), np.ones(2 * n), kl_q
    )


def _axis(level: str) -> VisionAxis:
    return VisionAxis(level, np.ones(8), np.full(2, 40.0), 40.0, 12.0)


def _artifacts(probe_runs: int | None = 3) -> dict:
    def art(mib: float, half: str) -> dict:
        a = {"file_bytes": int(mib * MIB), "bpw": 8.0}
        if half == "language":  # the KV cache per position (F16: 4 layers x 2 x 64 x 2 bytes), as read
            a["kv_bytes_per_position"] = {"f16": 1024, "q8_0": 544, "q4_0": 288}  # from the GGUF header
            a["n_ctx_train"] = 2048
        if probe_runs is not None:
            figures = (
                {"ms_per_image": 10.0} if half == "vision" else {"prefill_tok_s": 900.0, "decode_tok_s": 80.0}
            )
            a["probe"] = {**figures, "peak_rss_mib": 50.0, "runs": probe_runs, "load_s": 0.1}
            if probe_runs >= 2:
                a["probe"]["range"] = {k: [v * 0.9, v * 1.1] for k, v in a["probe"].items() if k != "runs"}
        return a

    return {
        "vision": {k: art(v, "vision") for k, v in VISION.items()},
        "language": {k: art(v, "language") for k, v in LANGUAGE.items()},
    }


def _doc(mode: str = "axes", budget: Budget | None = None, n: int = 60, level_answers=None, probe_runs=3):
    """A report document as `make report --cells MODE` builds it, from hand-made cells."""
    ev = _evalset(n)
    right = ["red"] * n
    result = MatrixResult()
    pairs = [(v, lg) for lg in LANGUAGE for v in VISION]
    if mode == "axes":
        pairs = [(v, lg) for v, lg in pairs if v == "fp32" or lg == "F32"]
    for v, lg in pairs:
        ref = (v, lg) == ("fp32", "F32")
        answers = right if ref or level_answers is None else level_answers
        result.cells[(v, lg)] = _cell(v, lg, list(answers), kl=0.0 if ref else 0.01)
    result.vision = {v: _axis(v) for v in VISION}
    settings = {
        "cells": mode,
        "max_new_tokens": 16,
        "n_boot": 200,
        "seed": 0,
        "threads": 1,
        "probe_threads": 2,
    }
    arts, prov = _artifacts(probe_runs), {"git_commit": "x"}
    return build_document(result, ev, arts, budget or Budget(), settings, prov, n_boot=200)


def test_axes_mode_is_named_and_unmeasured_cells_are_marked_in_every_rendering():
    pytest.importorskip("matplotlib")  # the HTML page's plots (the export extra)
    from tinygptv_edge.calib.report_html import render_html

    doc = _doc("axes")
    assert doc["cells_mode"] == "axes"
    missing = {(x["vision"], x["language"]) for x in doc["unmeasured"]}
    assert missing == {("int8-minmax", "Q8_0"), ("int8-minmax", "Q4_0")}
    md, page = render_markdown(doc), render_html(doc)
    for text in (md, page):
        assert "axes mode" in text and "2 built pairs were not measured" in text
    matrix = md.split("## End task")[1].split("## ")[0]
    row = next(ln for ln in matrix.splitlines() if ln.startswith("| int8-minmax |"))
    assert row.count("not measured") == 2  # the matrix says so instead of leaving the cell blank
    assert '<td class="nm">not measured</td>' in page
    full = _doc("full")
    assert full["unmeasured"] == [] and "full cross matrix" in render_markdown(full)


def test_a_size_budget_only_unmeasured_pairs_fit_is_not_reported_as_no_level_fits():
    pytest.importorskip("matplotlib")  # the HTML page's plots (the export extra)
    from tinygptv_edge.calib.report_html import render_html

    # 3 MiB: int8 (1.42) + Q4_0 (1.07) fits but was not measured in axes mode; no measured pair fits
    doc = _doc("axes", Budget(max_size_mib=3))
    rec = doc["recommendation"]
    assert rec["cell"] is None and rec["ok"] is False
    assert "No level" not in rec["text"] and "No measured pair meets" in rec["text"]
    assert "int8-minmax + Q4_0" in rec["text"] and rec["unmeasured_fitting"] == ["int8-minmax + Q4_0"]
    assert "--cells full" in rec["text"]
    md, page = render_markdown(doc), render_html(doc)
    assert "**Budget not met.**" in md
    assert '<div class="rec fail"><b>Budget not met.</b>' in page and '<div class="rec">' not in page
    # measured in full mode, the same budget is met by that pair
    full = _doc("full", Budget(max_size_mib=3))
    assert full["recommendation"]["cell"] == "int8-minmax + Q4_0" and full["recommendation"]["ok"]
    assert '<div class="rec"><b>Recommendation.</b>' in render_html(full)


def test_a_met_budget_still_names_fitting_pairs_left_unmeasured():
    rows = _doc("axes")["cells"]
    unmeasured = [
        {"vision": "int8-minmax", "language": "Q4_0", "name": "int8-minmax + Q4_0", "size_bytes": 3 * MIB}
    ]
    rec = recommend(rows, Budget(max_size_mib=20), unmeasured)
    assert (
        rec["ok"]
        and rec["cell"] is not None
        and "Not measured (1 pair within the size budget)" in rec["text"]
    )


def test_speeds_from_one_run_are_not_rendered_as_figures():
    assert speed({"decode_tok_s": 208.0, "runs": 1}, "decode_tok_s", ".1f") == "1 run: not shown"
    assert speed({"decode_tok_s": 1870.0}, "decode_tok_s", ".1f") == "1 run: not shown"  # older documents
    three = {"decode_tok_s": 1870.0, "runs": 3, "range": {"decode_tok_s": [1679.0, 1885.0]}}
    assert speed(three, "decode_tok_s", ".0f") == "1870 [1679-1885]"
    md = render_markdown(_doc("full", probe_runs=1))
    assert "80.0" not in md and "900" not in md and "1 run: not shown" in md
    assert "one run per level, not shown" in md
    md3 = render_markdown(_doc("full", probe_runs=3))
    assert "80.0 [72.0-88.0]" in md3 and "median [min-max] of 3 runs" in md3


def test_probe_runs_give_median_and_range(monkeypatch):
    from tinygptv_edge.calib import probe as P

    runs = [(208.0, 50.0), (1870.0, 51.0), (1679.0, 49.0)]
    figures = iter([{"decode_tok_s": d, "peak_rss_mib": m} for d, m in runs])
    monkeypatch.setattr(P, "run_probe", lambda *a, **k: next(figures))
    got = P.run_probes("language", "x.gguf", 2, runs=3)
    assert got["runs"] == 3 and got["decode_tok_s"] == 1679.0  # the median, not the outlier
    assert got["range"]["decode_tok_s"] == [208.0, 1870.0] and got["peak_rss_mib"] == 50.0
    monkeypatch.setattr(P, "run_probe", lambda *a, **k: {"error": "probe timed out after 300 s"})
    assert P.run_probes("language", "x.gguf", 2, runs=3) == {"error": "probe timed out after 300 s"}


def test_a_small_sample_says_it_cannot_separate_the_levels():
    doc = _doc("full", n=60)  # every answer right everywhere: CIs [0, 0]
    s = doc["sample"]
    assert not s["separates"] and s["resolution_pts"] == pytest.approx(5.0)  # 3/60 by the rule of three
    assert s["questions_needed"] >= 300 and "too small to separate" in s["text"]
    assert s["text"] in render_markdown(doc)
    big = sample_note([{"reference": False, "em_change_ci": [-0.4, 0.4]}], 5000)
    assert big["separates"] and "fine enough" in big["text"]
    wide = sample_note([{"reference": False, "em_change_ci": [-6.0, 2.0]}], 600)
    assert not wide["separates"] and wide["resolution_pts"] == 4.0 and wide["questions_needed"] >= 600 * 16


def test_worst_examples_are_wrong_answers_or_labelled_closest_calls():
    n = 12
    level = ["red"] * n
    level[3], level[7] = "blue", "green"
    doc = _doc("full", n=n, level_answers=level)
    assert doc["examples_kind"] == "wrong"
    assert {x["index"] for x in doc["examples"]} == {3, 7} and all(x["wrong"] for x in doc["examples"])
    assert "Wrong answers of any level" in render_markdown(doc)
    right = _doc("full", n=n)
    assert right["examples_kind"] == "closest" and right["examples"]
    assert not any(x["wrong"] for x in right["examples"])
    assert "No level answered a question wrongly" in render_markdown(right)


def test_size_axis_reads_in_plain_mib():
    pytest.importorskip("matplotlib")  # the HTML page's plots (the export extra)
    from tinygptv_edge.calib.report_html import _plain_ticks, _plt

    plt = _plt()
    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_xlim(2, 20)
    _plain_ticks(ax.xaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    plt.close(fig)
    assert labels and all(re.fullmatch(r"[0-9.]+", t) for t in labels), labels
    assert "5" in labels and "10" in labels


# -- a memory budget (`--memory-budget`): the predicted low-memory peak of each cell's real files --------


def _mem_row(name: str, drop: float, peak_mib: float, kl: float = 0.01, size_mib: float = 50.0) -> dict:
    """A measured cell with its predicted low-memory peak per KV type (q8_0 / q4_0: less KV cache)."""
    peaks = {
        "f16": int(peak_mib * MIB),
        "q8_0": int((peak_mib - 40) * MIB),
        "q4_0": int((peak_mib - 60) * MIB),
    }
    v, lg = name.split(" + ")
    return {"name": name, "vision": v, "language": lg, "reference": drop == 0,
            "size_bytes": int(size_mib * MIB), "em": 90.0 + drop, "em_ci": [85.0, 95.0], "em_change": drop,
            "em_change_ci": [drop - 2, drop + 2], "flip_rate": 1.0, "kl": {"mean": kl},
            "low_memory_peak_bytes": peaks}  # fmt: skip


MEM_ROWS = [
    _mem_row("fp32 + F32", 0.0, 3000, kl=0.0, size_mib=900),
    _mem_row("int8-minmax + Q8_0", -0.5, 1700, kl=0.02, size_mib=400),
    _mem_row("fp32 + Q4_0", -0.5, 1600, kl=0.01, size_mib=500),  # same drop as Q8_0, lower KL
    _mem_row("int8-minmax + Q4_0", -3.0, 1200, size_mib=300),
    _mem_row("int8-minmax + Q2_K", -9.0, 1000, size_mib=200),
]


def test_a_memory_budget_picks_the_lowest_measured_drop_whose_peak_fits():
    from tinygptv_edge.export.budget import pick_for_memory

    def pick(mib: float, kv: str = "f16") -> str | None:
        return recommend(MEM_ROWS, Budget(memory_bytes=int(mib * MIB), kv_type=kv))["cell"]

    assert pick(4000) == "fp32 + F32"
    assert pick(1700) == "fp32 + Q4_0"  # ties on the drop: the lower mean KL
    assert pick(1599) == "int8-minmax + Q4_0"  # not the smallest peak: the lowest drop that fits
    assert pick(1599, "q4_0") == "fp32 + Q4_0"  # a smaller KV cache lets the better pair fit
    assert pick(1000) == "int8-minmax + Q2_K"
    rec = recommend(MEM_ROWS, Budget(memory_bytes=1200 * MIB))
    assert rec["ok"] and "predicted low-memory peak (KV f16) <= 1.17 GiB" in rec["text"]
    assert "predicted low-memory peak (KV f16) 1.17 GiB" in rec["text"]
    # the exporters' choice is the report's, from the same rows
    for mib in (4000, 1700, 1599, 1200, 1000):
        for kv in ("f16", "q4_0"):
            doc = {"cells": MEM_ROWS}
            assert pick_for_memory(doc, int(mib * MIB), kv)["name"] == pick(mib, kv), (mib, kv)


def test_a_memory_budget_no_cell_meets_is_a_failure_naming_the_smallest_peak():
    from tinygptv_edge.export.budget import pick_for_memory
    from tinygptv_edge.runtime.errors import ReportError

    rec = recommend(MEM_ROWS, Budget(memory_bytes=900 * MIB))
    assert rec["cell"] is None and rec["ok"] is False
    assert "No measured pair meets predicted low-memory peak (KV f16) <= 900 MiB" in rec["text"]
    assert (
        "smallest predicted low-memory peak (KV f16) is 1000 MiB, vision int8-minmax + language Q2_K"
        in (rec["text"])
    )
    with pytest.raises(ReportError, match=r"no measured pair .* fits .*int8-minmax \+ Q2_K's, 1000 MiB"):
        pick_for_memory({"cells": MEM_ROWS}, 900 * MIB)
    # an unmeasured built pair under the budget is named, so the failure reads "not measured"
    spare = {"vision": "int8-minmax", "language": "Q3_K_M", "name": "int8-minmax + Q3_K_M",
             "size_bytes": 150 * MIB,
             "low_memory_peak_bytes": {k: 800 * MIB for k in ("f16", "q8_0", "q4_0")}}  # fmt: skip
    rec = recommend(MEM_ROWS, Budget(memory_bytes=900 * MIB), [spare])
    assert rec["unmeasured_fitting"] == ["int8-minmax + Q3_K_M"] and "within the memory budget" in rec["text"]
    assert "predicted peak 800 MiB" in rec["text"]
    with pytest.raises(ReportError, match="kv_type"):
        Budget(memory_bytes=MIB, kv_type="q8")
    with pytest.raises(ReportError, match="memory_bytes: expected a positive integer, got 0"):
        Budget(memory_bytes=0)


def test_every_cell_carries_its_predicted_peak_and_every_rendering_shows_it():
    pytest.importorskip("matplotlib")
    from tinygptv_edge.calib.report_html import render_html
    from tinygptv_edge.runtime.memory_plan import MARGIN, low_memory_need

    doc = _doc("axes", Budget(memory_bytes=MARGIN + 3 * MIB, kv_type="q8_0"))
    # from the files: max(vision, language + KV at the low-memory allocation (256 positions)) + margin
    by = {(r["vision"], r["language"]): r for r in [*doc["cells"], *doc["unmeasured"]]}
    assert len(by) == 6
    for (v, lg), r in by.items():
        for kv, per_pos in {"f16": 1024, "q8_0": 544, "q4_0": 288}.items():
            want = low_memory_need(int(VISION[v] * MIB), int(LANGUAGE[lg] * MIB), per_pos, 2048)
            assert (
                r["low_memory_peak_bytes"][kv]
                == want
                == max(int(VISION[v] * MIB), int(LANGUAGE[lg] * MIB) + 256 * per_pos) + MARGIN
            )
    assert doc["budget"]["memory_bytes"] == MARGIN + 3 * MIB and doc["budget"]["kv_type"] == "q8_0"
    # the int8 pairs (peaks 602.2 and 601.4 MiB) fit 603 MiB but were not measured; no measured pair fits
    rec = doc["recommendation"]
    assert rec["ok"] is False and rec["unmeasured_fitting"] == ["int8-minmax + Q4_0", "int8-minmax + Q8_0"]
    md, page = render_markdown(doc), render_html(doc)
    for text in (md, page):
        assert "Predicted low-memory peak, MiB per cell (KV q8_0" in text
    peaks = md.split("## Predicted low-memory peak")[1].split("## ")[0]
    row = next(ln for ln in peaks.splitlines() if ln.startswith("| fp32 |"))
    assert row == "| fp32 | 608 over | 604 over | 604 over |"
    row = next(ln for ln in peaks.splitlines() if ln.startswith("| int8-minmax |"))
    assert row == "| int8-minmax | 608 over | 602 (not measured) | 601 (not measured) |"
