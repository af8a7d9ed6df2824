"""`tinygptv-edge export-gguf`: the language model as GGUF (default: the shipped model, Q4_0, dist/).

Source flags as on every command (export/checkpoints/source.py): `--model DIR`, or the official files
`--phi2 --eva --blip2 [--stage-ckpt] [--stage-num]`, `--config JSON`, `--template`, `--bos/--no-bos`
(written as `tokenizer.ggml.add_bos_token`). `--memory-budget SIZE [--report PATH]` instead of `--level`:
the language level of the pair `make report` measured best that fits (export/budget.py; export-onnx
picks the vision level of the same pair), with an importance matrix from `--imatrix-images`, else the
calibration images export-onnx draws into OUT/calib-images, when that level was measured with one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    from tinygptv_edge.export.budget import add_budget_args
    from tinygptv_edge.export.checkpoints.source import add_source_args
    from tinygptv_edge.export.gguf.quant import DEFAULT_LEVEL, LEVELS
    from tinygptv_edge.runtime.contract import LANGUAGE_FILE

    p = sub.add_parser("export-gguf", help="write the language model (LoRA merged) as a GGUF file")
    p.add_argument(
        "--level", "-q", choices=list(LEVELS), help=f"quantization level (default {DEFAULT_LEVEL})"
    )
    p.add_argument(
        "--out", default="dist", help=f"output folder (file {LANGUAGE_FILE}) or a path ending in .gguf"
    )
    add_source_args(p)
    p.add_argument("--threads", type=int, help="quantizer threads (default: CPU count, at most 16)")
    p.add_argument("--pure", action="store_true", help="every weight at the level's type (no mix rules)")
    im = p.add_argument_group("importance matrix (quantized levels)")
    im.add_argument("--imatrix-images", help="folder of calibration images")
    im.add_argument(
        "--imatrix-questions",
        help="text file, one question per line (default: a few generic questions)",
    )
    im.add_argument("--answer-tokens", type=int, default=0, help="greedy answer tokens also counted")
    im.add_argument("--imatrix-out", help="also save the collected importance matrix (.npz)")
    im.add_argument("--imatrix", help="use a saved importance matrix (.npz) instead of collecting one")
    add_budget_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinygptv_edge.export.budget import choice_from_args, language_level
    from tinygptv_edge.export.checkpoints.source import spec_from_args
    from tinygptv_edge.export.gguf.export import export_source
    from tinygptv_edge.export.gguf.quant import DEFAULT_LEVEL, get_level
    from tinygptv_edge.runtime.contract import LANGUAGE_FILE
    from tinygptv_edge.runtime.errors import ConfigError

    choice = choice_from_args(args)
    with_imatrix = False
    if choice is not None:
        if args.level is not None:
            raise ConfigError(
                f"--level {args.level} and --memory-budget: expected one of them (the budget picks the "
                "level from the report), got both"
            )
        name, with_imatrix = language_level(choice.language)
        print(choice.describe())
    level = get_level(name if choice is not None else args.level or DEFAULT_LEVEL)
    if with_imatrix and not (args.imatrix or args.imatrix_images):
        from tinygptv_edge.export.onnx.cli import DEFAULT_CALIB_IMAGES, default_calibration_folder

        folder = Path(args.out).parent if Path(args.out).suffix == ".gguf" else Path(args.out)
        folder = default_calibration_folder(folder, DEFAULT_CALIB_IMAGES)
        args.imatrix_images = str(folder)
        print(f"  {choice.language} was measured with an importance matrix: collecting one on {folder}")
    spec = spec_from_args(args)
    out = Path(args.out)
    if out.suffix != ".gguf":
        out = out / LANGUAGE_FILE.format(ftype=level.name.lower())
    t0 = time.perf_counter()
    src, loaded = spec.language(need_model=bool(args.imatrix_images) and not args.imatrix)
    print(loaded.summary.format() if loaded else f"streaming the language tensors of {src.label}")
    imatrix = None
    if args.imatrix:
        from tinygptv_edge.export.gguf.imatrix import Imatrix

        imatrix = Imatrix.load(args.imatrix)
    elif args.imatrix_images:
        imatrix = _collect(args, loaded.model, src.tokenizer)
        if args.imatrix_out:
            imatrix.save(args.imatrix_out)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase) or bars.setdefault(phase, tqdm(total=total, desc=phase, unit="tensor"))
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    try:
        report = export_source(
            src, out, level.name, imatrix=imatrix, pure=args.pure, progress=progress, threads=args.threads
        )
    finally:
        for bar in bars.values():
            bar.close()
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report.type_counts().items()))
    print(f"wrote {report.path} ({report.nbytes / 2**20:.1f} MiB, {level.name}: {counts})")
    for t in report.fallbacks:
        print(f"  {t.name}: rows of {t.shape[-1]} do not fit {t.wanted.name}, wrote {t.qtype.name}")
    if imatrix is not None:
        print(f"  importance matrix: {len(imatrix.values)} weights from {imatrix.chunks} calibration pair(s)")
    print(f"  BOS before the first turn (tokenizer.ggml.add_bos_token): {src.cfg.prompt.add_bos}")
    print(f"verified every tensor; {time.perf_counter() - t0:.1f} s")
    return 0


def _collect(args: argparse.Namespace, model, tokenizer):
    """Importance matrix from calibration images (read as every consumer reads them: calib_data ->
    runtime/vision/images.py, upright RGB) paired with questions."""
    from tinygptv_edge.export.gguf.imatrix import DEFAULT_QUESTIONS, collect_imatrix
    from tinygptv_edge.export.onnx.calib_data import list_images, load_image
    from tinygptv_edge.runtime.errors import ConfigError
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    folder = Path(args.imatrix_images)
    images = list_images(folder)
    questions = DEFAULT_QUESTIONS
    if args.imatrix_questions:
        questions = tuple(
            q.strip() for q in Path(args.imatrix_questions).read_text().splitlines() if q.strip()
        )
        if not questions:
            raise ConfigError(f"no questions in {args.imatrix_questions}")
    cfg = model.cfg.preprocess

    def pairs():
        for i, path in enumerate(images):
            yield preprocess(load_image(path), cfg), questions[i % len(questions)]

    bar = tqdm(total=len(images), desc="imatrix", unit="pair")
    try:
        return collect_imatrix(
            model, tokenizer, pairs(), args.answer_tokens, str(folder), progress=lambda n: bar.update(1)
        )
    finally:
        bar.close()
