"""What the NaN/inf weight check adds to a decoder load (not a test).

    .venv/bin/python bench/gguf_values.py                  # full-size Q4_0 (~1.6 GB), 2 threads
    .venv/bin/python bench/gguf_values.py --layers 4       # a quick look

Writes a full-size random GGUF (bench/decoder.py's writer: every block has a sane fp16 scale) and
loads it with `Decoder` in fresh subprocesses, alternating checks on and off, best of `--reps` each.
Also reports the CPU seconds spent inside the checks (thread CPU time, in-process), the cleaner
number on a shared machine: wall-time differences carry the noise of everything else running.
The check is one pass over the file before any weight is allocated, so a refused file costs no
memory: the bench then copies the file with a NaN scale in the last weight read (the worst case)
and reports the peak RSS of the refusal (target: under 1 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def child(path: str, checks: bool, threads: int) -> None:
    import threading

    from tinygptv_edge.runtime.language import decoder as D
    from tinygptv_edge.runtime.language import gguf_values as V

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
        V._scan_one = timed(V._scan_one)
    else:
        D.check_values = lambda *a, **k: None
    t0, c0 = time.perf_counter(), time.process_time()
    dec = D.Decoder(path, n_ctx=256, n_threads=threads)
    load, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"load_s": load, "load_cpu_s": load_cpu, "check_cpu_s": cpu[0]}))
    dec.close()


def refuse(path: str, threads: int) -> None:
    from tinygptv_edge.runtime.errors import NonFiniteTensorError
    from tinygptv_edge.runtime.language.decoder import Decoder
    from tinygptv_edge.runtime.memory import peak_rss_bytes

    t0 = time.perf_counter()
    try:
        Decoder(path, n_ctx=256, n_threads=threads).close()
        error = None
    except NonFiniteTensorError as e:
        error = str(e)
    print(json.dumps({"refused_s": time.perf_counter() - t0, "peak_rss": peak_rss_bytes(), "error": error}))


def poisoned(path: Path) -> tuple[Path, str]:
    """A copy of `path` with the first block scale of its last-stored quantized weight set to NaN."""
    from tinygptv_edge.runtime.language.gguf_file import GGUFFile
    from tinygptv_edge.runtime.language.gguf_values import FIELDS

    gf = GGUFFile.open(path)
    last = max((t for t in gf.tensors.values() if FIELDS[t.type.name].fp16), key=lambda t: t.offset)
    offset = last.offset + FIELDS[last.type.name].fp16[0]
    gf.close()
    out = path.with_name(path.stem + ".nan-last.gguf")
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        shutil.copyfile(path, tmp)
        with open(tmp, "r+b") as f:
            f.seek(offset)
            f.write(np.float16(np.nan).tobytes())
        tmp.rename(out)
    return out, last.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="build/bench-gguf-values")
    ap.add_argument("--level", default="Q4_0")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "CHECKS"), help=argparse.SUPPRESS)
    ap.add_argument("--refuse", metavar="PATH", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.refuse:
        refuse(a.refuse, a.threads)
        return 0
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
    bad, name = poisoned(path)
    cmd = [sys.executable, __file__, "--threads", str(a.threads), "--refuse", str(bad)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["error"], f"{bad}: loaded, expected a NonFiniteTensorError"
    print(
        f"NaN in {name} (the last weight stored): refused in {r['refused_s']:.3f} s, "
        f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB: {r['error']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
