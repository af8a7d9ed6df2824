"""Benchmark (not a test): FP32 vs INT8 vision graph, latency at batch 1 and peak RSS, side by side.

    for size in (tiny, full):
        VisionTower(size config, seeded random weights)  --export_vision-->  vision.fp32.onnx
        synthetic images --calibrate + quantize_vision (preset)-->           vision.int8.onnx
        [--dynamic: quantize_vision_dynamic -->                              vision.int8-dynamic.onnx]
        each graph in its own subprocess: warm-up, then `--runs` timed runs at batch 1, peak RSS
    print one table with latency ratios FP32 / INT8 and INT8 cosine vs FP32

The full size builds only the vision tower at `full_config()` dims (about 1.1 B parameters,
4.4 GB in FP32: exported with external data); the language model is not needed. Peak RSS is the
child process's ru_maxrss (session creation included). Run from the repository root:

    .venv/bin/python bench/vision.py --sizes tiny,full --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tinygptv_edge.runtime.memory import peak_rss_bytes


def _synthetic_images(n: int, size: int, seed: int):
    """Gradients with a few flat rectangles: image-like statistics for calibration."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = np.stack([xx, yy, 1 - xx * yy], -1) * rng.uniform(0.2, 1.0, 3)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            w, h = rng.integers(size // 8, size // 3, 2)
            img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 1, 3)
        out.append(Image.fromarray((img * 255).astype(np.uint8)))
    return out


