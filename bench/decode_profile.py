"""Where a decode step's time goes (not a test): `perf` samples of one-token steps, grouped by kind.

    .venv/bin/python bench/decode_profile.py                      # full size Q4_0, ctx 128, 2 threads
    .venv/bin/python bench/decode_profile.py --level Q4_K_M --ctx 1500 --env GOMP_SPINCOUNT=10000

Runs in a child process: a Decoder on bench/decoder.py's random full-size GGUF (written once in
--workdir), `--ctx` prompt positions evaluated first, then `--tg` one-token steps under
`perf record` (user and kernel samples, every thread). Prints the share of samples per group
(weights' gemv by type, the quantization of the activations, attention, norms, rope, element-wise ops,
OpenMP barriers and thread wake-ups, the kernel's scheduler and futexes, Python, other) and the top
symbols, with the wall time per step measured outside perf. `--env K=V` sets OpenMP variables for the
child (the runtime's default otherwise: OMP_DEFAULTS in runtime/language/ggml_runtime.py).

Needs `perf` (linux-perf) and permission to sample (root, or kernel.perf_event_paranoid <= 1).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# (group, regex over "dso symbol"): the first match names a sample's group
GROUPS = [
    ("gemv Q4_0 (repacked 8x8)", r"gemv_q4_0_8x8"),
    ("gemv Q4_K (repacked 8x8)", r"gemv_q4_K_8x8"),
    ("gemv Q4_0 (plain rows)", r"vec_dot_q4_0_q8_0"),
    ("gemv Q4_K (plain rows)", r"vec_dot_q4_K_q8_K"),
    ("gemv Q5_K", r"vec_dot_q5_K_q8_K"),
    ("gemv Q6_K", r"vec_dot_q6_K_q8_K"),
    ("gemv Q8_0", r"vec_dot_q8_0_q8_0|gemv_q8_0"),
    ("gemv other", r"gemv|vec_dot_(?!f16)"),
    ("quantize activations", r"quantize_row_q8|quantize_mat_q8|ggml_cpu_fp32_to"),
    ("our kernels (_native)", r"_native"),
    ("attention", r"flash_attn|soft_max|vec_dot_f16|vec_mad_f16|ggml_vec_dot_f16|kq_attn"),
    ("norms", r"forward_norm|rms_norm"),
    ("rope", r"rope"),
    (
        "element-wise (add, mul, gelu, set_rows, cpy, pad)",
        r"forward_(add|mul|gelu|set_rows|cpy|dup|pad|get_rows)|vec_(add|mul|gelu)"
        r"|binary_op|unary_op|apply_binary|apply_unary",
    ),
    ("OpenMP barrier / spin (libgomp)", r"libgomp"),
    # ggml-python's libggml-cpu is stripped: its static functions show as addresses; on x86 the hot
    # ones are the repacked gemv (arch/x86/repack.cpp: vpdpbusd over the 8x8 Q4_0 / Q4_K layout)
    ("ggml-cpu, unnamed (x86: the repacked Q4_0 / Q4_K gemv)", r"libggml-cpu\.so\s+0x"),
    ("graph walk (ggml-cpu, other)", r"ggml_graph_compute|ggml_compute_forward|ggml_barrier"),
    ("kernel: futex / scheduler / idle", r"\[kernel|futex|schedule|do_syscall|entry_SYSCALL|native_queued"),
    ("Python", r"python|libpython|_PyEval|PyObject|numpy|_multiarray"),
]


def child(a) -> None:
    from tinygptv_edge.runtime.language.decoder import Decoder

    dec = Decoder(a.model, n_ctx=max(2048, a.ctx + a.tg + 8), n_threads=a.threads)
    ids = np.random.default_rng(1).integers(0, 50000, a.ctx + 2 * a.tg).tolist()
    dec.eval_tokens(ids[: a.ctx])
    for t in ids[a.ctx : a.ctx + 4]:  # warm: graphs built
        dec.eval_tokens([t])
    dec.truncate(a.ctx)
    Path(a.ready).write_text("ready")
    while not Path(a.go).exists():
        time.sleep(0.01)
    t0 = time.perf_counter()
    for t in ids[a.ctx : a.ctx + a.tg]:
        dec.eval_tokens([t])
    print(f"ms_per_step {(time.perf_counter() - t0) / a.tg * 1e3:.2f}", flush=True)
    dec.close()


def group_of(line: str) -> str:
    for name, rx in GROUPS:
        if re.search(rx, line):
            return name
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--level", default="Q4_0")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=128, help="positions in the cache before the timed steps")
    p.add_argument("--tg", type=int, default=48, help="one-token steps sampled")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tinygptv-bench"))
    p.add_argument("--env", action="append", default=[], help="K=V for the child (OpenMP settings)")
    p.add_argument("--top", type=int, default=25, help="symbols listed")
    p.add_argument("--child", nargs=2, metavar=("READY", "GO"), help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.ready, a.go = a.child
        child(a)
        return 0

    sys.path.insert(0, str(Path(__file__).parent))
    from decoder import write_models  # bench/decoder.py: the same random full-size GGUFs

    a.workdir.mkdir(parents=True, exist_ok=True)
    model, _ = write_models(a.workdir, a.level, a.layers)
    env = dict(os.environ)
    for kv in a.env:
        k, _, v = kv.partition("=")
        env[k] = v
    with tempfile.TemporaryDirectory() as tmp:
        ready, go, data = Path(tmp, "ready"), Path(tmp, "go"), Path(tmp, "perf.data")
        cmd = [sys.executable, __file__, "--child", str(ready), str(go), "--model", str(model)]
        cmd += ["--threads", str(a.threads), "--ctx", str(a.ctx), "--tg", str(a.tg)]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        while not ready.exists():
            if proc.poll() is not None:
                print("child failed", file=sys.stderr)
                return 1
            time.sleep(0.05)
        perf = subprocess.Popen(
            ["perf", "record", "-F", "2999", "-q", "-o", str(data), "-p", str(proc.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # perf attached
        go.write_text("go")
        out, _ = proc.communicate()
        perf.wait()
        ms = float(out.split()[-1])
        rep = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol", "--stdio", "-q"],
            capture_output=True,
            text=True,
        ).stdout
    groups: Counter[str] = Counter()
    symbols: list[tuple[float, str]] = []
    for line in rep.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)", line)
        if not m:
            continue
        share, dso, sym = float(m.group(1)), m.group(2), m.group(3).strip()
        groups[group_of(f"{dso} {sym}")] += share
        symbols.append((share, f"{dso:28.28s} {sym[:70]}"))
    print(
        f"{a.level}, {a.layers} layers, {a.threads} threads, {a.ctx} cached positions, {a.tg} steps: "
        f"{ms:.2f} ms a step (wall, under perf), env {a.env or 'runtime default'}"
    )
    print(f"load average now: {os.getloadavg()[0]:.1f}")
    for name, share in groups.most_common():
        print(f"  {share:5.1f}%  {share / 100 * ms:6.2f} ms  {name}")
    print("top symbols:")
    for share, s in sorted(symbols, reverse=True)[: a.top]:
        print(f"  {share:5.1f}%  {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
