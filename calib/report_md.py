"""The report document as Markdown tables (also reused, as rows, by the HTML page)."""

from __future__ import annotations

from .levels import REFERENCE_LANGUAGE, REFERENCE_VISION

MIB = 2**20


def _f(x, fmt: str = ".3f", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, float) and x != x:  # NaN
        return none
    return format(x, fmt)


def _ci(lo: float, hi: float, fmt: str = ".1f") -> str:
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


def _cost(doc: dict, half: str, level: str) -> dict:
    return doc["artifacts"][half].get(level, {})


NOT_MEASURED = "not measured"


def speed(probe: dict, key: str, fmt: str) -> str:
    """A probe figure as "median [min-max]" over its runs; a figure from one run is not shown."""
    v = probe.get(key)
    if v is None:
        return "-"
    runs, rng = probe.get("runs", 1), probe.get("range", {}).get(key)
    if runs < 2 or not rng:
        return "1 run: not shown"
    return f"{v:{fmt}} [{rng[0]:{fmt}}-{rng[1]:{fmt}}]"


def probe_runs(doc: dict) -> int | None:
    """How many runs the probes took (None when no probe ran)."""
    runs = [
        a["probe"].get("runs", 1)
        for half in ("vision", "language")
        for a in doc["artifacts"][half].values()
        if isinstance(a.get("probe"), dict) and "error" not in a["probe"]
    ]
    return min(runs) if runs else None


def speed_note(doc: dict) -> str:
    runs = probe_runs(doc)
    if runs is None:
        return "Speeds and peak RSS: not measured (--no-probe)."
    if runs < 2:
        return (
            "Speeds: one run per level, not shown (a single run is no figure; --probe-runs 3, or "
            "`tinygptv-edge bench` for this machine's speed)."
        )
    return (
        f"Speeds and peak RSS: median [min-max] of {runs} runs per level, each in a fresh process, on the "
        f"machine that made the report (`tinygptv-edge bench` measures speed in depth)."
    )