def _tower(size: str, seed: int):
    """(holder with .vision/.cfg, cfg) with seeded random weights, std 0.02 like BERT/EVA init."""
    import torch
    from torch import nn

    from tinygptv_edge.export.model.vision import VisionTower
    from tinygptv_edge.runtime.config import full_config, tiny_config

    cfg = tiny_config() if size == "tiny" else full_config()
    torch.manual_seed(seed)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = cfg
            self.vision = VisionTower(cfg.vision, cfg.qformer, cfg.projection)

    with torch.no_grad():
        m = Holder()
        for name, p in m.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ln_vision.weight")):
                continue  # LayerNorm scales stay 1
            if p.ndim >= 2 or name.endswith(("q_bias", "v_bias")):
                p.normal_(0.0, 0.02)
    return m.eval(), cfg


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _child(mode: str, paths: list[str], threads: int, runs: int, image_size: int) -> None:
    """In a fresh process: `rss` loads one graph and runs it once; `time` interleaves the graphs'
    runs (round robin) so that load from other processes hits all of them alike. Prints JSON."""
    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    if mode == "rss":
        sess = _session(paths[0], threads)
        sess.run(None, {"pixel_values": x})
        print(json.dumps({"rss_mb": peak_rss_bytes() / 2**20}))
        return
    sessions = [_session(p, threads) for p in paths]
    for sess in sessions:
        sess.run(None, {"pixel_values": x})  # warm-up
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(runs):
        for sess, ts in zip(sessions, times, strict=True):
            t0 = time.perf_counter()
            sess.run(None, {"pixel_values": x})
            ts.append(time.perf_counter() - t0)
    print(json.dumps([{"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts)} for ts in times]))


def _spawn(mode: str, paths: list[Path], args, image_size: int):
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--threads",
        str(args.threads),
        "--runs",
        str(args.runs),
    ]
    cmd += ["--image-size", str(image_size), *map(str, paths)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{mode} of {[p.name for p in paths]} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _build(size: str, work: Path, args, say) -> list[tuple[str, Path, float]]:
    """Export and quantize (or, with --reuse, read back what an earlier run left in `work`)."""
    from tinygptv_edge.export.onnx.calib_data import pixels_from_images
    from tinygptv_edge.export.onnx.check import ParityConfig
    from tinygptv_edge.export.onnx.export import ExportConfig, export_vision
    from tinygptv_edge.export.onnx.presets import get_preset
    from tinygptv_edge.export.onnx.quant import QUANT_META_KEY, quantize_vision, quantize_vision_dynamic

    names = ["vision.fp32.onnx", "vision.int8.onnx"] + (["vision.int8-dynamic.onnx"] if args.dynamic else [])
    if args.reuse and all((work / n).is_file() for n in names):
        import onnx

        from tinygptv_edge.export.onnx.export import read_metadata

        say("reusing the graphs in " + str(work))
        out = [("fp32", work / names[0], 1.0)]
        for n in names[1:]:
            info = json.loads(
                read_metadata(onnx.load(str(work / n), load_external_data=False))[QUANT_META_KEY]
            )
            label = f"int8 {info['kind']}" + (
                f" ({info['preset']['name']}, {info['preset']['method']})" if info["kind"] == "static" else ""
            )
            out.append((label, work / n, info["cosine_vs_fp32"]))
        return out
    t0 = time.perf_counter()
    say("building the tower")
    model, cfg = _tower(size, args.seed)
    # full size: fp32 sums over 39 blocks; parity is reported, with a looser tolerance than tiny's
    parity = ParityConfig(batch_sizes=(1,), atol=1e-4 if size == "tiny" else 1e-2, min_cosine=0.9999)
    fp32 = export_vision(model, work, cfg=ExportConfig(parity=parity), progress=say)
    say(f"exported in {time.perf_counter() - t0:.0f} s; {fp32.parity.format()}")
    del model
    gc.collect()
    n_calib = args.calib if size == "full" else max(args.calib, 8)
    images = _synthetic_images(n_calib + 2, max(cfg.vision.image_size, 224), args.seed)
    pixels = pixels_from_images(images, cfg.preprocess)
    preset = get_preset(args.preset, method=args.method)
    t1 = time.perf_counter()
    q = quantize_vision(fp32.path, pixels[:n_calib], preset, check=pixels[n_calib:], progress=say)
    say(f"quantized in {time.perf_counter() - t1:.0f} s; cosine vs FP32 on 2 held-out images {q.cosine:.5f}")
    out = [("fp32", fp32.path, 1.0), (f"int8 static ({preset.name}, {preset.method})", q.path, q.cosine)]
    if args.dynamic:
        d = quantize_vision_dynamic(fp32.path, preset, pixels[n_calib:])
        out.append(("int8 dynamic", d.path, d.cosine))
    return out


def bench_size(size: str, work: Path, args) -> list[dict]:
    from tinygptv_edge.runtime.config import full_config, tiny_config

    def say(msg: str) -> None:
        print(f"[{size}] {msg}", file=sys.stderr, flush=True)

    graphs = _build(size, work, args, say)
    image_size = (tiny_config() if size == "tiny" else full_config()).vision.image_size
    say(f"timing {len(graphs)} graphs, interleaved")
    timing = _spawn("time", [p for _, p, _ in graphs], args, image_size)
    rows = []
    for (name, path, cos), t in zip(graphs, timing, strict=True):
        say(f"peak RSS of {name}")
        rss = _spawn("rss", [path], args, image_size)
        size_mb = sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20
        rows.append({"size": size, "graph": name, "cosine": cos, "file_mb": size_mb, **t, **rss})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,full")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--calib", type=int, default=4, help="calibration images at full size (tiny uses >= 8)")
    p.add_argument("--preset", default="x86-vnni")
    p.add_argument("--method", default="minmax")
    p.add_argument("--dynamic", action="store_true", help="also time the dynamic-INT8 baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="keep the graphs in this folder (default: a temp folder, removed)")
    p.add_argument("--reuse", action="store_true", help="with --work: time the graphs an earlier run left")
    p.add_argument("--child", choices=["time", "rss"], help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child, args.paths, args.threads, args.runs, args.image_size)
        return 0
    rows = []
    for size in args.sizes.split(","):
        work = Path(args.work) / size if args.work else Path(tempfile.mkdtemp(prefix=f"bench-vision-{size}-"))
        try:
            rows += bench_size(size, work, args)
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nvision graph, batch 1, {args.threads} thread(s), {args.runs} timed runs (median), onnxruntime CPU"
    )
    print(
        f"{'size':<5} {'graph':<32} {'median ms':>10} {'min ms':>9} {'peak RSS MB':>12} {'file MB':>8} "
        f"{'cos vs fp32':>11} {'speed-up':>9}"
    )
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["graph"] == "fp32")
        print(
            f"{r['size']:<5} {r['graph']:<32} {r['median_ms']:10.1f} {r['min_ms']:9.1f} {r['rss_mb']:12.0f} "
            f"{r['file_mb']:8.1f} {r['cosine']:11.5f} {base['median_ms'] / r['median_ms']:8.2f}x"
        )
    print(f"peak RSS of the export + quantization process: {peak_rss_bytes() / 2**20:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
