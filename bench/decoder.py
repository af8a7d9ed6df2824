"""Decoder speed and memory, side by side with stock llama.cpp (not a test).

    .venv/bin/python bench/decoder.py                       # full size, Q4_0, Q4_K_M, Q8_0, 2 threads
    .venv/bin/python bench/decoder.py --levels Q4_0 --layers 4 --reps 1    # a quick look

Writes two GGUFs of identical dimensions and per-tensor types with random weights: ours
(`tinygptv-phi2`) and a vanilla `phi2` for llama.cpp (llama-cpp-python, the `bench` extra). Each side
runs in its own subprocess (the two ship different builds of libggml): prompt processing of
`--pp` tokens in one batch, then `--tg` single-token steps, then `--tg` steps again with `--long`
positions cached (1500); best of `--reps`. Both sides run under the same OpenMP settings (the
runtime's defaults, or `--omp-env`). Ours runs twice, with
prompt batches through runtime/language/kernels/ (matmuls, and attention on x86: the default) and through
ggml's own kernels (`kquant=False`),
also on the short prompts of `--pp-short`; without llama-cpp-python only that comparison prints.
llama.cpp runs with flash attention off and on, and each ratio is taken against its faster setting.
Also prints each side's effective weight bandwidth (2-D weight bytes x generated tok/s) beside a
measured memory copy, peak RSS against weights +
KV cache, and (with --omp) our generation speed under OpenMP settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinygptv_edge.runtime.language.ggml_runtime import OMP_DEFAULTS, OMP_KEYS
from tinygptv_edge.runtime.memory import peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 51200
# random weights: every quant block gets a sane fp16 scale (byte offset of d / dmin in the block)
SCALE_FIELDS = {"Q4_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,)}


# ---------------------------------------------------------------------------------------------
# random GGUFs (export extra: gguf, the exporter's type table and tokenizer tables)
# ---------------------------------------------------------------------------------------------
def write_models(out: Path, level: str, layers: int) -> tuple[Path, Path]:
    from gguf import GGMLQuantizationType, GGUFWriter

    from tinygptv_edge.export.checkpoints.tokenizer_train import train_bpe
    from tinygptv_edge.export.gguf.meta import write_metadata
    from tinygptv_edge.export.gguf.quant import choose_type, get_level, row_nbytes
    from tinygptv_edge.runtime import contract as C
    from tinygptv_edge.runtime.config import full_config
    from tinygptv_edge.runtime.language.ggml_types import GGML_TYPES
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    cfg = full_config()
    cfg = cfg.replace(language=dataclasses.replace(cfg.language, layers=layers))
    L, lv = cfg.language, get_level(level)
    ours, theirs = out / f"ours.{level}.L{layers}.gguf", out / f"phi2.{level}.L{layers}.gguf"
    if ours.exists() and theirs.exists():
        return ours, theirs
    tok = Tokenizer(train_bpe(1000))
    rng = np.random.default_rng(0)
    cache: dict[tuple, np.ndarray] = {}

    def data(name: str, shape: tuple[int, ...]):
        q = choose_type(lv, name, shape, L.layers)
        key = (q, shape)
        if key not in cache:
            if q == GGMLQuantizationType.F32:
                arr = (1.0 if name.endswith("norm.weight") else 0.02) * rng.standard_normal(shape, np.float32)
                if name.endswith("norm.weight"):
                    arr = np.abs(arr)
            elif q == GGMLQuantizationType.F16:
                arr = (0.02 * rng.standard_normal(shape)).astype(np.float16)
            else:
                arr = rng.integers(0, 256, (shape[0], row_nbytes(q, shape[1])), dtype=np.uint8)
                blk = GGML_TYPES[int(q)].nbytes
                v = arr.reshape(shape[0], -1, blk)
                for off in SCALE_FIELDS[q.name]:
                    v[..., off : off + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
            cache[key] = arr
        return cache[key], q

    # GGUF name -> numpy shape (rows, n_per_row)
    shapes = C.language_shapes(L.layers, L.hidden, L.intermediate, L.vocab_size, L.heads)

    for path, arch in ((ours, C.GGUF_ARCH), (theirs, "phi2")):
        tmp = path.with_suffix(".tmp")
        w = GGUFWriter(str(tmp), arch)
        if arch == C.GGUF_ARCH:
            write_metadata(w, cfg, tok, lv, {})
        else:
            _phi2_metadata(w, cfg, tok, lv)
        for name, shape in shapes.items():
            if arch == "phi2" and any(s in name for s in ("q_norm", "k_norm", "post_norm")):
                continue
            arr, q = data(name, shape)
            w.add_tensor(name, arr, raw_dtype=q if arr.dtype == np.uint8 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.rename(path)
    return ours, theirs


def _phi2_metadata(w, cfg, tok, lv) -> None:
    """llama.cpp's `phi2` keys (src/llama-arch.cpp names) and the same tokenizer tables."""
    from gguf import GGUFValueType as T

    from tinygptv_edge.export.gguf.meta import tokenizer_tables

    L = cfg.language
    for key, value in {
        "context_length": L.max_positions,
        "embedding_length": L.hidden,
        "feed_forward_length": L.intermediate,
        "block_count": L.layers,
        "attention.head_count": L.heads,
        "attention.head_count_kv": L.heads,
        "rope.dimension_count": L.rotary_dim,
    }.items():
        w.add_uint32(f"phi2.{key}", value)
    w.add_float32("phi2.attention.layer_norm_epsilon", L.layer_norm_eps)
    w.add_float32("phi2.rope.freq_base", L.rope_theta)
    w.add_uint32("general.file_type", int(lv.file_type))
    tt = tokenizer_tables(tok, L.vocab_size)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.add_array("tokenizer.ggml.tokens", tt.tokens)
    w.add_key_value("tokenizer.ggml.token_type", tt.types, T.ARRAY, sub_type=T.INT32)
    w.add_array("tokenizer.ggml.merges", tt.merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", tt.bos_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", tt.eos_id)


