"""A memory budget the user states (`--memory-budget 1.5G`): which measured pair of levels fits it.

    report.json (make report): cells, each with its measured exact-match change and its predicted
    low-memory peak per KV type (runtime/memory_plan.py's formula over the cell's real files)
        --fitting--> the cells whose peak <= budget --lowest_drop--> the pair to ship

One rule for everyone: `report --memory-budget` (calib/report.py `recommend`) and `export-onnx` /
`export-gguf --memory-budget --report` (`pick_for_memory`), so both exporters pick the same pair from
the same report and the report says which one they will pick. Only measured cells are chosen; the
report's data decides, never an estimate of accuracy.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tinygptv_edge.runtime.errors import ConfigError, ReportError
from tinygptv_edge.runtime.memory_plan import BUDGET_KV_TYPES, SIZE_HELP, format_size, parse_size

DEFAULT_REPORT = "dist/report/report.json"
PEAKS_SCHEMA = 3  # the first report.json schema whose cells carry `low_memory_peak_bytes`
PEAK = "low_memory_peak_bytes"


def cell_peak(row: dict, kv_type: str) -> int:
    """The predicted low-memory peak of a report cell (or unmeasured pair) with KV cache `kv_type`."""
    peaks = row.get(PEAK)
    if not isinstance(peaks, dict) or not isinstance(peaks.get(kv_type), int):
        raise ReportError(
            f"report cell {row.get('name', '?')}: {PEAK}.{kv_type}: expected bytes (an integer), "
            f"got {None if not isinstance(peaks, dict) else peaks.get(kv_type)!r}"
        )
    return peaks[kv_type]


def fitting(rows: Sequence[dict], memory_bytes: int, kv_type: str) -> list[dict]:
    """The rows whose predicted low-memory peak fits `memory_bytes`."""
    return [r for r in rows if cell_peak(r, kv_type) <= memory_bytes]


def lowest_drop(rows: Sequence[dict]) -> dict:
    """The row with the lowest measured exact-match drop vs the reference; ties: lower mean KL, then
    the smaller pair."""
    return max(rows, key=lambda r: (r["em_change"], -r["kl"]["mean"], -r["size_bytes"]))


def smallest_peak(rows: Sequence[dict], kv_type: str) -> dict:
    return min(rows, key=lambda r: (cell_peak(r, kv_type), r["size_bytes"]))


def read_report(path: str | Path) -> dict:
    """report.json with predicted peaks, or a ReportError that says to run `make report`."""
    path = Path(path)
    how = "run `make report` (or `tinygptv-edge report`) to measure the levels first"
    if not path.is_file():
        raise ReportError(
            f"--report {path}: expected the report.json `make report` writes, found none; {how}"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"--report {path}: expected a report.json, could not read it ({e}); {how}") from e
    schema = doc.get("schema") if isinstance(doc, dict) else None
    cells = doc.get("cells") if isinstance(doc, dict) else None
    if not isinstance(schema, int) or schema < PEAKS_SCHEMA or not isinstance(cells, list) or not cells:
        raise ReportError(
            f"--report {path}: schema: expected {PEAKS_SCHEMA} or later (cells with predicted low-memory "
            f"peaks), got {schema!r}: an older report; {how}"
        )
    return doc


def pick_for_memory(doc: dict, memory_bytes: int, kv_type: str = "f16", source: str = "report") -> dict:
    """The measured cell of `doc` the budget picks (the same as `report --memory-budget` recommends),
    or a ReportError naming the smallest predicted peak when no measured cell fits."""
    if kv_type not in BUDGET_KV_TYPES:
        raise ConfigError(f"--kv-type: expected one of {', '.join(BUDGET_KV_TYPES)}, got {kv_type!r}")
    rows = doc["cells"]
    ok = fitting(rows, memory_bytes, kv_type)
    if not ok:
        low = smallest_peak(rows, kv_type)
        raise ReportError(
            f"--memory-budget {format_size(memory_bytes)}: no measured pair of {source} fits (KV "
            f"{kv_type}); the smallest predicted low-memory peak is {low['name']}'s, "
            f"{format_size(cell_peak(low, kv_type))}"
        )
    return lowest_drop(ok)


# -- the exporters' flags and their choice -----------------------------------------------------------


def add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory budget: the pair `make report` measured best that fits (docs/report.md)")
    g.add_argument("--memory-budget", metavar="SIZE", help=f"export the level of that pair; {SIZE_HELP}")
    g.add_argument(
        "--report", default=DEFAULT_REPORT, help=f"the report to pick from (default {DEFAULT_REPORT})"
    )
    g.add_argument(
        "--kv-type",
        choices=BUDGET_KV_TYPES,
        default="f16",
        help="the KV cache type the budget is priced with (as `run --kv-type`; default f16)",
    )


@dataclass(frozen=True)
class BudgetChoice:
    vision: str  # report level names, e.g. int8-minmax, Q4_K_M+imat
    language: str
    peak_bytes: int
    memory_bytes: int
    kv_type: str
    report: str

    def describe(self) -> str:
        return (
            f"memory budget {format_size(self.memory_bytes)} (KV {self.kv_type}): {self.report} picks vision "
            f"{self.vision} + language {self.language}, predicted low-memory peak "
            f"{format_size(self.peak_bytes)}"
        )


def choice_from_args(args: argparse.Namespace) -> BudgetChoice | None:
    """The pair `--memory-budget` picks from `--report`, or None without a budget."""
    if args.memory_budget is None:
        return None
    memory = parse_size(args.memory_budget, "--memory-budget")
    doc = read_report(args.report)
    best = pick_for_memory(doc, memory, args.kv_type, f"--report {args.report}")
    return BudgetChoice(
        best["vision"],
        best["language"],
        cell_peak(best, args.kv_type),
        memory,
        args.kv_type,
        str(args.report),
    )


def language_level(name: str) -> tuple[str, bool]:
    """A report language level (`Q4_K_M`, `Q4_K_M+imat`) as (export-gguf level, with an importance matrix)."""
    from tinygptv_edge.export.gguf.quant import LEVELS

    base, _, extra = name.partition("+")
    if base not in LEVELS or extra not in ("", "imat"):
        raise ReportError(
            f"report language level: expected one of {', '.join(LEVELS)} (optionally +imat), got {name!r}"
        )
    return base, extra == "imat"


def vision_level(name: str) -> tuple[str, str]:
    """A report vision level as (kind, calibration method): fp32, int8-<method>, int8-dynamic, int4."""
    from tinygptv_edge.export.onnx.presets import CALIBRATION_METHODS

    if name in ("fp32", "int4"):
        return name, ""
    if name == "int8-dynamic":
        return "dynamic", ""
    method = name.removeprefix("int8-")
    if name.startswith("int8-") and method in CALIBRATION_METHODS:
        return "static", method
    raise ReportError(
        "report vision level: expected fp32, int8-dynamic, int4 or int8-<method> with a method from "
        f"{', '.join(CALIBRATION_METHODS)}, got {name!r}"
    )
