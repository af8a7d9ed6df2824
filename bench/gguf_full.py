"""Full-size GGUF export: wall time, peak RSS and file size per level, measured side by side.

    python bench/gguf_full.py --work /tmp/gguf-bench [--levels F16 Q8_0 Q4_0 Q4_K_M] [--threads N]

Writes a full-size (Phi-2 dimensions) single-checkpoint folder holding only the language model with
random fp16 weights (5.6 GB; written tensor by tensor, so building it needs little RAM), then exports
each level in a fresh process (so each peak RSS is its own) from that folder, streamed.
Each export includes the source sha256, the write and the full verification. Delete --work afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from tinygptv_edge.export.gguf.export import export_source
from tinygptv_edge.export.gguf.source import single_source
from tinygptv_edge.runtime.memory import peak_rss_bytes
folder, out, level, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) or None
t0 = time.perf_counter()
report = export_source(single_source(folder), out, level, threads=threads)
print(json.dumps({
    "seconds": time.perf_counter() - t0,
    "peak_rss_gib": peak_rss_bytes() / 2**30,
    "file_gib": report.nbytes / 2**30,
    "types": report.type_counts(),
}))
"""


def write_language_folder(folder: Path, seed: int = 0) -> None:
    """config.json, tokenizer, and model.safetensors (fp16, `llama_model.*` only), streamed to disk."""
    import numpy as np
    import torch

    from tinygptv_edge.export.checkpoints import names as N
    from tinygptv_edge.export.checkpoints.tokenizer_train import save_tokenizer, train_bpe
    from tinygptv_edge.export.gguf.source import expected_shapes
    from tinygptv_edge.runtime.config import full_config

    cfg = full_config()
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save(folder / "config.json")
    save_tokenizer(train_bpe(50295), folder, max_length=cfg.language.max_positions)
    L = cfg.language
    official = {v: k for k, v in {**N.expand(N.PHI_GLOBAL), **N.expand(N.PHI_LAYER, range(L.layers))}.items()}
    shapes = expected_shapes(L)
    header, offset = {}, 0
    for canonical, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[N.SINGLE_LM_PREFIX + official[canonical]] = {
            "dtype": "F16",
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for canonical, shape in shapes.items():
            norm_weight = "norm" in canonical and canonical.endswith(".weight")
            std, mean = (0.05, 1.0) if norm_weight else (0.02, 0.0)
            t = torch.randn(shape, generator=g) * std + mean
            f.write(t.half().numpy().tobytes())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="scratch folder (about 5.6 GB + the largest GGUF)")
    ap.add_argument("--levels", nargs="+", default=["F16", "Q8_0", "Q4_0", "Q4_K_M"])
    ap.add_argument("--threads", type=int, default=0, help="quantizer threads (0: CPU count, at most 16)")
    args = ap.parse_args()
    work = Path(args.work)
    folder = work / "language-full"
    if not (folder / "model.safetensors").is_file():
        t0 = time.perf_counter()
        write_language_folder(folder)
        print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    f16_gib = (folder / "model.safetensors").stat().st_size / 2**30
    print(f"source: fp16 language model {f16_gib:.2f} GiB (2x = {2 * f16_gib:.1f} GiB)")
    print(f"{'level':8} {'time s':>8} {'peak RSS GiB':>13} {'RSS / F16 model':>16} {'file GiB':>9}  types")
    for level in args.levels:
        out = work / f"language.{level.lower()}.gguf"
        cmd = [sys.executable, "-c", CHILD, str(folder), str(out), level, str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{level}: failed\n{res.stderr[-2000:]}")
            return 1
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"{level:8} {r['seconds']:8.0f} {r['peak_rss_gib']:13.2f} {r['peak_rss_gib'] / f16_gib:16.2f} "
            f"{r['file_gib']:9.2f}  {r['types']}",
            flush=True,
        )
        out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
