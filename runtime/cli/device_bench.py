"""`tinygptv-edge bench`: what this machine does with these models (runtime dependencies only).

tinygptv-edge bench                                   # models from dist/, a table
tinygptv-edge bench --vision V.onnx --language L.gguf --threads 4 --json

1. image questions through Pipeline (as `run`), each with a new image, one answer token:
       vision ms/image (load + preprocess + graph), time to first token (cold: the first
       question after loading; warm: the median of the rest), the question's prefill tok/s
2. the decoder alone, fixed counts: prefill of --prompt-tokens ids, then --decode-tokens greedy
   steps (medians of --repeats runs after a warm-up)
3. peak RSS (VmHWM) of 1 and 2; then the memory read bandwidth (runtime/cli/sysinfo.py) and the decode
   ceiling it implies: bytes of weights read per token / bandwidth
plus the CPU features ggml and onnxruntime report, the native kernels' path, the low-memory choice
(`--low-memory auto`: runtime/memory_plan.py) and what fits this board (runtime/memory_fit.py):
MemTotal, MemAvailable, these files' predicted peaks, and every language level's predicted low-memory
peak with each KV type, from this GGUF's header (nothing is exported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .args import add_kv_type_arg, add_model_args, add_runtime_args

DEFAULT_PROMPT = "Describe this image in detail."
MIB = 1024**2


@dataclass(frozen=True)
class DeviceBenchConfig:
    prompt_tokens: int = 128  # decoder prefill batch (clamped to the context)
    decode_tokens: int = 32
    repeats: int = 3  # timed runs per measurement, after one warm-up
    bandwidth_mib: int = 256  # buffer of the bandwidth test (at most a quarter of MemAvailable)

    def __post_init__(self):
        for name in ("prompt_tokens", "decode_tokens", "repeats", "bandwidth_mib"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"bench {name}: expected a positive integer, got {v!r}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure vision, prefill, decode, memory and bandwidth on this machine")
    add_model_args(p)
    p.add_argument("--image", help="image for the questions (default: a generated 640x480 picture)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question asked about each image")
    add_runtime_args(p)
    add_kv_type_arg(p)
    d = DeviceBenchConfig()
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="decoder prefill batch size")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="greedy steps per decode run")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs per measurement")
    p.add_argument("--bandwidth-mib", type=int, default=d.bandwidth_mib, help="bandwidth test buffer")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..pipeline import default_model_paths

    cfg = DeviceBenchConfig(args.prompt_tokens, args.decode_tokens, args.repeats, args.bandwidth_mib)
    vision, language = default_model_paths(args.dist, args.vision, args.language)
    quiet = args.json or not sys.stderr.isatty()
    say = (lambda msg: None) if quiet else (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    result = run_device_bench(
        vision, language, cfg, n_threads=args.threads, n_ctx=args.n_ctx, low_memory=args.low_memory,
        image=args.image, prompt=args.prompt, say=say, kv_type=args.kv_type,
    )  # fmt: skip
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def _photo(seed: int) -> np.ndarray:
    """A 640x480 RGB picture: a gradient, a disc and noise, different for each seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    img = np.stack([xx / 640, yy / 480, 1 - xx * yy / (640 * 480)], -1) * rng.uniform(0.3, 1.0, 3)
    disc = (xx - rng.uniform(100, 540)) ** 2 + (yy - rng.uniform(100, 380)) ** 2 < 80**2
    img[disc] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _images(image: str | None, n: int):
    """n different PIL images: the given one with its corner pixel changed per question (so neither
    the image cache nor the KV prefix is reused), or generated ones."""
    from PIL import Image

    from ..vision.images import load_image

    if image is None:
        return [Image.fromarray(_photo(i)) for i in range(n)]
    base = np.asarray(load_image(image)).copy()
    out = []
    for i in range(n):
        base[0, 0] = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
        out.append(Image.fromarray(base.copy()))
    return out


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def measure_pipeline(
    vision,
    language,
    cfg: DeviceBenchConfig,
    n_threads,
    n_ctx,
    low_memory,
    image,
    prompt,
    kv_type: str = "f16",
) -> dict:
    """Stage 1: image questions through the Pipeline, one answer token each."""
    from ..pipeline import Pipeline
    from ..sampling import GREEDY

    t0 = time.perf_counter()
    # no image cache, no KV snapshots: every run encodes its image and evaluates its whole prompt
    pipe = Pipeline(vision, language, n_ctx=n_ctx, n_threads=n_threads, low_memory=low_memory,
                    image_cache_size=0, cache_ram_mib=0, kv_type=kv_type)  # fmt: skip
    load_s = time.perf_counter() - t0
    runs = []
    with pipe:
        for img in _images(image, cfg.repeats + 1):
            t = pipe.ask(prompt, img, GREEDY.replace(max_new_tokens=1)).timings
            runs.append(t)
        ctx = pipe.n_ctx
    warm = runs[1:]
    return {
        "load_s": load_s,
        "n_ctx": ctx,
        "vision_ms_per_image": _median([t.image_ms for t in warm]),
        "vision_ms_cold": runs[0].image_ms,
        "first_token_ms_cold": runs[0].first_token_ms,
        "first_token_ms": _median([t.first_token_ms for t in warm]),
        "question_prefill_tokens": warm[-1].prefill_tokens,
        "question_prefill_tok_s": _median([t.prefill_tok_s for t in warm]),
    }


