"""Benchmark (not a test): the whole runtime at full size, resident vs low-memory mode, side by side.

    build (once, cached in --work):
        full-size VisionTower, seeded random weights --export_vision--> vision.fp32.onnx
            --quantize_vision (static INT8, synthetic calibration images)--> vision.int8.onnx
        full-size Phi-2 tensors, seeded random, streamed one at a time --export_source--> language.q4_0.gguf
        the same at each of --levels (Q3_K_M, ...; IQ2 levels with a uniform importance matrix)
    measure (each mode x level x KV type in its own fresh process, so peak RSS is that run's alone):
        Pipeline(int8 vision, language level[, low_memory], kv_type) -> one image question, greedy
        peak RSS per phase (VmHWM reset between load, vision, language), the KV cache allocated,
        decode tok/s (fewer bytes a token decode faster where memory bandwidth bounds it: a board)
    print one table with the targets (resident 3.2 GB, low-memory 1.4 GB: issue #29)

Random weights give the real sizes and speeds, not meaningful answers; the answer is cut at
`--tokens` (no early separator or EOS stop: `min_new_tokens`-like by ignoring stops is not needed,
random logits rarely produce them). Run from the repository root:

    .venv/bin/python bench/pipeline.py --threads 2            # builds ~3 GB of files in .bench-pipeline/
    .venv/bin/python bench/pipeline.py --vision V.int8.onnx --language L.q4_0.gguf   # files already built
    .venv/bin/python bench/pipeline.py --vision none --levels Q4_0,Q3_K_M --kv-types f16,q8_0 \
        --modes low-memory                                  # the language phase per level and KV type

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
TARGETS = {"resident": 3.2, "low-memory": 1.4}  # GB peak RSS (low-memory: issue #29, two-gigabyte boards)


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


def build_language(work: Path, say, level: str = "Q4_0") -> Path:
    import torch

    from tinygptv_edge.export.checkpoints.tokenizer_train import train_bpe
    from tinygptv_edge.export.gguf.export import canonical_to_gguf, export_source
    from tinygptv_edge.export.gguf.source import LanguageSource, expected_shapes
    from tinygptv_edge.runtime.config import full_config
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    out = work / f"language.{level.lower()}.gguf"
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
    imatrix = None
    if level.startswith("IQ2"):  # its IQ2_S weights need one: uniform (random weights prefer no column)
        names = canonical_to_gguf(cfg.language.layers)
        imatrix = {names[n]: np.ones(s[-1], np.float32) for n, s in shapes.items() if len(s) == 2}
        imatrix.pop("token_embd.weight", None)
    say(f"language: writing {level} GGUF")
    export_source(src, out, level, imatrix=imatrix, progress=lambda *a: None)
    return out


def _reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux: "5" to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args: list[str]) -> None:
    """One (mode, level, KV type) in a fresh process; JSON on stdout. Imports no torch.

    Phases, each with its own peak RSS (VmHWM reset between them where the kernel allows, else the
    peaks are cumulative): load (the Pipeline), vision (the image encoded, into the image cache),
    language (the question answered from the cached image: prefill and decode). Without a vision
    model the question is text only, padded to about a turn's prompt positions."""
    vision, language, image, low, threads, tokens, kv_type = args
    from tinygptv_edge.runtime.memory import peak_rss_bytes, rss_bytes
    from tinygptv_edge.runtime.pipeline import Pipeline
    from tinygptv_edge.runtime.sampling import SamplingConfig

    has_vision = vision != "-"
    t0 = time.perf_counter()
    pipe = Pipeline(
        vision if has_vision else None,
        language,
        n_threads=int(threads) or None,
        low_memory=low == "1",
        kv_type=kv_type,
    )  # default n_ctx of the mode
    load_s = time.perf_counter() - t0
    peaks = {"load": peak_rss_bytes() / GB}
    rss_loaded = rss_bytes()
    resets = _reset_peak()
    question = "Describe this image in detail."
    if has_vision:
        pipe.embed_image(image)
        peaks["vision"] = peak_rss_bytes() / GB
        resets = _reset_peak() and resets
    else:  # about the positions of an image turn (32 image tokens + the template) as text
        question = " ".join(["Describe the picture in every detail, please."] * 6)
    ans = pipe.ask(question, image if has_vision else None, SamplingConfig(max_new_tokens=int(tokens)))
    peaks["language"] = peak_rss_bytes() / GB
    t = ans.timings
    decoder = pipe.prefix.decoder
    out = {
        "load_s": load_s,
        "rss_loaded_gb": rss_loaded / GB,
        "peak_rss_gb": max(peaks.values()),
        "peaks_gb": peaks,
        "peaks_per_phase": resets,
        "image_ms": t.image_ms,
        "first_token_ms": t.first_token_ms,
        "prefill_tok_s": t.prefill_tok_s,
        "decode_tok_s": t.decode_tok_s,
        "new_tokens": len(ans.token_ids),
        "n_ctx": pipe.n_ctx,
        "n_ctx_alloc": getattr(decoder, "n_ctx_alloc", pipe.n_ctx) if decoder is not None else None,
        "kv_bytes": getattr(decoder, "kv_bytes", None) if decoder is not None else None,
        "torch_imported": "torch" in sys.modules,
    }
    print(json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=".bench-pipeline", help="where the full-size files are built (kept)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per answer")
    p.add_argument("--calib", type=int, default=4, help="calibration images for the INT8 vision graph")
    p.add_argument(
        "--vision", help="use this INT8 vision ONNX instead of building one; 'none': the language phase only"
    )
    p.add_argument("--language", help="use this language GGUF instead of building one (one level)")
    p.add_argument("--levels", default="Q4_0", help="comma-separated language levels to build and measure")
    p.add_argument("--kv-types", default="f16", help="comma-separated KV cache types (f16, q8_0, q4_0, f32)")
    p.add_argument("--modes", default="resident,low-memory", help="resident, low-memory or both")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.vision == "none":
        vision = None
    else:
        vision = Path(args.vision) if args.vision else build_vision(work, args.calib, say)
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    if args.language:
        languages = {levels[0]: Path(args.language)}
    else:
        languages = {lv: build_language(work, say, lv) for lv in levels}
    kv_types = [k.strip() for k in args.kv_types.split(",") if k.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    image = _photo(work / "question.jpg", 123)
    rows = {}
    for level, language in languages.items():
        for kv_type in kv_types:
            for mode in modes:
                say(f"measuring {level} {kv_type} {mode}")
                cmd = [sys.executable, __file__, "--child", str(vision or "-"), str(language), str(image)]
                cmd += [
                    "1" if mode == "low-memory" else "0",
                    str(args.threads or 0),
                    str(args.tokens),
                    kv_type,
                ]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr, file=sys.stderr)
                    return 1
                rows[(level, kv_type, mode)] = json.loads(res.stdout.strip().splitlines()[-1])

    vision_bytes = (
        sum(p.stat().st_size for p in (vision, Path(f"{vision}.data")) if p.is_file()) if vision else 0
    )
    what = (
        f"INT8 vision {vision_bytes / GB:.2f} GiB" if vision else "no vision model: the language phase only"
    )
    print(f"\nfull size, random weights, {what}, threads={args.threads}, {args.tokens} tokens")
    print("peak RSS per phase, each from its own reset; KV MiB: the cache allocated (GB: GiB)")
    head = f"{'level':<8}{'GGUF GB':>8}{'kv':>6}{'mode':>12}{'n_ctx':>7}{'alloc':>7}{'KV MiB':>8}"
    print(head + f"{'load':>7}{'vision':>8}{'language':>9}{'peak':>7}{'target':>10}{'decode tok/s':>13}")
    for (level, kv_type, mode), r in rows.items():
        pk, limit = r["peaks_gb"], TARGETS[mode]
        vis = f"{pk['vision']:>8.2f}" if "vision" in pk else f"{'-':>8}"
        kv_mib = (r["kv_bytes"] or 0) / 2**20
        print(
            f"{level:<8}{languages[level].stat().st_size / GB:>8.2f}{kv_type:>6}{mode:>12}{r['n_ctx']:>7}"
            f"{r['n_ctx_alloc']:>7}{kv_mib:>8.1f}{pk['load']:>7.2f}{vis}{pk['language']:>9.2f}"
            f"{r['peak_rss_gb']:>7.2f}{('PASS' if r['peak_rss_gb'] <= limit else 'FAIL') + f' {limit}':>10}"
            f"{r['decode_tok_s'] or 0:>13.2f}"
        )
    if not all(r["peaks_per_phase"] for r in rows.values()):
        print("note: VmHWM could not be reset: each phase's peak includes the phases before it")
    if any(r["torch_imported"] for r in rows.values()):
        print("warning: torch was imported by the runtime")
    return 0


if __name__ == "__main__":
    sys.exit(main())
