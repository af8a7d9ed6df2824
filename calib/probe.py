"""Cost of one level, measured in a fresh process so that peak RSS belongs to that level alone.

    python -m tinygptv_edge.calib.probe vision  FILE.onnx --threads N [--images K]
    python -m tinygptv_edge.calib.probe language FILE.gguf --threads N [--prompt T] [--decode D]

prints one JSON object: load seconds, vision ms/image (median of K after one warm-up), prefill and
decode tokens/s (a T-position prompt, then D greedy single-token steps; median of 3 rounds after
one that builds the graphs), and peak RSS in MiB (runtime/memory.py: VmHWM, as ru_maxrss can carry the
parent's). Only runtime modules are imported (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from tinygptv_edge.runtime.memory import peak_rss_bytes


def probe_vision(path: str, threads: int, images: int) -> dict:
    from tinygptv_edge.runtime.vision.encoder import VisionEncoder

    t0 = time.perf_counter()
    enc = VisionEncoder(path, threads)
    load = time.perf_counter() - t0
    S = enc.preprocess_cfg.image_size
    x = np.random.default_rng(0).standard_normal((1, 3, S, S)).astype(np.float32)
    enc.embed(x)  # warm-up
    ms = []
    for _ in range(images):
        t0 = time.perf_counter()
        enc.embed(x)
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"load_s": load, "ms_per_image": float(np.median(ms)), "peak_rss_mib": peak_rss_bytes() / 2**20}


def probe_language(path: str, threads: int, prompt: int, decode: int, repeats: int = 3) -> dict:
    from tinygptv_edge.runtime.language.decoder import Decoder

    t0 = time.perf_counter()
    dec = Decoder(path, n_ctx=-(-(prompt + decode + 1) // 256) * 256, n_threads=threads)
    load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, dec.n_vocab, size=prompt).tolist()
    prefill, dt = [], []
    for _ in range(repeats + 1):  # the first round builds the graphs and is not counted
        dec.reset()
        t0 = time.perf_counter()
        tok = int(np.argmax(dec.eval_tokens(ids)))
        prefill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(decode):
            tok = int(np.argmax(dec.eval_tokens([tok])))
        dt.append(time.perf_counter() - t0)
    prefill, dt = float(np.median(prefill[1:])), float(np.median(dt[1:]))
    dec.close()
    return {
        "load_s": load,
        "prefill_tok_s": prompt / prefill,
        "decode_tok_s": decode / dt,
        "prompt_tokens": prompt,
        "decode_tokens": decode,
        "peak_rss_mib": peak_rss_bytes() / 2**20,
    }


def run_probe(half: str, path: str, threads: int, timeout: float = 300.0, **kw) -> dict:
    """Run the probe in a child process; {"error": ...} when it fails (the report shows it)."""
    import subprocess

    args = [sys.executable, "-m", "tinygptv_edge.calib.probe", half, str(path), "--threads", str(threads)]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"probe timed out after {timeout:.0f} s"}
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["probe failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_probes(half: str, path: str, threads: int, runs: int = 3, **kw) -> dict:
    """The probe in `runs` fresh processes, one after another: every figure as the median over the runs,
    with its [min, max] under "range" and the count under "runs" (a figure from a single run is never
    rendered as one). The first failure is returned as is."""
    results = []
    for _ in range(runs):
        r = run_probe(half, path, threads, **kw)
        if "error" in r:
            return r
        results.append(r)
    out: dict = {"runs": runs, "range": {}}
    for k in results[0]:
        vals = [r[k] for r in results]
        if all(isinstance(v, (int, float)) for v in vals):
            out[k] = float(np.median(vals))
            out["range"][k] = [float(min(vals)), float(max(vals))]
        else:
            out[k] = vals[0]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinygptv_edge.calib.probe")
    p.add_argument("half", choices=["vision", "language"])
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--prompt", type=int, default=96)
    p.add_argument("--decode", type=int, default=32)
    a = p.parse_args(argv)
    if a.half == "vision":
        out = probe_vision(a.path, a.threads, a.images)
    else:
        out = probe_language(a.path, a.threads, a.prompt, a.decode)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
