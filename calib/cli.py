"""`tinygptv-edge report`: accuracy drop per quantization level (JSON, Markdown, one HTML page).

Default: the shipped model, its synthetic VQA evaluation splits (test, test-phrasing, test-layout,
test-camera), every vision level x every language level,
written to dist/report/. `--vision` / `--language` / `--cells axes` / `--limit` shrink the run;
`--max-size-mib`, `--min-accuracy`, `--max-drop`, `--memory-budget` (+ `--kv-type`) set the budget the
recommendation must meet.
"""

from __future__ import annotations

import argparse
import json
import time

from tqdm import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    from tinygptv_edge.export.checkpoints.source import add_source_args
    from tinygptv_edge.runtime.memory_plan import BUDGET_KV_TYPES, SIZE_HELP

    from .levels import LANGUAGE_LEVELS, VISION_LEVELS

    p = sub.add_parser("report", help="measure the accuracy drop of every quantization level")
    p.add_argument("--out", default="dist/report", help="output folder (default: dist/report)")
    p.add_argument("--eval-dir", help="evaluation folder: questions.jsonl + images (default: VQA test split)")
    p.add_argument("--n-images", type=int, default=40, help="VQA images per split when no --eval-dir")
    p.add_argument(
        "--splits",
        default="test,test-phrasing,test-layout,test-camera",
        help="comma-separated VQA evaluation splits when no --eval-dir (export/train/vqa.py EVAL_SPLITS)",
    )
    p.add_argument("--limit", type=int, help="evaluate the first N questions only")
    p.add_argument("--vision", help=f"comma-separated vision levels (default all: {','.join(VISION_LEVELS)})")
    p.add_argument(
        "--language", help=f"comma-separated language levels (default all: {','.join(LANGUAGE_LEVELS)})"
    )
    p.add_argument("--cells", choices=["full", "axes"], default="full",
                   help="full cross matrix, or only the fp32 row and the F32 column")  # fmt: skip
    p.add_argument("--calib-images", help="calibration image folder (default: VQA calibration split)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration images (INT8 ranges, imatrix)")
    p.add_argument("--preset", default="x86-vnni", help="INT8 preset (export/onnx/presets.py)")
    p.add_argument("--threads", type=int, default=1, help="evaluation threads (default 1)")
    p.add_argument("--probe-threads", type=int, default=2, help="threads of the speed probes (default 2)")
    p.add_argument("--probe-runs", type=int, default=3,
                   help="fresh-process runs per probe: median [min-max] (default 3)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-noise-floor", action="store_true", help="skip the 1-thread re-run of the reference")
    p.add_argument("--no-probe", action="store_true", help="skip the speed / peak-RSS probes")
    p.add_argument("--render-only", action="store_true", help="re-render OUT/report.json (no measuring)")
    bm = p.add_argument_group("the paper's data sets (docs/paper-sets.md); --limit applies to each")
    bm.add_argument(
        "--paper-set",
        action="append",
        metavar="NAME=PATH",
        help="data set files as released: gqa, vsr, iconqa, vizwiz, hateful_memes, vqav2, textvqa",
    )
    bm.add_argument("--paper-images", action="append", metavar="NAME=DIR", help="a paper set's image folder")
    bm.add_argument(
        "--paper-prompt",
        action="append",
        metavar="NAME=TEXT",
        help="a paper set's prompt, with {question} (default: TinyGPT-V's evaluation prompt)",
    )
    bm.add_argument("--sample", type=int, help="evaluate N items drawn at random (--seed) per paper set")
    bm.add_argument("--shard-size", type=int, default=64, help="items per task (default 64)")
    bm.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the tasks on a Ray cluster (a local one when no ADDRESS)",
    )
    bm.add_argument("--retries", type=int, default=2, help="Ray: re-runs of a failed task (default 2)")
    bm.add_argument(
        "--ray-ship-models",
        action="store_true",
        help="Ray: send the model files through the object store (no shared path needed)",
    )
    b = p.add_argument_group("budget for the recommendation")
    b.add_argument("--max-size-mib", type=float, help="total size (vision + language) at most")
    b.add_argument("--min-accuracy", type=float, help="exact match %% at least")
    b.add_argument("--max-drop", type=float, help="exact-match drop vs the reference, points, at most")
    b.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help=f"predicted low-memory peak at most (the lowest measured drop that fits); {SIZE_HELP}",
    )
    b.add_argument(
        "--kv-type",
        choices=BUDGET_KV_TYPES,
        default="f16",
        help="the KV cache type --memory-budget is priced with (as `run --kv-type`; default f16)",
    )
    add_source_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinygptv_edge.export.checkpoints.source import spec_from_args
    from tinygptv_edge.export.staging import check_writable
    from tinygptv_edge.runtime.memory_plan import parse_size

    from .report import Budget
    from .report_run import ReportConfig, make_report

    memory = None if args.memory_budget is None else parse_size(args.memory_budget, "--memory-budget")
    cfg = ReportConfig(
        out=args.out,
        source=spec_from_args(args),
        eval_dir=args.eval_dir,
        n_images=args.n_images,
        splits=args.splits,
        limit=args.limit,
        vision=args.vision,
        language=args.language,
        cells=args.cells,
        calib_images=args.calib_images,
        n_calib=args.n_calib,
        preset=args.preset,
        threads=args.threads,
        probe_threads=args.probe_threads,
        probe_runs=args.probe_runs,
        max_new_tokens=args.max_new_tokens,
        n_boot=args.n_boot,
        seed=args.seed,
        noise_floor=not args.no_noise_floor,
        probe=not args.no_probe,
        budget=Budget(args.max_size_mib, args.min_accuracy, args.max_drop, memory, args.kv_type),
    )
    bars: dict[str, tqdm] = {}

    def progress(what: str, done: int, total: int) -> None:
        bar = bars.get(what) or bars.setdefault(what, tqdm(total=total, desc=what, unit="step"))
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    check_writable(cfg.out)  # a read-only or impossible --out fails now, not after the measurements
    t0 = time.perf_counter()
    if getattr(args, "paper_set", None):
        return _paper_report(cfg, args, progress, bars, t0)
    if args.render_only:
        return _render_only(cfg)
    try:
        paths = make_report(cfg, progress)
    finally:
        for bar in bars.values():
            bar.close()
    doc = json.loads(paths["report.json"].read_text())
    print(doc["recommendation"]["text"])
    for p in paths.values():
        print(f"wrote {p}")
    print(f"{len(doc['cells'])} cells in {time.perf_counter() - t0:.0f} s")
    return 0