def measure_decoder(language, cfg: DeviceBenchConfig, n_threads, n_ctx: int, kv_type: str = "f16") -> dict:
    """Stage 2: the decoder alone (at the pipeline's context): a prefill batch, then greedy steps."""
    from ..language.decoder import Decoder

    with Decoder(language, n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type) as dec:
        room = dec.n_ctx - 1
        n_prompt = max(1, min(cfg.prompt_tokens, room // 2))
        n_decode = max(1, min(cfg.decode_tokens, room - n_prompt))
        ids = np.random.default_rng(0).integers(0, dec.n_vocab, n_prompt).tolist()
        prefill, decode = [], []
        for i in range(cfg.repeats + 1):
            dec.reset()
            t0 = time.perf_counter()
            logits = dec.eval_tokens(ids)
            t1 = time.perf_counter()
            for _ in range(n_decode):
                logits = dec.eval_tokens([int(np.argmax(logits))])
            t2 = time.perf_counter()
            if i:  # the first run builds and caches the graphs
                prefill.append(n_prompt / (t1 - t0))
                decode.append(n_decode / (t2 - t1))
        return {
            "threads": dec.n_threads,
            "prompt_tokens": n_prompt,
            "decode_tokens": n_decode,
            "prefill_tok_s": _median(prefill),
            "decode_tok_s": _median(decode),
            "repacked_weights": len(dec.repacked),
        }


def weight_bytes_per_token(language) -> int:
    """Bytes of the GGUF's tensors a decode step reads: all but the token embedding (one row of it)."""
    from ..language.gguf_file import GGUFFile

    gf = GGUFFile.open(language)
    try:
        return sum(t.nbytes for name, t in gf.tensors.items() if name != "token_embd.weight")
    finally:
        gf.close()


def run_device_bench(
    vision,
    language,
    cfg: DeviceBenchConfig = DeviceBenchConfig(),
    n_threads: int | None = None,
    n_ctx: int | None = None,
    low_memory: str = "auto",
    image: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    say=lambda msg: None,
    kv_type: str = "f16",
) -> dict:
    from ..language.ggml_runtime import load_ggml
    from ..language.kernels import ops as kquant
    from ..memory import peak_rss_bytes, release_heap
    from ..memory_fit import what_fits
    from ..memory_plan import mem_available_bytes, mem_total_bytes, plan_memory
    from .sysinfo import ggml_cpu_features, machine_info, memory_bandwidth, onnxruntime_info

    if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
        raise ConfigError(f"--threads: expected a positive integer, got {n_threads!r}")
    plan = plan_memory(low_memory, vision, language, n_ctx, kv_type=kv_type)
    say(plan.reason)
    fits = what_fits(vision, language, plan.available, mem_total_bytes(), n_ctx, kv_type)
    features = {
        "ggml": ggml_cpu_features(load_ggml()),
        "onnxruntime": onnxruntime_info(),
        "kernel_path": kquant.active_path(),
    }
    say(f"image questions ({cfg.repeats + 1}, low-memory {'on' if plan.low_memory else 'off'})")
    stage1 = measure_pipeline(
        vision, language, cfg, n_threads, n_ctx, plan.low_memory, image, prompt, kv_type
    )
    say(f"decoder: {cfg.repeats + 1} x ({cfg.prompt_tokens} prefill + {cfg.decode_tokens} decode tokens)")
    stage2 = measure_decoder(language, cfg, n_threads, stage1["n_ctx"], kv_type)
    peak = peak_rss_bytes()
    release_heap(collect=True)
    available = mem_available_bytes()
    size = cfg.bandwidth_mib * MIB if available is None else min(cfg.bandwidth_mib * MIB, available // 4)
    say(f"memory bandwidth ({size // MIB} MiB, {stage2['threads']} threads)")
    bw = memory_bandwidth(stage2["threads"], max(size, MIB), repeats=cfg.repeats + 2)
    per_token = weight_bytes_per_token(language)
    ceiling = bw["read_bytes_s"] / per_token
    return {
        "machine": machine_info(),
        "features": features,
        "models": {
            "vision": str(vision),
            "vision_bytes": plan.vision_bytes,
            "language": str(language),
            "language_bytes": Path(language).stat().st_size,
            "weight_bytes_per_token": per_token,
        },
        "memory": {
            "mode": plan.mode,
            "low_memory": plan.low_memory,
            "reason": plan.reason,
            "available_bytes": plan.available,
            "resident_need_bytes": plan.resident_need,
            "low_memory_need_bytes": plan.low_memory_need,
            "peak_rss_bytes": peak,
        },
        "fits": fits,
        "settings": {
            **asdict(cfg),
            "threads": stage2["threads"],
            "n_ctx": stage1["n_ctx"],
            "kv_type": kv_type,
        },
        "results": {
            **{k: v for k, v in stage1.items() if k != "n_ctx"},
            **{k: v for k, v in stage2.items() if k not in ("threads", "prompt_tokens", "decode_tokens")},
            "prefill_batch_tokens": stage2["prompt_tokens"],
            "decode_run_tokens": stage2["decode_tokens"],
            "bandwidth_bytes_s": bw["read_bytes_s"],
            "bandwidth_buffer_bytes": bw["buffer_bytes"],
            "decode_ceiling_tok_s": ceiling,
            "decode_vs_ceiling": stage2["decode_tok_s"] / ceiling,
        },
    }


def format_table(r: dict) -> str:
    m, res, mem, f = r["machine"], r["results"], r["memory"], r["features"]
    gib, mib = 1024**3, MIB
    on = sorted(k for k, v in f["ggml"].items() if v)
    ort = f["onnxruntime"]
    peak = mem["peak_rss_bytes"]
    vendor = f", {ort['cpu_vendor']}" if "cpu_vendor" in ort else ""
    rows = [
        ("machine", f"{m['cpu']} ({m['machine']}, {m['cores']} cores), {m['system']}"),
        ("ggml CPU features", ", ".join(on) or "none"),
        ("onnxruntime", f"{ort['version']} {ort['device']}{vendor}"),
        ("native kernel path", str(f["kernel_path"])),
        ("memory", mem["reason"]),
        ("threads / n_ctx", f"{r['settings']['threads']} / {r['settings']['n_ctx']}"),
        ("load models", f"{res['load_s']:.2f} s"),
        ("vision", f"{res['vision_ms_per_image']:.1f} ms/image (first {res['vision_ms_cold']:.1f} ms)"),
        ("time to first token",
         f"{res['first_token_ms']:.1f} ms (first question {res['first_token_ms_cold']:.1f} ms)"),
        ("question prefill",
         f"{res['question_prefill_tok_s']:.1f} tok/s ({res['question_prefill_tokens']} tokens)"),
        ("prefill", f"{res['prefill_tok_s']:.1f} tok/s (batch of {res['prefill_batch_tokens']})"),
        ("decode", f"{res['decode_tok_s']:.2f} tok/s ({res['decode_run_tokens']} tokens)"),
        ("peak RSS", "unknown" if peak is None else f"{peak / mib:.0f} MiB"),
        ("memory read bandwidth", f"{res['bandwidth_bytes_s'] / 1e9:.2f} GB/s"),
        ("weights read per token", f"{r['models']['weight_bytes_per_token'] / mib:.1f} MiB"),
        ("decode ceiling",
         f"{res['decode_ceiling_tok_s']:.1f} tok/s (measured: {100 * res['decode_vs_ceiling']:.0f}% of it)"),
    ]  # fmt: skip
    if mem["available_bytes"] is not None:
        rows.insert(5, ("available memory", f"{mem['available_bytes'] / gib:.2f} GiB"))
    rows += fits_rows(r["fits"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def fits_rows(f: dict) -> list[tuple[str, str]]:
    """What fits this board: these files, then every language level, against MemAvailable."""
    from ..memory_plan import format_size

    def verdict(ok: bool | None) -> str:
        return "MemAvailable unknown" if ok is None else "fits" if ok else "does not fit"

    total, avail = f["mem_total_bytes"], f["mem_available_bytes"]
    rows = [
        ("MemTotal / MemAvailable",
         f"{'unknown' if total is None else format_size(total)} / "
         f"{'unknown' if avail is None else format_size(avail)}"),
        ("these files, resident",
         f"predicted peak {format_size(f['resident_need_bytes'])} (KV {f['kv_type']}): "
         f"{verdict(f['fits_resident'])}"),
        ("these files, low-memory",
         f"predicted peak {format_size(f['low_memory_need_bytes'])}: {verdict(f['fits_low_memory'])}"),
        ("--low-memory auto picks", f"{f['auto_mode']} mode"),
    ]  # fmt: skip
    for lv in f["levels"]:
        peaks = ", ".join(
            f"KV {kv} {format_size(p)} {verdict(lv['fits'][kv])}"
            for kv, p in lv["low_memory_peak_bytes"].items()
        )
        rows.append((f"{lv['level']} ({format_size(lv['language_bytes'])})", f"low-memory peak: {peaks}"))
    return rows
