"""Benchmark (not a test): the vision graph's variants side by side in one run, against a measured floor.

    for size in (tiny, full, full448):            full448: stage 4, the ViT at 448 px
        VisionTower(size config, seeded random weights)   --export_vision-->      vision.fp32.onnx
        synthetic images (calibration) + held-out images (another seed, never calibrated on)
        --quantize_vision (fused, x86-vnni)-->             vision.int8.onnx   [--unfused: without fusions]
        --quantize_vision_int4 (per --int4 block/level)--> vision.int4-b<B>-a<L>.onnx
        [--dynamic: quantize_vision_dynamic -->            vision.int8-dynamic.onnx]
    int8 / fp32 GEMM peak of this CPU: an onnxruntime MatMulInteger (u8 x s8) and a MatMul micro-graph,
        timed at the same threads
    every graph timed in one child process (runs interleaved, round robin, so load hits all alike);
        peak RSS in one child process per graph
    table per variant: median ms/image, speed-up over FP32, cosine mean/min on the held-out images,
        file size, peak RSS, floor = FLOPs per image / GEMM peak (int8 peak for INT8 and INT4 at
        accuracy level 4, fp32 peak otherwise), and median / floor

Full size builds only the vision tower at `full_config()` dims (about 1.1 B parameters, 4.4 GB in
FP32, written with external data); the language model is not needed. Exporting and quantizing
(quant_pre_process) need well over that in RAM (peaks: docs/benchmarks.md); with `--work DIR --reuse`
every graph already in DIR is reused, so a later run only times. Run from the repository root:

    .venv/bin/python bench/vision.py --sizes tiny,full,full448 --threads 2 --work .bench-vision --reuse
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

SIZES = ("tiny", "full", "full448")
GEMM_SHAPE = (
    1024,
    4096,
    4096,
)  # M, K, N of the peak micro-graphs (fc1 of a 257-token image is 257x1408x6144)


def _config(size: str):
    from tinygptv_edge.runtime.config import full_config, tiny_config

    return {"tiny": tiny_config, "full": full_config, "full448": lambda: full_config(stage=4)}[size]()


def vision_flops(cfg) -> float:
    """Multiply-add FLOPs (2 per MAC) of one image through the tower: the MatMuls and the patch Conv.

    Softmax, LayerNorm, GELU and adds are left out (a few percent); they are what the floor does not buy.
    """
    v, q, p = cfg.vision, cfg.qformer, cfg.projection
    n, w, m = v.num_tokens, v.width, v.mlp_hidden
    grid = v.image_size // v.patch_size
    macs = grid * grid * 3 * v.patch_size**2 * w  # patch embedding
    macs += v.depth * (n * w * 3 * w + 2 * n * n * w + n * w * w + 2 * n * w * m)
    nq, h = q.num_query_tokens, q.hidden
    for layer in range(q.layers):
        macs += 4 * nq * h * h + 2 * nq * nq * h  # self-attention: q, k, v, dense; scores, context
        if q.has_cross_attention(layer):
            macs += 2 * nq * h * h + 2 * n * q.vision_width * h + 2 * nq * n * h
        macs += 2 * nq * h * q.intermediate
    macs += nq * (p.in_features * p.mid_features + p.mid_features * p.out_features)
    return 2.0 * macs


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

    cfg = _config(size)
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


def _gemm_graph(kind: str):
    """A one-node graph: MatMulInteger (u8 activations x s8 weights, as INT8 runs) or fp32 MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    M, K, N = GEMM_SHAPE
    rng = np.random.default_rng(0)
    if kind == "int8":
        w = numpy_helper.from_array(rng.integers(-127, 128, (K, N), dtype=np.int8), "w")
        zp = numpy_helper.from_array(np.array(128, np.uint8), "zp")
        node = helper.make_node("MatMulInteger", ["x", "w", "zp"], ["y"])
        x_type, y_type, inits = TensorProto.UINT8, TensorProto.INT32, [w, zp]
    else:
        w = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [w]
    graph = helper.make_graph(
        [node],
        f"gemm_{kind}",
        [helper.make_tensor_value_info("x", x_type, [M, K])],
        [helper.make_tensor_value_info("y", y_type, [M, N])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _gemm_peaks(threads: int, runs: int) -> dict[str, float]:
    """FLOP/s of the micro-graphs (median of `runs`), int8 and fp32, in this process."""
    import onnxruntime as ort

    M, K, N = GEMM_SHAPE
    rng = np.random.default_rng(1)
    out = {}
    for kind in ("int8", "fp32"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        sess = ort.InferenceSession(_gemm_graph(kind), opts, providers=["CPUExecutionProvider"])
        x = rng.integers(0, 256, (M, K), dtype=np.uint8) if kind == "int8" else rng.standard_normal((M, K))
        feeds = {"x": x.astype(np.uint8 if kind == "int8" else np.float32)}
        sess.run(None, feeds)
        ts = []
        for _ in range(max(3, runs)):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            ts.append(time.perf_counter() - t0)
        out[kind] = 2.0 * M * K * N / statistics.median(ts)
    return out


def _child(mode: str, paths: list[str], threads: int, runs: int, image_size: int) -> None:
    """In a fresh process: `rss` loads one graph and runs it once; `time` interleaves the graphs'
    runs (round robin) so that load from other processes hits all of them alike; `peak` times the
    GEMM micro-graphs. Prints JSON."""
    if mode == "peak":
        print(json.dumps(_gemm_peaks(threads, runs)))
        return
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


class Variant:
    """One graph of the table: label, file, compute kind of its floor, held-out cosines."""

    def __init__(self, label: str, path: Path, compute: str, mean: float = 1.0, low: float = 1.0):
        self.label, self.path, self.compute, self.mean, self.low = label, path, compute, mean, low


def _from_metadata(label: str, path: Path, compute: str) -> Variant:
    import onnx

    from tinygptv_edge.export.onnx.export import read_metadata
    from tinygptv_edge.export.onnx.quant import QUANT_META_KEY

    info = json.loads(read_metadata(onnx.load(str(path), load_external_data=False))[QUANT_META_KEY])
    mean = info.get("cosine_mean_vs_fp32", info["cosine_vs_fp32"])
    return Variant(label, path, compute, mean, info["cosine_vs_fp32"])


def _int4_variants(args) -> list[tuple[int, int]]:
    return [
        (int(b), int(lv))
        for b in args.int4_blocks.split(",")
        if b
        for lv in args.int4_levels.split(",")
        if lv
    ]


def _build(size: str, work: Path, args, say) -> list[Variant]:
    """Export and quantize what `work` lacks (with --reuse; without it everything is rebuilt)."""
    from tinygptv_edge.export.onnx.calib_data import pixels_from_images
    from tinygptv_edge.export.onnx.check import ParityConfig
    from tinygptv_edge.export.onnx.export import ExportConfig, export_vision
    from tinygptv_edge.export.onnx.presets import Int4Config, get_preset
    from tinygptv_edge.export.onnx.quant import quantize_vision, quantize_vision_dynamic, quantize_vision_int4

    work.mkdir(parents=True, exist_ok=True)
    have = (lambda name: (work / name).is_file()) if args.reuse else (lambda name: False)
    fp32 = work / "vision.fp32.onnx"
    if not have(fp32.name):
        t0 = time.perf_counter()
        say("building the tower")
        model, cfg = _tower(size, args.seed)
        # full size: fp32 sums over 39 blocks; parity is reported, with a looser tolerance than tiny's
        parity = ParityConfig(batch_sizes=(1,), atol=1e-4 if size == "tiny" else 1e-2, min_cosine=0.9999)
        res = export_vision(model, work, cfg=ExportConfig(parity=parity), progress=say)
        say(f"exported in {time.perf_counter() - t0:.0f} s; {res.parity.format()}")
        del model, res
        gc.collect()
    cfg = _config(size)
    n_calib = args.calib if size != "tiny" else max(args.calib, 8)
    size_px = max(cfg.vision.image_size, 224)
    calib = pixels_from_images(_synthetic_images(n_calib, size_px, args.seed), cfg.preprocess)
    held = pixels_from_images(_synthetic_images(args.heldout, size_px, args.seed + 1000), cfg.preprocess)
    names = [f"held-{i}" for i in range(len(held))]
    gate = {"min_cosine": 1e-6, "mean_cosine": 1e-6}  # measure, do not refuse: the table shows the numbers
    out = [Variant("fp32", fp32, "fp32")]
    preset = get_preset(args.preset, method=args.method, **gate)
    int8s = [("int8 static fused", "vision.int8.onnx", preset)]
    if args.unfused:
        int8s.append(("int8 static unfused", "vision.int8-unfused.onnx", preset.replace(fuse=False)))
    for label, name, p in int8s:
        if not have(name):
            t1 = time.perf_counter()
            q = quantize_vision(fp32, calib, p, work / name, check=held, check_names=names, progress=say)
            fused = f"; {q.fused.format()}" if q.fused else ""
            say(f"{name} in {time.perf_counter() - t1:.0f} s; {q.check.summary()}{fused}")
        out.append(_from_metadata(f"{label} ({preset.name}, {preset.method})", work / name, "int8"))
    for block, level in _int4_variants(args):
        name = f"vision.int4-b{block}-a{level}.onnx"
        if not have(name):
            t1 = time.perf_counter()
            c4 = Int4Config(block_size=block, accuracy_level=level, **gate)
            q = quantize_vision_int4(fp32, held, c4, work / name, check_names=names, progress=say)
            say(f"{name} in {time.perf_counter() - t1:.0f} s; {q.check.summary()}")
        out.append(
            _from_metadata(f"int4 block {block} level {level}", work / name, "int8" if level == 4 else "fp32")
        )
    if args.dynamic:
        name = "vision.int8-dynamic.onnx"
        if not have(name):
            quantize_vision_dynamic(fp32, preset, held, work / name)
        out.append(_from_metadata("int8 dynamic", work / name, "int8"))
    return out


def bench_size(size: str, work: Path, args, peaks: dict[str, float]) -> list[dict]:
    def say(msg: str) -> None:
        print(f"[{size}] {msg}", file=sys.stderr, flush=True)

    graphs = _build(size, work, args, say)
    cfg = _config(size)
    flops = vision_flops(cfg)
    say(f"timing {len(graphs)} graphs, interleaved")
    timing = _spawn("time", [g.path for g in graphs], args, cfg.vision.image_size)
    rows = []
    for g, t in zip(graphs, timing, strict=True):
        say(f"peak RSS of {g.label}")
        rss = _spawn("rss", [g.path], args, cfg.vision.image_size)
        file_mb = sum(p.stat().st_size for p in g.path.parent.glob(g.path.name + "*")) / 2**20
        floor_ms = 1e3 * flops / peaks[g.compute]
        rows.append(
            {"size": size, "px": cfg.vision.image_size, "graph": g.label, "cos_mean": g.mean,
             "cos_min": g.low, "file_mb": file_mb, "gflop": flops / 1e9, "floor_ms": floor_ms,
             "compute": g.compute, **t, **rss}
        )  # fmt: skip
    return rows


def _table(rows: list[dict], args, peaks: dict[str, float]) -> str:
    lines = [
        f"vision graph, batch 1, {args.threads} thread(s), {args.runs} timed runs (median), onnxruntime CPU",
        f"GEMM peak ({'x'.join(map(str, GEMM_SHAPE))}): int8 (MatMulInteger u8 x s8) "
        f"{peaks['int8'] / 1e9:.0f} GFLOP/s, fp32 (MatMul) {peaks['fp32'] / 1e9:.0f} GFLOP/s",
        f"{'size':<8} {'px':>4} {'graph':<38} {'median ms':>10} {'speed-up':>8} {'cos mean':>9} "
        f"{'cos min':>8} {'file MB':>8} {'RSS MB':>7} {'GFLOP':>6} {'floor ms':>9} {'x floor':>7}",
    ]
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["graph"] == "fp32")
        lines.append(
            f"{r['size']:<8} {r['px']:>4} {r['graph']:<38} {r['median_ms']:10.1f} "
            f"{base['median_ms'] / r['median_ms']:7.2f}x {r['cos_mean']:9.5f} {r['cos_min']:8.5f} "
            f"{r['file_mb']:8.1f} {r['rss_mb']:7.0f} {r['gflop']:6.1f} {r['floor_ms']:9.1f} "
            f"{r['median_ms'] / r['floor_ms']:6.2f}x"
        )
    lines.append(
        f"floor: FLOPs / int8 peak ({args.int8_floor_note}); fp32 and INT4 level 0 use the fp32 peak"
    )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,full,full448", help=f"comma-separated, from {','.join(SIZES)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--calib", type=int, default=4, help="calibration images at full size (tiny uses >= 8)")
    p.add_argument("--heldout", type=int, default=8, help="held-out images (another seed) for the cosines")
    p.add_argument("--preset", default="x86-vnni")
    p.add_argument("--method", default="minmax")
    p.add_argument("--int4-blocks", default="32,128", help="INT4 block sizes to build and time")
    p.add_argument("--int4-levels", default="4", help="MatMulNBits accuracy levels to build and time")
    p.add_argument("--unfused", action="store_true", help="also time INT8 quantized without the fusions")
    p.add_argument("--dynamic", action="store_true", help="also time the dynamic-INT8 baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="keep the graphs in this folder (default: a temp folder, removed)")
    p.add_argument("--reuse", action="store_true", help="with --work: reuse the graphs an earlier run left")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--child", choices=["time", "rss", "peak"], help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child, args.paths, args.threads, args.runs, args.image_size)
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    if any(s not in SIZES for s in sizes):
        p.error(f"--sizes: expected names from {','.join(SIZES)}, got {args.sizes}")
    print("measuring the int8 / fp32 GEMM peaks", file=sys.stderr, flush=True)
    peaks = _spawn("peak", [], args, 0)
    args.int8_floor_note = "INT8 and INT4 level 4 compute in int8"
    rows = []
    for size in sizes:
        work = Path(args.work) / size if args.work else Path(tempfile.mkdtemp(prefix=f"bench-vision-{size}-"))
        try:
            rows += bench_size(size, work, args, peaks)
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    print("\n" + _table(rows, args, peaks))
    print(f"peak RSS of the export + quantization process: {peak_rss_bytes() / 2**20:.0f} MB")
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