def mode_note(doc: dict) -> str:
    """Which cells were measured: the cell mode and the built pairs left unmeasured, by name."""
    mode, missing = doc.get("cells_mode", "full"), doc.get("unmeasured", [])
    n = len(doc["cells"])
    if mode == "axes":
        head = (
            f"Cells: axes mode: only the fp32 vision row and the F32 language column were measured "
            f"({n} cells)."
        )
    else:
        head = f"Cells: full cross matrix ({n} cells measured)."
    if missing:
        names = ", ".join(x["name"] for x in missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        pairs = f"{len(missing)} built pairs were" if len(missing) != 1 else "1 built pair was"
        head += f" {pairs} not measured (marked '{NOT_MEASURED}', not failed): {names}."
    return head


def language_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    head = [
        "language", "MiB", "bits/weight", "KL mean", "KL median", "KL p99", "KL max", "same top-1 %",
        "delta p(ref)", "PPL ratio", "EM % [95% CI]", "EM change pts [CI]", "flips %",
        "prefill tok/s", "decode tok/s", "peak RSS MiB",
    ]  # fmt: skip
    rows = []
    for r in doc["cells"]:
        if r["vision"] != REFERENCE_VISION:
            continue
        a = _cost(doc, "language", r["language"])
        p = a.get("probe", {})
        rows.append(
            [
                r["language"] + (" (reference)" if r["reference"] else ""),
                _f(a.get("file_bytes", 0) / MIB, ".2f"),
                _f(a.get("bpw"), ".2f"),
                _f(r["kl"]["mean"], ".3g"),
                _f(r["kl"]["median"], ".3g"),
                _f(r["kl"]["p99"], ".3g"),
                _f(r["kl"]["max"], ".3g"),
                _f(r["same_top1"], ".1f"),
                _f(r["delta_p"], "+.2e"),
                _f(r["ppl_ratio"], ".5f"),
                f"{r['em']:.1f} {_ci(*r['em_ci'])}",
                f"{r['em_change']:+.1f} {_ci(*r['em_change_ci'], '+.1f')}",
                _f(r["flip_rate"], ".1f"),
                speed(p, "prefill_tok_s", ".0f"),
                speed(p, "decode_tok_s", ".1f"),
                speed(p, "peak_rss_mib", ".0f"),
            ]
        )
    return head, rows


def vision_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    head = [
        "vision", "MiB", "bits/weight", "cosine mean", "cosine min", "SQNR dB", "worst image SQNR dB",
        "KL mean (end to end)", "EM % [95% CI]", "flips %", "ms/image", "peak RSS MiB", "note",
    ]  # fmt: skip
    cells = {r["vision"]: r for r in doc["cells"] if r["language"] == REFERENCE_LANGUAGE}
    rows = []
    for ax in doc["vision_axis"]:
        a = _cost(doc, "vision", ax["level"])
        p, r = a.get("probe", {}), cells.get(ax["level"])
        rows.append(
            [
                ax["level"] + (" (reference)" if ax["level"] == REFERENCE_VISION else ""),
                _f(a.get("file_bytes", 0) / MIB, ".2f"),
                _f(a.get("bpw"), ".2f"),
                _f(ax["cosine_mean"], ".5f"),
                _f(ax["cosine_min"], ".5f"),
                _f(ax["sqnr_db"], ".1f", "inf"),
                _f(ax["sqnr_db_worst_image"], ".1f", "inf"),
                _f(r["kl"]["mean"], ".3g") if r else "-",
                f"{r['em']:.1f} {_ci(*r['em_ci'])}" if r else "-",
                _f(r["flip_rate"], ".1f") if r else "-",
                speed(p, "ms_per_image", ".1f"),
                speed(p, "peak_rss_mib", ".0f"),
                a.get("note", "") or "",
            ]
        )
    return head, rows


def matrix_rows(doc: dict, key: str = "em") -> tuple[list[str], list[list[str]]]:
    """Rows: vision levels; columns: language levels; values: `key` (em or flip_rate) in %."""
    vis = list(dict.fromkeys(r["vision"] for r in doc["cells"]))
    lang = list(dict.fromkeys(r["language"] for r in doc["cells"]))
    by = {(r["vision"], r["language"]): r for r in doc["cells"]}
    missing = {(x["vision"], x["language"]) for x in doc.get("unmeasured", [])}
    rows = []
    for v in vis:
        row = [v]
        for lg in lang:
            r = by.get((v, lg))
            mark = "*" if r and r["pareto"] else ""
            row.append(f"{r[key]:.1f}{mark}" if r else NOT_MEASURED if (v, lg) in missing else "failed")
        rows.append(row)
    return ["vision \\ language", *lang], rows


def peak_kv(doc: dict) -> str:
    return (doc.get("budget") or {}).get("kv_type") or "f16"


def peak_title(doc: dict) -> str:
    memory = (doc.get("budget") or {}).get("memory_bytes")
    over = f"; over = above the memory budget of {memory / MIB:.0f} MiB" if memory else ""
    return (
        f"Predicted low-memory peak, MiB per cell (KV {peak_kv(doc)}: max(vision file, language file + KV "
        f"cache at the low-memory allocation) + margin, runtime/memory_plan.py{over})"
    )


def peak_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Rows: vision levels; columns: language levels; values: the predicted low-memory peak (MiB) with the
    budget's KV type, for measured cells and built pairs left unmeasured alike."""
    kv = peak_kv(doc)
    memory = (doc.get("budget") or {}).get("memory_bytes")
    pairs = {(r["vision"], r["language"]): (r, "") for r in doc["cells"]}
    for x in doc.get("unmeasured", []):
        pairs[(x["vision"], x["language"])] = (x, f" ({NOT_MEASURED})")
    vis = list(dict.fromkeys(v for v, _ in pairs))
    lang = list(dict.fromkeys(lg for _, lg in pairs))
    rows = []
    for v in vis:
        row = [v]
        for lg in lang:
            r, tag = pairs.get((v, lg), (None, ""))
            peak = (r or {}).get("low_memory_peak_bytes", {}).get(kv)
            if peak is None:
                row.append("failed" if r is None else "-")
                continue
            row.append(f"{peak / MIB:.0f}{' over' if memory and peak > memory else ''}{tag}")
        rows.append(row)
    return ["vision \\ language", *lang], rows


def type_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    types = doc["evalset"]["types"]
    rows = [
        [r["name"], *(f"{r['by_type'][t]:.1f}" for t in types)]
        for r in doc["cells"]
        if r["pareto"] or r["reference"]
    ]
    return ["cell (reference + Pareto front)", *types], rows


def split_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Exact match % per split (change vs the reference in points; ! = significant drop)."""
    splits = doc["evalset"].get("splits", [])
    if len(splits) < 2:
        return [], []
    rows = []
    for r in doc["cells"]:
        by = r.get("by_split", {})
        cells = []
        for name in splits:
            s = by.get(name)
            mark = "!" if s and s["drop_significant"] else ""
            cells.append(f"{s['em']:.1f} ({s['em_change']:+.1f}{mark})" if s else "")
        rows.append([r["name"], *cells])
    return ["cell", *splits], rows


def noise_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    n = doc.get("noise_floor")
    if not n:
        return [], []
    ax = n.get("vision_axis") or {}
    head = ["run", "embedding cosine min", "SQNR dB", "KL mean", "KL max", "same top-1 %", "flips %"]
    row = [
        f"reference again: {n['vision']} + {n['language']}, first {n.get('questions', 'all')} questions",
        _f(ax.get("cosine_min"), ".6f"),
        _f(ax.get("sqnr_db"), ".1f", "inf (identical)"),
        _f(n["kl"]["mean"], ".2e"),
        _f(n["kl"]["max"], ".2e"),
        _f(n["same_top1"], ".1f"),
        _f(n["flip_rate"], ".1f"),
    ]
    return head, [row]


def failed_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Levels whose export failed: named with the error, never silently left out."""
    rows = [
        [half, level, a["error"]]
        for half in ("vision", "language")
        for level, a in doc["artifacts"][half].items()
        if a.get("error")
    ]
    return (["half", "level", "error"], rows) if rows else ([], [])


def table(head: list[str], rows: list[list[str]]) -> str:
    if not head:
        return ""
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines) + "\n"


