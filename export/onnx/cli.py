"""`tinygptv-edge export-onnx`: the vision graph as FP32 ONNX, then INT8 calibrated on images.

Source (export/checkpoints/source.py, the same flags on every command): `--model DIR` (the project's
single checkpoint), or the official files (`--phi2 --eva --blip2 [--stage-ckpt] [--stage-num]`), or
nothing: the shipped default model; `--config JSON` for other sizes. Output in `--out` (default `dist/`):
vision.fp32.onnx, vision.int8.onnx (+ vision.int8-dynamic.onnx with --dynamic, SQNR tables with
--diagnostics). Calibration images: `--calib-images DIR`, or by default images drawn by the
synthetic VQA generator (`export/train/vqa.py`) into OUT/calib-images.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from tqdm import tqdm

DEFAULT_CALIB_IMAGES = 32


def register(sub: argparse._SubParsersAction) -> None:
    from tinygptv_edge.export.checkpoints.source import add_source_args
    from tinygptv_edge.export.onnx.presets import CALIBRATION_METHODS, PRESETS

    p = sub.add_parser("export-onnx", help="export the vision graph to ONNX (FP32 + INT8)")
    add_source_args(p, legacy_stage="file")
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
    q.add_argument("--fallback-k", type=int, default=0, help="keep the k most sensitive nodes in float")
    q.add_argument("--min-cosine", type=float, default=None, help="refuse INT8 under this cosine vs FP32")
    q.add_argument("--diagnostics", action="store_true", help="write per-activation SQNR to OUT/diagnostics")
    q.add_argument("--dynamic", action="store_true", help="also write the dynamic-INT8 baseline")
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
    vqa.write_calibration_images(folder, n)
    return folder


def run(args: argparse.Namespace) -> int:
    from tinygptv_edge.export.checkpoints.source import spec_from_args
    from tinygptv_edge.export.onnx.calib_data import load_folder
    from tinygptv_edge.export.onnx.check import ParityConfig
    from tinygptv_edge.export.onnx.export import ExportConfig, export_vision
    from tinygptv_edge.export.onnx.presets import get_preset
    from tinygptv_edge.export.onnx.quant import preprocess_config, quantize_vision, quantize_vision_dynamic

    overrides = {"exclude": tuple(args.exclude), "fallback_k": args.fallback_k, "max_images": args.n_calib}
    if args.method:
        overrides["method"] = args.method
    if args.min_cosine is not None:
        overrides["min_cosine"] = args.min_cosine
    preset = get_preset(args.preset, **overrides)  # validate flags before the slow steps
    spec = spec_from_args(args)
    out = Path(args.out)
    steps = tqdm(total=3 if args.no_int8 else 5 + args.dynamic, desc="export-onnx", unit="step")

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
    if not args.no_int8:
        progress("reading calibration images")
        folder = (
            Path(args.calib_images) if args.calib_images else default_calibration_folder(out, args.n_calib)
        )
        pixels = load_folder(folder, preprocess_config(fp32.path), preset.max_images)
        steps.update()
        diag_dir = out / "diagnostics" if args.diagnostics else None
        q = quantize_vision(fp32.path, pixels, preset, diagnostics_dir=diag_dir, progress=progress)
        steps.update()
        lines.append(
            f"wrote {q.path} ({preset.name}, {preset.method}, {len(pixels)} images from {folder}); "
            f"cosine vs FP32 {q.cosine:.5f}"
        )
        if q.fallback:
            lines.append(f"  kept in float (most sensitive): {', '.join(q.fallback)}")
        if diag_dir:
            lines.append(f"  SQNR per activation: {diag_dir}/sqnr.txt, sqnr.json")
        if args.dynamic:
            progress("dynamic INT8 baseline")
            d = quantize_vision_dynamic(fp32.path, preset, pixels[:8])
            steps.update()
            lines.append(f"wrote {d.path} (dynamic); cosine vs FP32 {d.cosine:.5f}")
    steps.update()
    steps.close()
    print("\n".join(lines))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
