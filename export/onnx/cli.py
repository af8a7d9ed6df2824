"""`tinygptv-edge export-onnx`: the vision graph as FP32 ONNX, then INT8 calibrated on images.

Source (export/checkpoints/source.py, the same flags on every command): `--model DIR` (the project's
single checkpoint), or the official files (`--phi2 --eva --blip2 [--stage-ckpt] [--stage-num]`), or
nothing: the shipped default model; `--config JSON` for other sizes. Output in `--out` (default `dist/`):
vision.fp32.onnx, vision.int8.onnx (+ vision.int4.onnx with --int4, vision.int8-dynamic.onnx with
--dynamic, SQNR tables and the held-out report with --diagnostics). Calibration images: `--calib-images
DIR`, or by default images drawn by the synthetic VQA generator (`export/train/vqa.py`) into
OUT/calib-images. The gate runs on held-out images: `--check-images DIR`, or else the last quarter
(at most 8) of the calibration images, which are then not calibrated on. `--memory-budget SIZE
[--report PATH]`: the vision level of the pair `make report` measured best that fits (export/budget.py;
export-gguf picks the language level of the same pair): FP32 alone, INT8 with that calibration method,
dynamic INT8 or INT4, instead of `--no-int8` / `--method` / `--dynamic` / `--int4`.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

DEFAULT_CALIB_IMAGES = 32


def register(sub: argparse._SubParsersAction) -> None:
    from tinygptv_edge.export.budget import add_budget_args
    from tinygptv_edge.export.checkpoints.source import add_source_args
    from tinygptv_edge.export.onnx.presets import CALIBRATION_METHODS, PRESETS

    p = sub.add_parser("export-onnx", help="export the vision graph to ONNX (FP32 + INT8)")
    add_source_args(p)
    p.add_argument("--out", default="dist", help="output folder (default: dist)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--atol", type=float, default=1e-4, help="parity: max |onnx - torch| allowed")
    p.add_argument("--parity-cosine", type=float, default=0.99999, help="parity: minimum cosine")
    q = p.add_argument_group("INT8")
    q.add_argument("--no-int8", action="store_true", help="write the FP32 graph only")
    q.add_argument("--calib-images", help="folder of calibration images (default: synthetic VQA images)")
    q.add_argument(
        "--n-calib", type=int, default=DEFAULT_CALIB_IMAGES, help="calibration images used at most"
    )
    q.add_argument("--preset", default="x86-vnni", choices=sorted(PRESETS))
    q.add_argument("--method", default=None, choices=CALIBRATION_METHODS, help="calibration method")
    q.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="node-name glob kept in float"
    )
    q.add_argument(
        "--check-images", help="folder of held-out images for the gate (default: the last calibration images)"
    )
    q.add_argument(
        "--fallback-k",
        type=int,
        default=0,
        help="when the gate fails, keep up to k most sensitive nodes (1, 2, 4, ...) in float until it passes",
    )
    q.add_argument(
        "--min-cosine", type=float, default=None, help="gate: per-image minimum cosine vs FP32 (0.98)"
    )
    q.add_argument("--mean-cosine", type=float, default=None, help="gate: mean cosine vs FP32 (0.995)")
    q.add_argument("--no-fuse", action="store_true", help="quantize the graph without transformer fusions")
    q.add_argument(
        "--diagnostics",
        action="store_true",
        help="write per-activation SQNR and per-image held-out cosines to OUT/diagnostics",
    )
    q.add_argument("--dynamic", action="store_true", help="also write the dynamic-INT8 baseline")
    q4 = p.add_argument_group("INT4 weights")
    q4.add_argument("--int4", action="store_true", help="also write vision.int4.onnx (MatMulNBits)")
    q4.add_argument("--int4-block", type=int, default=None, help="INT4 block size along K (32)")
    q4.add_argument("--int4-accuracy", type=int, default=None, help="MatMulNBits accuracy_level (4: int8)")
    add_budget_args(p)
    p.set_defaults(func=run)


def default_calibration_folder(out: Path, n: int) -> Path:
    """OUT/calib-images, drawn by the synthetic VQA generator when it is not there yet."""
    from tinygptv_edge.runtime.errors import CalibrationError

    folder = out / "calib-images"
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    try:
        vqa = importlib.import_module("tinygptv_edge.export.train.vqa")
    except ImportError as e:
        raise CalibrationError(
            "no --calib-images given and the synthetic VQA generator (export/train/vqa.py) is not available: "
            "expected a folder of calibration images"
        ) from e
    from tinygptv_edge.export.staging import stage_dir
    from tinygptv_edge.runtime.errors import OutputPathError

    tmp = stage_dir(folder)  # all n images or none: a partial folder would be taken as the set next time
    try:
        vqa.write_calibration_images(tmp, n)
        if folder.is_dir():
            folder.rmdir()  # empty
        tmp.rename(folder)
    except OSError as e:
        raise OutputPathError(f"cannot write {n} calibration images to {folder}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _images(folder: Path, pre, n: int):
    """(pixels, file names) of the first `n` images of `folder`."""
    from tinygptv_edge.export.onnx.calib_data import list_images, load_folder

    pixels = load_folder(folder, pre, n)
    return pixels, [p.name for p in list_images(folder)[: len(pixels)]]


def _gate_lines(res, what: str) -> list[str]:
    lines = [f"  {what}: {res.check.summary()}", f"  worst held-out images: {res.check.format_worst()}"]
    if res.fused:
        lines.append(f"  {res.fused.format()}")
    return lines


@dataclass(frozen=True)
class VisionPlan:
    """Which graphs to write after the FP32 one."""

    static: bool  # vision.int8.onnx (calibrated)
    dynamic: bool  # vision.int8-dynamic.onnx
    int4: bool  # vision.int4.onnx
    method: str | None = None  # the calibration method, when not the preset's


def vision_plan(args: argparse.Namespace) -> tuple[VisionPlan, str | None]:
    """What the flags ask for, or what `--memory-budget` picks from the report (with a line saying so)."""
    from tinygptv_edge.export.budget import choice_from_args, vision_level
    from tinygptv_edge.runtime.errors import ConfigError

    choice = choice_from_args(args)
    if choice is None:
        return VisionPlan(not args.no_int8, not args.no_int8 and args.dynamic, not args.no_int8 and args.int4,
                          args.method), None  # fmt: skip
    asked = [f for f, on in (("--no-int8", args.no_int8), ("--dynamic", args.dynamic), ("--int4", args.int4),
                             ("--method", args.method)) if on]  # fmt: skip
    if asked:
        raise ConfigError(
            f"--memory-budget and {', '.join(asked)}: expected one of them (the budget picks the vision "
            "level from the report), got both"
        )
    kind, method = vision_level(choice.vision)
    plan = VisionPlan(kind == "static", kind == "dynamic", kind == "int4", method or None)
    return plan, choice.describe()


def run(args: argparse.Namespace) -> int:
    from tinygptv_edge.export.checkpoints.source import spec_from_args
    from tinygptv_edge.export.onnx.check import ParityConfig
    from tinygptv_edge.export.onnx.export import ExportConfig, export_vision
    from tinygptv_edge.export.onnx.presets import Int4Config, get_preset
    from tinygptv_edge.export.onnx.quant import (
        MAX_CHECK_IMAGES,
        preprocess_config,
        quantize_vision,
        quantize_vision_dynamic,
        quantize_vision_int4,
        split_holdout,
    )

    plan, picked = vision_plan(args)
    if picked:
        print(picked)
    overrides = {"exclude": tuple(args.exclude), "fallback_k": args.fallback_k, "max_images": args.n_calib}
    overrides["fuse"] = not args.no_fuse
    gate = {
        k: v for k, v in (("min_cosine", args.min_cosine), ("mean_cosine", args.mean_cosine)) if v is not None
    }
    if plan.method:
        overrides["method"] = plan.method
    preset = get_preset(args.preset, **overrides, **gate)  # validate flags before the slow steps
    int4 = {
        k: v
        for k, v in (("block_size", args.int4_block), ("accuracy_level", args.int4_accuracy))
        if v is not None
    }
    int4_cfg = Int4Config(fuse=not args.no_fuse, **int4, **gate)
    spec = spec_from_args(args)
    out = Path(args.out)
    quantized = plan.static or plan.dynamic or plan.int4
    steps = tqdm(
        total=3 + (2 + plan.dynamic + plan.int4 if quantized else 0), desc="export-onnx", unit="step"
    )

    def progress(msg: str) -> None:
        steps.set_postfix_str(msg[:60])

    t0 = time.perf_counter()
    progress("loading the model")
    loaded = spec.load()
    steps.update()
    cfg = ExportConfig(opset=args.opset, parity=ParityConfig(atol=args.atol, min_cosine=args.parity_cosine))
    fp32 = export_vision(loaded.model, out, loaded.sha256, cfg, progress=progress)
    steps.update()
    lines = [loaded.summary.format(), f"wrote {fp32.path} ({fp32.n_nodes} nodes); {fp32.parity.format()}"]
    if quantized:
        progress("reading calibration images")
        pre = preprocess_config(fp32.path)
        folder = (
            Path(args.calib_images)
            if args.calib_images
            else default_calibration_folder(out, args.n_calib + MAX_CHECK_IMAGES)
        )
        if args.check_images:
            pixels, _ = _images(folder, pre, preset.max_images)
            check, names = _images(Path(args.check_images), pre, MAX_CHECK_IMAGES)
        else:
            pixels, names = _images(folder, pre, preset.max_images + MAX_CHECK_IMAGES)
            pixels, check = split_holdout(pixels, None)
            names = names[len(pixels) :]
        steps.update()
        diag_dir = out / "diagnostics" if args.diagnostics else None
        steps.update()
        if plan.static:
            q = quantize_vision(
                fp32.path,
                pixels,
                preset,
                check=check,
                check_names=names,
                diagnostics_dir=diag_dir,
                progress=progress,
            )
            lines.append(
                f"wrote {q.path} ({preset.name}, {preset.method}, {len(pixels)} images from {folder})"
            )
            lines += _gate_lines(q, "INT8")
            if q.fallback:
                lines.append(
                    f"  kept in float (most sensitive, until the gate passed): {', '.join(q.fallback)}"
                )
            if diag_dir:
                lines.append(
                    f"  SQNR per activation: {diag_dir}/sqnr.txt; held-out images: {diag_dir}/heldout.txt"
                )
        if plan.int4:
            progress("INT4 weights")
            q4 = quantize_vision_int4(fp32.path, check, int4_cfg, check_names=names, progress=progress)
            steps.update()
            lines.append(f"wrote {q4.path} (INT4 weights, block {int4_cfg.block_size})")
            lines += _gate_lines(q4, "INT4")
        if plan.dynamic:
            progress("dynamic INT8 baseline")
            d = quantize_vision_dynamic(fp32.path, preset, check)
            steps.update()
            lines.append(f"wrote {d.path} (dynamic); {d.check.summary()}")
    if picked:  # `run` takes vision.int8.onnx when there is one: name the graph the budget chose
        chosen = q.path if plan.static else q4.path if plan.int4 else d.path if plan.dynamic else fp32.path
        lines.append(f"the budget's vision graph: {chosen} (tinygptv-edge run --vision {chosen} ...)")
    steps.update()
    steps.close()
    print("\n".join(lines))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
