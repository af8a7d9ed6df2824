"""Benchmark (not a test): the whole runtime at full size, resident vs low-memory mode, side by side.

    build (once, cached in --work):
        full-size VisionTower, seeded random weights --export_vision--> vision.fp32.onnx
            --quantize_vision (static INT8, synthetic calibration images)--> vision.int8.onnx
        full-size Phi-2 tensors, seeded random, streamed one at a time --export_source--> language.q4_0.gguf
    measure (each mode in its own fresh process, so peak RSS is that mode's alone):
        Pipeline(int8 vision, Q4_0 language[, low_memory]) -> one image question, greedy, --tokens new
        peak RSS (VmHWM: model loading included), image ms, time to first token, prefill and decode tok/s
    print one table with the low-memory / resident ratios and the targets (3.2 GB, 2.0 GB)

Random weights give the real sizes and speeds, not meaningful answers; the answer is cut at
`--tokens` (no early separator or EOS stop: `min_new_tokens`-like by ignoring stops is not needed,
random logits rarely produce them). Run from the repository root:

    .venv/bin/python bench/pipeline.py --threads 2            # builds ~3 GB of files in .bench-pipeline/
    .venv/bin/python bench/pipeline.py --vision V.int8.onnx --language L.q4_0.gguf   # files already built

Building the FP32 vision graph needs well over its size in RAM for a moment (torch model + ONNX
serialization; the measured peak: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GB = 1024**3
TARGETS = {"resident": 3.2, "low-memory": 2.0}  # GB peak RSS


def _photo(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640] / 640
    img = np.stack([xx, yy, 1 - xx * yy], -1) * rng.uniform(0.3, 1.0, 3)
    Image.fromarray((img * 255).astype(np.uint8)).save(path, quality=92)
    return path


def vision_holder(cfg):
    """A module with what export_vision needs, `.vision` and `.cfg`, the tower built from `cfg`."""
    from torch import nn

    from tinygptv_edge.export.model.vision import VisionTower

    holder = nn.Module()
    holder.cfg = cfg
    holder.vision = VisionTower(cfg.vision, cfg.qformer, cfg.projection)
    return holder


def build_vision(work: Path, n_calib: int, say) -> Path:
    import torch

    from tinygptv_edge.export.onnx.export import export_vision
    from tinygptv_edge.export.onnx.presets import get_preset
    from tinygptv_edge.export.onnx.quant import quantize_vision
    from tinygptv_edge.runtime.config import full_config
    from tinygptv_edge.runtime.vision.images import load_image
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    int8 = work / "vision.int8.onnx"
    if int8.is_file():
        return int8
    cfg = full_config()
    torch.manual_seed(0)
    say("vision: random full-size tower")
    with torch.no_grad():
        m = vision_holder(cfg).eval()
        for name, p in m.named_parameters():
            if p.ndim >= 2 or name.endswith(("q_bias", "v_bias")):
                p.normal_(0.0, 0.02)
    say("vision: exporting FP32 ONNX")
    fp32 = export_vision(m, work, progress=lambda s: say(f"vision: {s}")).path
    del m
    pixels = np.stack(
        [
            preprocess(load_image(_photo(work / f"calib{i}.jpg", i)), cfg.preprocess)
            for i in range(n_calib + 1)
        ]
    )
    preset = get_preset("x86-vnni", min_cosine=0.5, mean_cosine=0.5)  # random weights: not the point here
    say(f"vision: static INT8 ({n_calib} calibration images)")
    return quantize_vision(fp32, pixels[:n_calib], preset, check=pixels[n_calib:]).path


def build_language(work: Path, say) -> Path:
    import torch

    from tinygptv_edge.export.checkpoints.tokenizer_train import train_bpe
    from tinygptv_edge.export.gguf.export import export_source
    from tinygptv_edge.export.gguf.source import LanguageSource, expected_shapes
    from tinygptv_edge.runtime.config import full_config
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    out = work / "language.q4_0.gguf"
    if out.is_file():
        return out
    cfg = full_config()
    shapes = expected_shapes(cfg.language)

    def fetch(name: str) -> torch.Tensor:  # one tensor at a time: the full model never sits in RAM
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        shape = shapes[name]
        if name.endswith("norm.weight") or "layernorm.weight" in name:
            return torch.ones(shape)
        return torch.randn(shape, generator=g) * 0.02

    src = LanguageSource(cfg, Tokenizer(train_bpe(4096)), shapes, fetch, "random full-size weights")
    say("language: writing Q4_0 GGUF")
    export_source(src, out, "Q4_0", progress=lambda *a: None)
    return out


def child(vision: str, language: str, image: str, low_memory: bool, threads: int, tokens: int) -> None:
    """One mode in a fresh process; JSON on stdout. Imports no torch."""
    from tinygptv_edge.runtime.memory import peak_rss_bytes, rss_bytes
    from tinygptv_edge.runtime.pipeline import Pipeline
    from tinygptv_edge.runtime.sampling import SamplingConfig

    t0 = time.perf_counter()
    pipe = Pipeline(vision, language, n_threads=threads, low_memory=low_memory)  # default n_ctx of the mode
    load_s = time.perf_counter() - t0
    rss_loaded = rss_bytes()
    ans = pipe.ask("Describe this image in detail.", image, SamplingConfig(max_new_tokens=tokens))
    t = ans.timings
    out = {
        "load_s": load_s,
        "rss_loaded_gb": rss_loaded / GB,
        "peak_rss_gb": peak_rss_bytes() / GB,
        "image_ms": t.image_ms,
        "first_token_ms": t.first_token_ms,
        "prefill_tok_s": t.prefill_tok_s,
        "decode_tok_s": t.decode_tok_s,
        "new_tokens": len(ans.token_ids),
        "n_ctx": pipe.n_ctx,
        "torch_imported": "torch" in sys.modules,
    }
    print(json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=".bench-pipeline", help="where the full-size files are built (kept)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per answer")
    p.add_argument("--calib", type=int, default=4, help="calibration images for the INT8 vision graph")
    p.add_argument("--vision", help="use this INT8 vision ONNX instead of building one")
    p.add_argument("--language", help="use this Q4_0 language GGUF instead of building one")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        v, lang, img, low, threads, tokens = args.child
        child(v, lang, img, low == "1", int(threads) or None, int(tokens))
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    vision = Path(args.vision) if args.vision else build_vision(work, args.calib, say)
    language = Path(args.language) if args.language else build_language(work, say)
    image = _photo(work / "question.jpg", 123)
    rows = {}
    for mode, low in (("resident", "0"), ("low-memory", "1")):
        say(f"measuring {mode}")
        cmd = [sys.executable, __file__, "--child", str(vision), str(language), str(image), low]
        cmd += [str(args.threads or 0), str(args.tokens)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1
        rows[mode] = json.loads(res.stdout.strip().splitlines()[-1])

    vision_bytes = sum(p.stat().st_size for p in (vision, Path(f"{vision}.data")) if p.is_file())
    sizes = f"vision {vision_bytes / GB:.2f} GB, language {language.stat().st_size / GB:.2f} GB"
    print(f"\nfull size, INT8 vision + Q4_0 language ({sizes}), threads={args.threads}, {args.tokens} tokens")
    print(f"{'metric':<22}{'resident':>12}{'low-memory':>12}{'low/res':>10}")
    for key, label in (
        ("peak_rss_gb", "peak RSS (GB)"),
        ("rss_loaded_gb", "RSS after load (GB)"),
        ("load_s", "load (s)"),
        ("image_ms", "image (ms)"),
        ("first_token_ms", "first token (ms)"),
        ("prefill_tok_s", "prefill (tok/s)"),
        ("decode_tok_s", "decode (tok/s)"),
    ):
        a, b = rows["resident"][key], rows["low-memory"][key]
        print(f"{label:<22}{a:>12.2f}{b:>12.2f}{b / a if a else float('nan'):>10.2f}")
    for mode, limit in TARGETS.items():
        peak, n_ctx = rows[mode]["peak_rss_gb"], rows[mode]["n_ctx"]
        verdict = "PASS" if peak <= limit else "FAIL"
        print(f"{mode} (n_ctx {n_ctx}): peak RSS {peak:.2f} GB, target <= {limit} GB: {verdict}")
    if any(r["torch_imported"] for r in rows.values()):
        print("warning: torch was imported by the runtime")
    return 0


if __name__ == "__main__":
    sys.exit(main())
