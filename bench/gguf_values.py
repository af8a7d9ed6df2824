"""What the NaN/inf weight check adds to a decoder load (not a test).

    .venv/bin/python bench/gguf_values.py                  # full-size Q4_0 (~1.6 GB), 2 threads
    .venv/bin/python bench/gguf_values.py --layers 4       # a quick look

Writes a full-size random GGUF (bench/decoder.py's writer: every block has a sane fp16 scale) and
loads it with `Decoder` in fresh subprocesses, alternating checks on and off, best of `--reps` each.
Also reports the CPU seconds spent inside the checks (thread CPU time, in-process), the cleaner
number on a shared machine: wall-time differences carry the noise of everything else running. The
checks of repacked weights run on a worker thread beside ggml's repacking, so on an idle machine
with two cores the wall time they add is below their CPU time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(path: str, checks: bool, threads: int) -> None:
    import threading

    from tinygptv_edge.runtime import decoder as D
    from tinygptv_edge.runtime import gguf_values as V

    cpu, lock = [0.0], threading.Lock()

    def timed(fn):  # CPU seconds of the thread running the check (they run on worker threads)
        def run(*a, **k):
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    cpu[0] += time.thread_time() - t0

        return run

    if checks:
        D.check_bytes, V._scan_one = timed(D.check_bytes), timed(V._scan_one)
    else:
        D.check_bytes = D.check_values = lambda *a, **k: None
    t0, c0 = time.perf_counter(), time.process_time()
    dec = D.Decoder(path, n_ctx=256, n_threads=threads)
    load, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"load_s": load, "load_cpu_s": load_cpu, "check_cpu_s": cpu[0]}))
    dec.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="build/bench-gguf-values")
    ap.add_argument("--level", default="Q4_0")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "CHECKS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], a.child[1] == "1", a.threads)
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    from decoder import write_models

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    path, _ = write_models(work, a.level, a.layers)
    print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB, {a.threads} threads")
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(a.reps):
        for checks in (False, True):
            cmd = [sys.executable, __file__, "--threads", str(a.threads)]
            cmd += ["--child", str(path), str(int(checks))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[checks].append(json.loads(out.strip().splitlines()[-1]))
    for key, label in (("load_s", "load wall"), ("load_cpu_s", "load CPU")):
        off, on = (min(r[key] for r in runs[c]) for c in (False, True))
        print(f"{label}: without checks {off:.3f} s, with {on:.3f} s (best of {a.reps}): {on - off:+.3f} s")
    spent = sorted(round(r["check_cpu_s"], 3) for r in runs[True])
    print(f"CPU seconds inside the checks: {spent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