def budget_met(doc: dict) -> bool:
    """False when no measured cell meets the budget: rendered as a failure, never as advice."""
    rec = doc["recommendation"]
    return bool(rec.get("ok", rec.get("cell") is not None))


def examples_title(doc: dict) -> str:
    if doc.get("examples_kind") == "closest":
        return (
            "No level answered a question wrongly: shown are the questions whose answers moved most "
            "(largest mean KL vs the reference), every one answered correctly."
        )
    return (
        "Wrong answers of any level: those the reference answered correctly first, then by the largest "
        "mean KL vs the reference."
    )


def render_markdown(doc: dict) -> str:
    e, s, p = doc["evalset"], doc["settings"], doc["provenance"]
    out = [
        "# TinyGPT-V edge: accuracy drop per quantization level\n",
        f"Reference: vision **{REFERENCE_VISION}** (ONNX) + language **{REFERENCE_LANGUAGE}** (GGUF). "
        f"Evaluation set: {e['questions']} questions on {e['images']} images ({', '.join(e['types'])}), "
        f"`{e['folder']}` (sha256 {e['sha256'][:16]}). Greedy answers, at most {s['max_new_tokens']} "
        f"tokens; KL is over the reference answer's tokens, teacher-forced with the image as prefix. "
        f"CIs: paired bootstrap, {s['n_boot']} resamples, seed {s['seed']}. Threads: {s['threads']} "
        f"(speed probes: {s.get('probe_threads', '-')}, each level in its own process).\n",
        mode_note(doc) + "\n",
        *([doc["sample"]["text"] + "\n"] if doc.get("sample") else []),
        "## Recommendation\n",
        ("" if budget_met(doc) else "**Budget not met.** ") + doc["recommendation"]["text"] + "\n",
        "## Language levels (vision fp32)\n",
        table(*language_rows(doc)),
        speed_note(doc) + "\n",
        "## Vision levels (language F32)\n",
        table(*vision_rows(doc)),
        "## End task: exact match % per cell (* = on the size/accuracy Pareto front)\n",
        table(*matrix_rows(doc, "em")),
        *([f"## {peak_title(doc)}\n", table(*peak_rows(doc))] if doc.get("schema", 0) >= 3 else []),
        "## Answers flipped vs the reference, % per cell\n",
        table(*matrix_rows(doc, "flip_rate")),
        "## Exact match % per question type\n",
        table(*type_rows(doc)),
        *(
            [
                "## Exact match % per evaluation split (change vs the reference, points; "
                "! = significant drop)\n",
                table(*split_rows(doc)),
            ]
            if split_rows(doc)[0]
            else []
        ),
        "## Levels that could not be built\n",
        table(*failed_rows(doc)) or "none\n",
        "## Noise floor\n",
        table(*noise_rows(doc)) or "not measured\n",
        "## Worst examples\n",
        examples_title(doc) + "\n",
        table(
            ["question", "type", "expected", "reference says", "level", "level says", "right?", "KL mean"],
            [
                [
                    x["question"],
                    x["type"],
                    x["expected"],
                    x["reference_answer"],
                    x["cell"],
                    x["answer"],
                    "no" if x.get("wrong") else "yes",
                    f"{x['kl_mean']:.4f}",
                ]
                for x in doc["examples"]
            ],
        ),  # fmt: skip
        "## Provenance\n",
        table(["item", "value"], [[k, str(v)] for k, v in p.items()]),
    ]
    return "\n".join(out)
