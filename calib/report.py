"""From measured cells to the report's data: per-cell summaries, Pareto front, worst examples, advice.

    MatrixResult (per-position arrays, answers) + Artifacts (bytes, bpw) + probes (speed, RSS)
        --summarize_cell--> one row per cell: EM with CI, EM change vs reference (paired CI), flip rate,
                            KL mean/median/p99/max, same-top-1, delta p, perplexity ratio, size
        --pareto / recommend / worst_examples--> the JSON document every renderer reads

The document is plain JSON (numbers, strings, lists); `render_markdown` and `report_html` read only it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinygptv_edge.export import budget as B
from tinygptv_edge.runtime.errors import ReportError
from tinygptv_edge.runtime.memory_plan import BUDGET_KV_TYPES, format_size, low_memory_need

from . import metrics as M
from .evalset import EvalSet
from .levels import REFERENCE_LANGUAGE, REFERENCE_VISION
from .matrix import Cell, MatrixResult, VisionAxis

SCHEMA = 3  # 2: cells_mode, unmeasured, sample, examples_kind; probes as repeated runs; 3: predicted peaks
MIB = 2**20
MATTERS_PTS = 1.0  # the exact-match change (points) the project's accuracy targets are stated in
RULE_OF_THREE = 3.0  # no event in n trials: the 95% upper bound of its rate is about 3 / n


@dataclass(frozen=True)
class Budget:
    """What the user can afford: total size (MiB), minimum exact match (%), maximum drop (points), memory
    (bytes: the predicted low-memory peak with a KV cache of `kv_type` at most)."""

    max_size_mib: float | None = None
    min_accuracy: float | None = None
    max_drop: float | None = None
    memory_bytes: int | None = None
    kv_type: str = "f16"

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and (
            not isinstance(self.memory_bytes, int)
            or isinstance(self.memory_bytes, bool)
            or self.memory_bytes < 1
        ):
            raise ReportError(f"budget memory_bytes: expected a positive integer, got {self.memory_bytes!r}")
        if self.kv_type not in BUDGET_KV_TYPES:
            raise ReportError(
                f"budget kv_type: expected one of {', '.join(BUDGET_KV_TYPES)}, got {self.kv_type!r}"
            )
        for name in ("max_size_mib", "min_accuracy", "max_drop"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise ReportError(f"budget {name}: expected a number >= 0, got {v}")
        if self.min_accuracy is not None and self.min_accuracy > 100:
            raise ReportError(f"budget min_accuracy: expected a percentage <= 100, got {self.min_accuracy}")

    @property
    def given(self) -> bool:
        return any(
            v is not None for v in (self.max_size_mib, self.min_accuracy, self.max_drop, self.memory_bytes)
        )

    def to_dict(self) -> dict:
        names = ("max_size_mib", "min_accuracy", "max_drop", "memory_bytes", "kv_type")
        return {k: getattr(self, k) for k in names}


def _pct(x: float) -> float:
    return 100.0 * float(x)


def summarize_cell(
    cell: Cell, ref: Cell, evalset: EvalSet, size_bytes: int, n_boot: int, seed: int
) -> dict[str, object]:
    n = len(cell.answers)  # the noise floor may cover only the first questions
    items = evalset.items[:n]
    answers = [it.answer for it in items]
    em = M.exact_match(cell.answers, answers).astype(float)
    em_ref = M.exact_match(ref.answers[:n], answers).astype(float)
    flip = M.flips(ref.answers[:n], cell.answers).astype(float)
    ci = M.bootstrap_mean(em, n_boot, seed)
    drop = M.paired_bootstrap(em_ref, em, n_boot, seed)
    fl = M.bootstrap_mean(flip, n_boot, seed)
    by_type: dict[str, float | None] = {}
    for t in evalset.types:
        mask = np.array([it.qtype == t for it in items])
        by_type[t] = _pct(em[mask].mean()) if mask.any() else None
    by_split: dict[str, dict[str, object]] = {}
    if len(evalset.splits) > 1:  # a set in several parts: each part's exact match and paired change
        for name in evalset.splits:
            mask = np.array([it.split == name for it in items])
            if not mask.any():
                continue
            d = M.paired_bootstrap(em_ref[mask], em[mask], n_boot, seed)
            by_split[name] = {
                "em": _pct(em[mask].mean()),
                "em_change": _pct(d.value),
                "em_change_ci": [_pct(d.low), _pct(d.high)],
                "drop_significant": bool(d.high < 0),
                "questions": int(mask.sum()),
            }
    return {
        "vision": cell.vision,
        "language": cell.language,
        "name": f"{cell.vision} + {cell.language}",
        "reference": cell.is_reference,
        "size_bytes": int(size_bytes),
        "em": _pct(ci.value),
        "em_ci": [_pct(ci.low), _pct(ci.high)],
        "em_change": _pct(drop.value),
        "em_change_ci": [_pct(drop.low), _pct(drop.high)],
        "em_change_significant": drop.excludes_zero(),
        "flip_rate": _pct(fl.value),
        "flip_ci": [_pct(fl.low), _pct(fl.high)],
        "kl": M.summarize(cell.kl),
        "same_top1": _pct(cell.top1.mean()),
        "delta_p": float(cell.dp.mean()),
        "ppl_ratio": M.perplexity_ratio(ref.nll[: len(cell.nll)], cell.nll),
        "by_type": by_type,
        "by_split": by_split,
        "seconds": round(cell.seconds, 3),
        "questions": n,
    }


def summarize_vision(ax: VisionAxis) -> dict[str, object]:
    return {
        "level": ax.level,
        "cosine_mean": float(ax.cosine.mean()),
        "cosine_min": float(ax.cosine.min()),
        "sqnr_db": _finite(ax.sqnr_db),
        "sqnr_db_worst_image": _finite(float(np.min(ax.sqnr_image))),
        "ms_per_image_in_run": ax.ms_per_image,
    }


def _finite(x: float) -> float | None:
    """JSON has no infinity: identical outputs (infinite SQNR) are written as null."""
    return float(x) if math.isfinite(x) else None


def pareto(rows: list[dict]) -> list[str]:
    """Names of the cells no other cell beats on both size (smaller) and exact match (higher)."""
    front = []
    for r in rows:
        dominated = any(
            o["size_bytes"] <= r["size_bytes"]
            and o["em"] >= r["em"]
            and (o["size_bytes"] < r["size_bytes"] or o["em"] > r["em"])
            for o in rows
        )
        if not dominated:
            front.append(r["name"])
    return front


def _describe(row: dict, ref: dict) -> str:
    ratio = ref["size_bytes"] / row["size_bytes"] if row["size_bytes"] else math.nan
    lo, hi = row["em_change_ci"]
    return (
        f"vision {row['vision']} + language {row['language']}: {row['size_bytes'] / MIB:.2f} MiB "
        f"({ratio:.1f}x smaller than the reference's {ref['size_bytes'] / MIB:.2f} MiB), "
        f"exact match {row['em']:.1f}% (95% CI {row['em_ci'][0]:.1f}-{row['em_ci'][1]:.1f}) vs "
        f"{ref['em']:.1f}% for the reference, change {row['em_change']:+.1f} points "
        f"(CI {lo:+.1f} to {hi:+.1f}), answers flipped vs the reference {row['flip_rate']:.1f}%, "
        f"mean KL {row['kl']['mean']:.3g} nats"
    )


def first_drop(row: dict) -> str | None:
    """The first split (in the evaluation set's order) on which the cell is significantly below the
    reference (paired bootstrap, 95%): where the level starts to drop; None if it holds on every one."""
    return next((name for name, s in row.get("by_split", {}).items() if s["drop_significant"]), None)


def split_drops(rows: list[dict]) -> str:
    """One sentence per cell of a set with splits: where it starts to drop, or that it holds."""
    parts = []
    for r in sorted((r for r in rows if not r["reference"]), key=lambda r: -r["size_bytes"]):
        name = first_drop(r)
        if name is None:
            parts.append(f"{r['name']} holds on every split")
        else:
            s = r["by_split"][name]
            lo, hi = s["em_change_ci"]
            change = f"{s['em_change']:+.1f} points, CI {lo:+.1f} to {hi:+.1f}"
            parts.append(f"{r['name']} starts to drop on {name} ({change})")
    return "; ".join(parts)


def pair_peaks(vision: dict, language: dict) -> dict[str, int]:
    """KV type -> predicted low-memory peak of a pair of built files (runtime/memory_plan.py's formula over
    the vision graph with its .onnx.data, the GGUF, and the KV bytes per position its header gives)."""
    per_pos, trained = language.get("kv_bytes_per_position"), language.get("n_ctx_train")
    if not isinstance(per_pos, dict) or set(per_pos) < set(BUDGET_KV_TYPES) or not trained:
        raise ReportError(
            f"language artifact {language.get('level', '?')}: kv_bytes_per_position: expected bytes for "
            f"{', '.join(BUDGET_KV_TYPES)} and n_ctx_train from the GGUF header, got {per_pos!r}, {trained!r}"
        )
    v, lg = vision["file_bytes"], language["file_bytes"]
    return {kv: low_memory_need(v, lg, per_pos[kv], trained) for kv in BUDGET_KV_TYPES}


def unmeasured_pairs(artifacts: dict, measured: set[tuple[str, str]]) -> list[dict]:
    """The (vision, language) pairs whose files were built but which the run did not measure (`--cells
    axes`, or a level the matrix refused), smallest first: never to be read as pairs that failed."""
    va, la = artifacts["vision"], artifacts["language"]
    ok_v = [k for k, a in va.items() if not a.get("error")]
    ok_l = [k for k, a in la.items() if not a.get("error")]
    pairs = [
        {
            "vision": v,
            "language": lg,
            "name": f"{v} + {lg}",
            "size_bytes": va[v]["file_bytes"] + la[lg]["file_bytes"],
            B.PEAK: pair_peaks(va[v], la[lg]),
        }
        for lg in ok_l
        for v in ok_v
        if (v, lg) not in measured
    ]
    return sorted(pairs, key=lambda x: x["size_bytes"])


def _names(pairs: Sequence[dict], most: int = 6, kv_type: str | None = None) -> str:
    def cost(x: dict) -> str:
        if kv_type is None:
            return f"{x['size_bytes'] / MIB:.2f} MiB"
        return f"predicted peak {format_size(B.cell_peak(x, kv_type))}"

    shown = [f"{x['name']} ({cost(x)})" for x in pairs[:most]]
    return ", ".join(shown) + (f" and {len(pairs) - most} more" if len(pairs) > most else "")


def recommend(rows: list[dict], budget: Budget, unmeasured: Sequence[dict] = ()) -> dict[str, object]:
    """The best measured cell under the budget, with the rule that chose it and its numbers.

    Only measured cells are ever chosen. `unmeasured`: built pairs the run did not measure; those that fit
    a size budget are named, so a budget no measured cell meets reads as "not measured", never as "no
    level fits". `ok` is False when no measured cell meets the budget (rendered as a failure).

    Size or memory budget: the lowest exact-match drop that fits (ties: lower mean KL, then smaller;
    memory: the predicted low-memory peak, export/budget.py, the rule the exporters use). Accuracy budget
    alone: the smallest cell that reaches it (ties: higher exact match). No budget: the smallest cell
    whose exact-match change vs the reference is not significant (its 95% CI includes 0 or is above),
    on the whole set and, for a set in splits, on every split. With splits the text also says, for
    every cell, the first split on which it starts to drop (`split_drops`).
    """
    ref = next(r for r in rows if r["reference"])
    with_splits = any(r.get("by_split") for r in rows)
    drops = {r["name"]: first_drop(r) for r in rows if not r["reference"]} if with_splits else {}
    where_drops = f" Where each level starts to drop: {split_drops(rows)}." if with_splits else ""
    ok = list(rows)
    rules = []
    if budget.max_size_mib is not None:
        ok = [r for r in ok if r["size_bytes"] <= budget.max_size_mib * MIB]
        rules.append(f"total size <= {budget.max_size_mib:g} MiB")
    if budget.min_accuracy is not None:
        ok = [r for r in ok if r["em"] >= budget.min_accuracy]
        rules.append(f"exact match >= {budget.min_accuracy:g}%")
    if budget.max_drop is not None:
        ok = [r for r in ok if r["em_change"] >= -budget.max_drop]
        rules.append(f"exact-match drop <= {budget.max_drop:g} points")
    kv = budget.kv_type
    if budget.memory_bytes is not None:
        ok = B.fitting(ok, budget.memory_bytes, kv)
        rules.append(f"predicted low-memory peak (KV {kv}) <= {format_size(budget.memory_bytes)}")
    if not budget.given:
        ok = [r for r in ok if r["em_change_ci"][1] >= 0]
        rules.append("exact match not significantly below the reference (paired bootstrap, 95%)")
        if with_splits:
            ok = [r for r in ok if first_drop(r) is None]
            rules[-1] = rules[-1][:-1] + ", on the whole set and on every split)"

    def not_measured(within: list[dict], where: str) -> str:
        if not within:
            return ""
        n = len(within)
        shown = _names(within, kv_type=kv if budget.memory_bytes is not None else None)
        return (
            f" Not measured ({n} pair{'s' if n != 1 else ''}{where}): {shown}; measure them with "
            "--cells full, or --vision/--language naming them."
        )

    fitting, where = list(unmeasured), ""
    if budget.max_size_mib is not None:
        fitting = [x for x in fitting if x["size_bytes"] <= budget.max_size_mib * MIB]
        where = " within the size budget"
    if budget.memory_bytes is not None:
        fitting = B.fitting(fitting, budget.memory_bytes, kv)
        where = " within the memory budget" if budget.max_size_mib is None else " within the budget"
    if not ok:
        if budget.memory_bytes is not None:  # what a memory budget asks is the peak: name the lowest
            low = B.smallest_peak(rows, kv)
            smallest = (
                f" The smallest predicted low-memory peak (KV {kv}) is {format_size(B.cell_peak(low, kv))}, "
                f"{_describe(low, ref)}."
            )
        else:
            smallest = (
                f" The smallest measured is {_describe(min(rows, key=lambda r: r['size_bytes']), ref)}."
            )
        return {
            "cell": None,
            "ok": False,
            "rule": "; ".join(rules),
            "text": f"No measured pair meets {' and '.join(rules)}."
            + not_measured(fitting, where)
            + smallest
            + where_drops,
            "split_drops": drops,
            "unmeasured_fitting": [x["name"] for x in fitting],
        }
    if budget.max_size_mib is not None or budget.memory_bytes is not None:
        best = B.lowest_drop(ok)
    else:
        best = min(ok, key=lambda r: (r["size_bytes"], -r["em"]))
        # without a size budget, an unmeasured pair matters only if it would be smaller than the choice
        fitting = [x for x in fitting if x["size_bytes"] < best["size_bytes"]]
        where = " smaller than this choice"
    return {
        "cell": best["name"],
        "ok": True,
        "vision": best["vision"],
        "language": best["language"],
        "rule": "; ".join(rules),
        "text": f"Under {' and '.join(rules)}: "
        + _describe(best, ref)
        + (
            f", predicted low-memory peak (KV {kv}) {format_size(B.cell_peak(best, kv))}"
            if budget.memory_bytes is not None
            else ""
        )
        + "."
        + where_drops
        + not_measured(fitting, where),
        "split_drops": drops,
        "unmeasured_fitting": [x["name"] for x in fitting],
    }


def sample_note(rows: list[dict], n: int, matter: float = MATTERS_PTS) -> dict[str, object]:
    """Whether `n` questions can tell the levels apart by `matter` points, in a plain sentence.

    The resolution is the widest paired 95% CI half-width of an exact-match change among the cells, but
    never below what the rule of three allows: a sample in which no answer changed still cannot exclude
    a change rate of 3/n. The questions needed scale the observed width by 1/sqrt(n) and take the rule of
    three's floor, so the estimate is stated only as "about"."""
    widths = [(r["em_change_ci"][1] - r["em_change_ci"][0]) / 2 for r in rows if not r["reference"]]
    widest = max(widths, default=0.0)
    floor = 100.0 * RULE_OF_THREE / n if n else math.inf
    resolution = max(widest, floor)
    need = math.ceil(max(n * (widest / matter) ** 2, 100.0 * RULE_OF_THREE / matter))
    separates = resolution <= matter
    if separates:
        text = (
            f"With {n} questions the 95% CIs of the exact-match changes are at most +/-{resolution:.1f} "
            f"points: fine enough to tell apart the {matter:g}-point differences that matter."
        )
    else:
        why = (
            f"the widest 95% CI of a change here is +/-{widest:.1f} points"
            if widest >= floor
            else f"where no answer changed, the CIs read [0, 0], yet {n} questions cannot exclude a change "
            f"rate of {floor:.1f}% (rule of three)"
        )
        text = (
            f"This sample is too small to separate the levels: with {n} questions, {why}, so differences "
            f"under about {resolution:.1f} points cannot be told apart. Telling apart the {matter:g}-point "
            f"differences that matter needs about {need} questions (--n-images, --splits, --limit)."
        )
    return {
        "questions": n,
        "resolution_pts": resolution,
        "matters_pts": matter,
        "separates": separates,
        "questions_needed": need,
        "text": text,
    }


def worst_examples(result: MatrixResult, evalset: EvalSet, k: int = 8) -> tuple[list[dict], str]:
    """The k worst answers of any level, and which kind they are.

    "wrong": answers that do not match the expected one, those the reference got right first (errors the
    level made), then by the largest mean KL. Where no level answered anything wrongly, "closest": the
    questions whose next-token distributions moved most (largest mean KL), every one answered correctly."""
    ref = result.cells[(REFERENCE_VISION, REFERENCE_LANGUAGE)]
    expected = [M.normalize_answer(it.answer) for it in evalset.items]
    wrong: dict[int, tuple] = {}
    moved: dict[int, tuple] = {}
    for cell in result.cells.values():
        if cell.is_reference:
            continue
        for q, kl in enumerate(cell.kl_question):
            flipped = M.normalize_answer(cell.answers[q]) != M.normalize_answer(ref.answers[q])
            if M.normalize_answer(cell.answers[q]) != expected[q]:
                ref_right = M.normalize_answer(ref.answers[q]) == expected[q]
                key = (ref_right, flipped, float(kl))
                if q not in wrong or key > wrong[q][0]:
                    wrong[q] = (key, cell, flipped, float(kl))
            key = (float(kl),)
            if q not in moved or key > moved[q][0]:
                moved[q] = (key, cell, flipped, float(kl))
    kind, pool = ("wrong", wrong) if wrong else ("closest", moved)
    ranked = sorted(pool.items(), key=lambda kv: kv[1][0], reverse=True)[:k]
    out = []
    for q, (_, cell, flipped, kl) in ranked:
        it = evalset.items[q]
        out.append(
            {
                "index": q,
                "image": it.image,
                "question": it.question,
                "type": it.qtype,
                "expected": it.answer,
                "reference_answer": ref.answers[q],
                "cell": f"{cell.vision} + {cell.language}",
                "answer": cell.answers[q],
                "wrong": kind == "wrong",
                "flipped": flipped,
                "kl_mean": kl,
            }
        )
    return out, kind


def build_document(
    result: MatrixResult,
    evalset: EvalSet,
    artifacts: dict[str, dict[str, dict]],  # "vision"/"language" -> level -> Artifact dict (+ probe)
    budget: Budget,
    settings: dict,
    provenance: dict,
    n_boot: int = 2000,
    seed: int = 0,
    n_examples: int = 8,
) -> dict:
    ref = result.cells.get((REFERENCE_VISION, REFERENCE_LANGUAGE))
    if ref is None:
        raise ReportError("the reference cell fp32 x F32 was not evaluated")
    va, la = artifacts["vision"], artifacts["language"]
    rows = []
    for (v, lang), cell in result.cells.items():
        size = va[v]["file_bytes"] + la[lang]["file_bytes"]
        rows.append(summarize_cell(cell, ref, evalset, size, n_boot, seed))
        rows[-1][B.PEAK] = pair_peaks(va[v], la[lang])
    front = set(pareto(rows))
    for r in rows:
        r["pareto"] = r["name"] in front
    measured = {(r["vision"], r["language"]) for r in rows}
    unmeasured = unmeasured_pairs(artifacts, measured)
    examples, examples_kind = worst_examples(result, evalset, n_examples)
    matter = budget.max_drop if budget.max_drop else MATTERS_PTS
    noise = None
    if result.noise_cell is not None:
        noise = summarize_cell(result.noise_cell, ref, evalset, 0, n_boot, seed)
        noise["vision_axis"] = summarize_vision(result.noise_vision) if result.noise_vision else None
    return {
        "schema": SCHEMA,
        "reference": {"vision": REFERENCE_VISION, "language": REFERENCE_LANGUAGE},
        "settings": settings,
        "provenance": provenance,
        "evalset": {
            "folder": str(evalset.folder),
            "sha256": evalset.sha256,
            "questions": len(evalset.items),
            "images": len(evalset.images),
            "types": evalset.types,
            "splits": evalset.splits,
        },
        "artifacts": artifacts,
        "vision_axis": [summarize_vision(ax) for ax in result.vision.values()],
        "cells": rows,
        "noise_floor": noise,
        "cells_mode": settings.get("cells", "full"),
        "unmeasured": unmeasured,
        "sample": sample_note(rows, next(r["questions"] for r in rows if r["reference"]), matter),
        "recommendation": recommend(rows, budget, unmeasured),
        "budget": budget.to_dict(),
        "examples": examples,
        "examples_kind": examples_kind,
        "answers": {r["name"]: c.answers for r, c in zip(rows, result.cells.values(), strict=True)},
        "seconds": round(result.seconds, 2),
    }