def _render_only(cfg) -> int:
    from pathlib import Path

    from tinygptv_edge.runtime.errors import ReportError

    from .report import MATTERS_PTS, recommend, sample_note
    from .report_run import write_outputs

    src = Path(cfg.out) / "report.json"
    if not src.is_file():
        raise ReportError(f"--render-only: expected {src} from an earlier run, found none")
    doc = json.loads(src.read_text())
    if cfg.budget.memory_bytes is not None:
        from tinygptv_edge.export.budget import read_report

        read_report(src)  # an older report has no predicted peaks: say to measure again
    # a new budget applies at once, to the measured cells only
    doc["recommendation"] = recommend(doc["cells"], cfg.budget, doc.get("unmeasured", []))
    n = next(r["questions"] for r in doc["cells"] if r["reference"])
    doc["sample"] = sample_note(doc["cells"], n, cfg.budget.max_drop or MATTERS_PTS)
    doc["budget"] = cfg.budget.to_dict()
    for p in write_outputs(doc, cfg.out).values():
        print(f"wrote {p}")
    print(doc["recommendation"]["text"])
    return 0


def _paper_report(cfg, args, progress, bars, t0) -> int:
    from .paper_report import PaperReportConfig, make_paper_report
    from .paper_sets import parse_paper_args

    pc = PaperReportConfig(
        sets=parse_paper_args(args.paper_set),
        images=parse_paper_args(args.paper_images),
        limit=args.limit,
        sample=args.sample,
        shard_size=args.shard_size,
        ray=args.ray,
        retries=args.retries,
        ship_models=args.ray_ship_models,
        prompts=parse_paper_args(args.paper_prompt, strip=False),
    )
    try:
        paths = make_paper_report(cfg, pc, progress)
    finally:
        for bar in bars.values():
            bar.close()
    print(paths["paper-sets.md"].read_text().split("\n## ")[0].rstrip())
    for p in paths.values():
        print(f"wrote {p}")
    print(f"paper sets in {time.perf_counter() - t0:.0f} s")
    return 0