# ---------------------------------------------------------------------------------------------
# workers (one per subprocess)
# ---------------------------------------------------------------------------------------------
def worker_ours(a) -> dict:
    from tinygptv_edge.runtime.language.decoder import Decoder

    t0 = time.perf_counter()
    dec = Decoder(a.model, n_ctx=a.ctx, n_threads=a.threads, kquant=not a.no_kquant)
    load = time.perf_counter() - t0
    ids = np.random.default_rng(1).integers(0, 50000, max(a.pp, a.long) + a.tg).tolist()
    best_pp = best_tg = best_long = float("inf")
    short = {n: float("inf") for n in a.pp_short}
    for _ in range(a.reps):
        for n in short:  # the short batches a server evaluates: a new question, an image and its question
            dec.reset()
            t0 = time.perf_counter()
            dec.eval_tokens(ids[:n])
            short[n] = min(short[n], time.perf_counter() - t0)
        dec.reset()
        t0 = time.perf_counter()
        dec.eval_tokens(ids[: a.pp])
        best_pp = min(best_pp, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for t in ids[a.pp : a.pp + a.tg]:
            dec.eval_tokens([t])
        best_tg = min(best_tg, time.perf_counter() - t0)
        if a.long:  # generation with `long` positions cached
            dec.reset()
            dec.eval_tokens(ids[: a.long])
            t0 = time.perf_counter()
            for t in ids[a.long : a.long + a.tg]:
                dec.eval_tokens([t])
            best_long = min(best_long, time.perf_counter() - t0)
    out = {
        "load_s": load,
        "pp_tok_s": a.pp / best_pp,
        "tg_tok_s": a.tg / best_tg,
        **({"tg_long_tok_s": a.tg / best_long} if a.long else {}),
        **{f"pp{n}_tok_s": n / t for n, t in short.items()},
        "peak_rss": peak_rss_bytes(),
        "weight_bytes": dec.weight_bytes,
        "kv_bytes": dec.kv_bytes,
        "repacked": len(dec.repacked),
        "kquant": len(dec._w.kquant),
        "matmul_bytes": sum(
            t.nbytes for n, t in dec._gf.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight"
        ),
        "omp": {k: os.environ[k] for k in OMP_KEYS if k in os.environ},
    }
    dec.close()
    return out


def worker_llama(a) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        model_path=str(a.model),
        n_ctx=a.ctx,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_batch=max(a.pp, 512),
        n_ubatch=max(a.pp, 512),
        flash_attn=a.flash_attn,
        verbose=False,
    )
    load = time.perf_counter() - t0
    ids = np.random.default_rng(1).integers(0, 50000, max(a.pp, a.long) + a.tg).tolist()
    best_pp = best_tg = best_long = float("inf")
    for _ in range(a.reps):
        llm.reset()
        llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
        t0 = time.perf_counter()
        llm.eval(ids[: a.pp])
        best_pp = min(best_pp, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for t in ids[a.pp : a.pp + a.tg]:
            llm.eval([t])
        best_tg = min(best_tg, time.perf_counter() - t0)
        if a.long:
            llm.reset()
            llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
            llm.eval(ids[: a.long])
            t0 = time.perf_counter()
            for t in ids[a.long : a.long + a.tg]:
                llm.eval([t])
            best_long = min(best_long, time.perf_counter() - t0)
    return {
        "load_s": load,
        "pp_tok_s": a.pp / best_pp,
        "tg_tok_s": a.tg / best_tg,
        **({"tg_long_tok_s": a.tg / best_long} if a.long else {}),
        "peak_rss": peak_rss_bytes(),
        "matmul_bytes": _matmul_bytes(a.model),
        "omp": {k: os.environ[k] for k in OMP_KEYS if k in os.environ},
    }


def _matmul_bytes(path: Path) -> int:
    """Bytes of the 2-D weights a one-token step reads (all but the embedding table's lookup)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors if len(t.shape) == 2 and t.name != "token_embd.weight")


def memcpy_gbs(nbytes: int = 1 << 29, reps: int = 5) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def run_worker(kind: str, model: Path, a, env: dict | None = None) -> dict:
    worker, extra = {"llama-fa": ("llama", ["--flash-attn"]), "ours-ggml": ("ours", ["--no-kquant"])}.get(
        kind, (kind, [])
    )
    extra += ["--pp-short", ",".join(map(str, a.pp_short))] if worker == "ours" else []
    cmd = [sys.executable, __file__, "--worker", worker, "--model", str(model), *extra]
    cmd += ["--threads", str(a.threads), "--ctx", str(a.ctx), "--pp", str(a.pp), "--tg", str(a.tg)]
    cmd += ["--reps", str(a.reps), "--long", str(a.long)]
    base = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    # both sides under the runtime's OpenMP defaults (llama.cpp also runs on OpenMP), unless `env`
    env = {**base, **(a.omp_env or OMP_DEFAULTS if env is None else env)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        return {"error": f"exit {res.returncode}: {res.stderr.strip()[-800:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _best(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    best = dict(ok[0])
    for key in [k for k in best if k.endswith("_tok_s")]:
        best[key] = max(r[key] for r in ok)
    best["peak_rss"] = max(r["peak_rss"] for r in ok)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", nargs="+", default=["Q4_0", "Q4_K_M", "Q8_0"])
    p.add_argument("--layers", type=int, default=32, help="fewer for a quick look (full size: 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--pp", type=int, default=128)
    p.add_argument(
        "--pp-short",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[22, 58],
        help="also time these short prompts (ours only): a server's new question, image + question",
    )
    p.add_argument("--no-kquant", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tg", type=int, default=64)
    p.add_argument(
        "--long", type=int, default=1500, help="also time generation with this many positions cached (0: off)"
    )
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tinygptv-bench"))
    p.add_argument("--omp", action="store_true", help="also time our generation under OpenMP settings")
    p.add_argument(
        "--omp-env",
        type=lambda v: dict(kv.split("=", 1) for kv in v.split(",") if kv),
        default=None,
        help="OpenMP variables for both sides, K=V,K=V (default: the runtime's, OMP_DEFAULTS)",
    )
    p.add_argument("--worker", choices=["ours", "llama"], help=argparse.SUPPRESS)
    p.add_argument("--flash-attn", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker_ours(a) if a.worker == "ours" else worker_llama(a)))
        return

    a.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"threads {a.threads}, ctx {a.ctx}, pp {a.pp}, tg {a.tg}, long {a.long}, layers {a.layers}, "
        f"best of {a.reps}, OpenMP (both sides) {a.omp_env or OMP_DEFAULTS}"
    )
    print(f"load average now: {os.getloadavg()[0]:.1f} (other jobs on this machine skew both sides)")
    bw = memcpy_gbs()
    print(f"memory copy: {bw:.1f} GB/s")
    for level in a.levels:
        ours, theirs = write_models(a.workdir, level, a.layers)
        # alternate the two sides, one repetition per process, and keep each side's best: the load
        # from other jobs on a shared machine changes over minutes
        one = argparse.Namespace(**{**vars(a), "reps": 1})
        # llama.cpp twice: flash attention off (llama-cpp-python's default) and on (llama.cpp's own
        # default on CPU, and what our graph uses); each metric is compared with its faster setting
        # ours twice: prompt batches through our kernels (the default) and through ggml's own kernels
        runs: dict[str, list[dict]] = {"ours": [], "ours-ggml": [], "llama": [], "llama-fa": []}
        for _ in range(a.reps):
            for kind in runs:
                runs[kind].append(run_worker(kind, theirs if kind.startswith("llama") else ours, one))
        best = {k: _best(v) for k, v in runs.items()}
        r_ours, r_ggml = best["ours"], best["ours-ggml"]
        print(f"\n== {level} ==")
        if "error" in r_ours or "error" in r_ggml:
            print("\n".join(f"{k}: {r}" for k, r in best.items()))
            continue
        for n in [*a.pp_short, a.pp]:
            key = f"pp{n}_tok_s" if n in a.pp_short else "pp_tok_s"
            print(
                f"prompt {n:3d} tok/s       ours     {r_ours[key]:7.2f}   "
                f"ggml's kernels {r_ggml[key]:7.2f}   ratio {r_ours[key] / r_ggml[key]:.3f}"
            )
        print(
            f"generation tok/s      ours     {r_ours['tg_tok_s']:7.2f}   "
            f"ggml's kernels {r_ggml['tg_tok_s']:7.2f}   ratio {r_ours['tg_tok_s'] / r_ggml['tg_tok_s']:.3f} "
            "(one-token steps: ggml's gemv both times; attention: the kernels' one-query op vs ggml's)"
        )
        if any("error" in best[k] for k in ("llama", "llama-fa")):
            print(f"llama.cpp: {best['llama'].get('error', best['llama-fa'].get('error'))[-200:]}")
            continue
        r_llama = {}
        keys = [("pp_tok_s", f"prompt {a.pp} tok/s"), ("tg_tok_s", f"generation {a.tg} tok/s")]
        keys += [("tg_long_tok_s", f"gen. at {a.long} cached")] if a.long else []
        for key, label in keys:
            off, on = best["llama"][key], best["llama-fa"][key]
            r_llama[key] = max(off, on)
            ratio = r_ours[key] / r_llama[key]
            print(
                f"{label:22s} ours {r_ours[key]:7.2f}   llama.cpp {off:7.2f} (flash attn off) "
                f"{on:7.2f} (on)   ratio to the faster {ratio:.3f}"
            )
        print(f"weights               {r_ours['repacked']} repacked, {r_ours['kquant']} on our kernels")
        r_llama["matmul_bytes"] = best["llama"]["matmul_bytes"]
        r_llama["peak_rss"] = best["llama"]["peak_rss"]
        r_llama["load_s"] = best["llama"]["load_s"]
        eff = r_ours["matmul_bytes"] * r_ours["tg_tok_s"] / 1e9
        eff_l = r_llama["matmul_bytes"] * r_llama["tg_tok_s"] / 1e9
        print(
            f"weight bandwidth      ours {eff:.1f} GB/s ({eff / bw:.0%}), llama.cpp {eff_l:.1f} GB/s "
            f"({eff_l / bw:.0%}) of {bw:.1f} GB/s memory copy (2-D weights read per generated token)"
        )
        need = r_ours["weight_bytes"] + r_ours["kv_bytes"]
        print(
            f"peak RSS              ours {r_ours['peak_rss'] / 2**20:.0f} MiB, weights + KV "
            f"{need / 2**20:.0f} MiB -> overhead {r_ours['peak_rss'] / need - 1:+.1%}; "
            f"llama.cpp {r_llama['peak_rss'] / 2**20:.0f} MiB"
        )
        print(f"load s                ours {r_ours['load_s']:.1f}   llama.cpp {r_llama['load_s']:.1f}")
        if a.omp:
            for env in (
                {"OMP_PROC_BIND": "false"},  # OpenMP's default: unbound, spinning
                {"OMP_PROC_BIND": "true"},
                {"OMP_WAIT_POLICY": "passive"},  # the runtime's default before 2026-12-07
                {"OMP_PROC_BIND": "true", "OMP_WAIT_POLICY": "passive"},
                {"GOMP_SPINCOUNT": "1000"},
                {"GOMP_SPINCOUNT": "10000"},
                {"GOMP_SPINCOUNT": "100000"},
            ):
                r = run_worker("ours", ours, argparse.Namespace(**{**vars(a), "pp": 16, "reps": 1}), env)
                print(f"omp {env}: generation {r.get('tg_tok_s', float('nan')):.2f} tok/s")


if __name__ == "__main__":
    main()
