"""`report --paper-set NAME=PATH ...`: the paper's data sets per (vision, language) cell.

--paper-set files --load_paper_set--> PaperSet (items + task) --select(--limit | --sample N --seed)
source model --Builder (as make_report)--> one file per chosen level (OUT/artifacts, reused)
(paper set x cell x shard) --run_serial | run_ray--> predictions per item
--Scorer--> per cell: metric with bootstrap CI, change vs fp32 + F32 (paired CI), breakdown
--> OUT/paper-sets.json (results only: the same for serial and Ray runs), OUT/paper-sets.md (the table),
    OUT/paper-sets.run.json (date, executor, seconds)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tinygptv_edge.runtime.errors import ReportError

from .levels import LANGUAGE_LEVELS, REFERENCE_LANGUAGE, REFERENCE_VISION, VISION_LEVELS, pick
from .metrics import bootstrap_mean
from .paper_sets import PAPER_SETS, PaperSet, load_paper_set
from .paper_sets.executor import run_ray, run_serial
from .paper_sets.runner import RunSpec, make_shards
from .paper_sets.scoring import Prediction, Scorer, item_scores
from .report_run import ReportConfig, _git_commit, _versions, _write_atomic, calibration, strict_json

Progress = Callable[[str, int, int], None]
SCHEMA = 1
FILES = ("paper-sets.json", "paper-sets.md", "paper-sets.run.json")


@dataclass(frozen=True)
class PaperReportConfig:
    sets: dict[str, str]  # name -> annotation file or folder
    images: dict[str, str] = field(default_factory=dict)  # name -> image folder (default: per reader)
    limit: int | None = None  # the first N items of each paper set
    sample: int | None = None  # N items drawn at random (seeded) from each paper set
    shard_size: int = 64  # items per task
    ray: str | None = None  # None: serial; "local" or a cluster address ("ray://host:10001", "auto")
    retries: int = 2  # Ray: re-runs of a failed task
    ship_models: bool = False  # Ray: model files through the object store (else a path every node sees)
    prompts: dict[str, str] = field(default_factory=dict)  # name -> prompt with {question} (default: table)

    def __post_init__(self) -> None:
        if not self.sets:
            raise ReportError("--paper-set: expected at least one NAME=PATH, got none")
        bad = [n for n in (*self.sets, *self.images, *self.prompts) if n not in PAPER_SETS]
        if bad:
            raise ReportError(
                f"paper sets: expected names from {', '.join(PAPER_SETS)}, got {', '.join(bad)}"
            )
        if self.limit is not None and self.sample is not None:
            raise ReportError("expected --limit or --sample, got both")
        for name in ("limit", "sample"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ReportError(f"--{name}: expected a positive integer, got {v!r}")
        if self.shard_size < 1 or self.retries < 0:
            raise ReportError(
                f"expected shard_size >= 1 and retries >= 0, got {self.shard_size}, {self.retries}"
            )


def load_all(pc: PaperReportConfig, seed: int) -> tuple[dict[str, PaperSet], dict[str, int]]:
    """Selected paper sets, and how many items each file holds."""
    sets, totals = {}, {}
    for name, path in pc.sets.items():
        full = load_paper_set(name, path, pc.images.get(name))
        if name in pc.prompts:  # checked by Task: it must hold {question}
            full.task = dataclasses.replace(full.task, prompt=pc.prompts[name], source="--paper-prompt")
        totals[name] = len(full.items)
        sets[name] = full.select(pc.limit, pc.sample, seed)
    return sets, totals


def build_levels(cfg: ReportConfig, say: Progress) -> tuple[dict, dict]:
    """The chosen levels exported from the source model (cached in OUT/artifacts); provenance bits."""
    from tinygptv_edge.export.onnx.presets import get_preset

    from .artifacts import Builder

    loaded = cfg.source.load()
    model, sources = loaded.model, loaded.sha256
    calib = calibration(cfg, model.cfg.preprocess)
    builder = Builder(model, loaded.tokenizer, sources, Path(cfg.out) / "artifacts", calib,
                      get_preset(cfg.preset))  # fmt: skip
    todo = [("vision", lv) for lv in pick(cfg.vision, VISION_LEVELS, REFERENCE_VISION, "vision")]
    todo += [("language", lv) for lv in pick(cfg.language, LANGUAGE_LEVELS, REFERENCE_LANGUAGE, "language")]
    arts: dict[str, dict] = {"vision": {}, "language": {}}
    for i, (half, lv) in enumerate(todo):
        arts[half][lv.name] = (builder.vision(lv) if half == "vision" else builder.language(lv)).to_dict()
        say("exports", i + 1, len(todo))
    for half, ref in (("vision", REFERENCE_VISION), ("language", REFERENCE_LANGUAGE)):
        if arts[half][ref]["error"]:
            raise ReportError(f"the reference {half} level {ref} failed to build: {arts[half][ref]['error']}")
    prov = {"source_model": loaded.label, "source_sha256": dict(sorted(sources.items())),
            "calibration_set": calib.source, "calibration_set_sha256": calib.sha256}  # fmt: skip
    return arts, prov


def _pct(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else 100.0 * float(x)


def score_cells(
    pset: PaperSet, preds: dict[tuple[str, str], list[Prediction]], n_boot: int, seed: int
) -> dict:
    """{cell name: scores} for one paper set; the change is against the reference cell."""
    sc = Scorer(pset, n_boot, seed)
    ref = sc.values(preds[(REFERENCE_VISION, REFERENCE_LANGUAGE)])
    out = {}
    for (v, lang), p in preds.items():
        vals = sc.values(p)
        ci, ch = sc.interval(vals), sc.change(ref, vals)
        row = {
            "value": _pct(ci.value),
            "ci": [_pct(ci.low), _pct(ci.high)],
            "change": _pct(ch.value),
            "change_ci": [_pct(ch.low), _pct(ch.high)],
            "change_significant": bool(ch.excludes_zero()),
        }
        per_item = vals
        if pset.task.metric == "auroc":  # the accuracy of P(yes) > 0.5 beside the AUROC
            per_item = item_scores(pset, p)
            acc = bootstrap_mean(per_item, n_boot, seed)
            row["accuracy"] = _pct(acc.value)
            row["accuracy_ci"] = [_pct(acc.low), _pct(acc.high)]
        types = sorted({it.qtype for it in pset.items})
        if len(types) > 1:
            row["by_type"] = {t: _pct(per_item[[it.qtype == t for it in pset.items]].mean()) for t in types}
        out[f"{v} + {lang}"] = row
    return out


def build_paper_document(sets, totals, cells, preds, arts, settings, provenance, n_boot, seed) -> dict:
    scores = {name: score_cells(b, preds[name], n_boot, seed) for name, b in sets.items()}
    rows = []
    for v, lang in cells:
        name = f"{v} + {lang}"
        size = arts["vision"][v]["file_bytes"] + arts["language"][lang]["file_bytes"]
        rows.append({"name": name, "vision": v, "language": lang, "size_bytes": int(size),
                     "reference": (v, lang) == (REFERENCE_VISION, REFERENCE_LANGUAGE),
                     "scores": {b: scores[b][name] for b in sets}})  # fmt: skip
    return {
        "schema": SCHEMA,
        "kind": "paper_sets",
        "reference": {"vision": REFERENCE_VISION, "language": REFERENCE_LANGUAGE},
        "paper_sets": {
            name: {
                "label": PAPER_SETS[name].label,
                "source": str(b.source),
                "images": str(b.images),
                "items": len(b.items),
                "items_in_file": totals[name],
                "sha256": b.sha256,
                "metric": b.task.metric,
                "answered_by": b.task.kind,
                "prompt": b.task.prompt,
                "prompt_source": b.task.source,
            }
            for name, b in sets.items()
        },
        "cells": rows,
        "artifacts": arts,
        "settings": settings,
        "provenance": provenance,
        "predictions": {
            name: {f"{v} + {lang}": [p.to_list() for p in preds[name][(v, lang)]] for v, lang in cells}
            for name in sets
        },
    }


def _fmt(x: float | None, signed: bool = False) -> str:
    return "n/a" if x is None else (f"{x:+.1f}" if signed else f"{x:.1f}")


def render_paper_markdown(doc: dict) -> str:
    """The paper-style table: a row per cell, a column per paper set (value [CI], change vs reference)."""
    names = list(doc["paper_sets"])
    head = ["vision", "language", "MiB"] + [
        f"{doc['paper_sets'][n]['label']} ({doc['paper_sets'][n]['metric']})" for n in names
    ]
    lines = [
        "# The paper's data sets per quantization level",
        "",
        "Each cell: score in % [95% bootstrap CI], then the change in points against fp32 + F32 "
        "(paired bootstrap; * = the CI excludes 0). AUROC cells add the accuracy of P(yes) > 0.5.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in doc["cells"]:
        cols = [r["vision"], r["language"], f"{r['size_bytes'] / 2**20:.1f}"]
        for n in names:
            s = r["scores"][n]
            txt = f"{_fmt(s['value'])} [{_fmt(s['ci'][0])}, {_fmt(s['ci'][1])}]"
            if not r["reference"]:
                txt += f" ({_fmt(s['change'], True)}{'*' if s['change_significant'] else ''})"
            if "accuracy" in s:
                txt += (
                    f"; acc {_fmt(s['accuracy'])} [{_fmt(s['accuracy_ci'][0])}, {_fmt(s['accuracy_ci'][1])}]"
                )
            cols.append(txt)
        lines.append("| " + " | ".join(cols) + " |")
    typed = [n for n in names if any("by_type" in r["scores"][n] for r in doc["cells"])]
    for n in typed:
        types = list(doc["cells"][0]["scores"][n]["by_type"])
        lines += ["", f"### {doc['paper_sets'][n]['label']} by type (%)", "",
                  "| cell | " + " | ".join(types) + " |", "|" + "---|" * (len(types) + 1)]  # fmt: skip
        for r in doc["cells"]:
            by = r["scores"][n]["by_type"]
            lines.append(f"| {r['name']} | " + " | ".join(_fmt(by[t]) for t in types) + " |")
    lines += ["", "## Data sets", ""]
    for b in doc["paper_sets"].values():
        part = (
            f"{b['items']} of {b['items_in_file']} items"
            if b["items"] != b["items_in_file"]
            else f"{b['items']} items"
        )
        lines.append(f"- **{b['label']}** ({part}, {b['metric']}, answered by {b['answered_by']}): "
                     f"`{b['source']}`; prompt `{b['prompt']}` ({b['prompt_source']})")  # fmt: skip
    sel = doc["settings"]
    if sel.get("sample"):
        lines += ["", f"A random sample of {sel['sample']} items per paper set (seed {sel['seed']}): the CIs "
                  "are the sample's and cover the full-set score (wider for a smaller sample)."]  # fmt: skip
    elif sel.get("limit"):
        lines += ["", f"The first {sel['limit']} items per paper set only (not a random sample)."]
    return "\n".join(lines) + "\n"


def make_paper_report(
    cfg: ReportConfig, pc: PaperReportConfig, progress: Progress | None = None
) -> dict[str, Path]:
    from .matrix import choose_cells

    say = progress or (lambda *_: None)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sets, totals = load_all(pc, cfg.seed)
    arts, prov = build_levels(cfg, say)
    ok_v = [k for k, a in arts["vision"].items() if not a["error"]]
    ok_l = [k for k, a in arts["language"].items() if not a["error"]]
    cells = choose_cells(ok_v, ok_l, cfg.cells)
    paths_v = {k: arts["vision"][k]["path"] for k in ok_v}
    spec = RunSpec(paths_v, {k: arts["language"][k]["path"] for k in ok_l}, cfg.threads, cfg.max_new_tokens)
    shards = make_shards({n: len(b.items) for n, b in sets.items()}, cells, pc.shard_size)
    t1 = time.perf_counter()
    if pc.ray is None:
        got = run_serial(shards, sets, spec, say)
    else:
        address = None if pc.ray == "local" else pc.ray
        got = run_ray(shards, sets, spec, address, say, pc.retries, ship_models=pc.ship_models)
    t2 = time.perf_counter()
    preds: dict[str, dict] = {n: {c: [] for c in cells} for n in sets}
    for sh in shards:  # shard order, not arrival order
        preds[sh.paper_set][sh.cell] += [Prediction.from_list(x) for x in got[sh]]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("budget", "out", "probe", "noise_floor")}
    settings.update(limit=pc.limit, sample=pc.sample, shard_size=pc.shard_size, shards=len(shards))
    provenance = {**prov, "git_commit": _git_commit(), "python": platform.python_version(),
                  **{f"version {k}": v for k, v in _versions().items()}}  # fmt: skip
    for half in arts.values():  # paths relative to OUT: the document does not depend on where OUT is
        for a in half.values():
            a["path"] = os.path.relpath(a["path"], out) if a["path"] else ""
    doc = strict_json(build_paper_document(sets, totals, cells, preds, arts, settings, provenance,
                                           cfg.n_boot, cfg.seed))  # fmt: skip
    run = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "executor": "serial" if pc.ray is None else f"ray ({pc.ray}{', models shipped' * pc.ship_models})",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "seconds_setup": round(t1 - t0, 2),
        "seconds_shards": round(t2 - t1, 2),
        "shards": len(shards),
    }
    paths = {n: out / n for n in FILES}
    _write_atomic(paths["paper-sets.json"], json.dumps(doc, indent=1, allow_nan=False), json.loads)
    _write_atomic(paths["paper-sets.md"], render_paper_markdown(doc), lambda t: t.startswith("# "))
    _write_atomic(paths["paper-sets.run.json"], json.dumps(run, indent=1), json.loads)
    return paths
