"""Measure the verification bounds of export/gguf/quant.py `BOUNDS` for ggml types (as `Bound` says).

Rows: Gaussian, Student-t (3 dof), uniform and Gaussian with a few 20x outliers, scaled 1e-3..4;
importance: uniform random, log-normal, half of the columns zero, and a few outlier channels. Each
type is quantized by ggml (`quantize`, as the exporter does) and dequantized by gguf-py (as the
verification does). Prints, per type, the worst per-row max |err| / row max |x| (no imatrix), the
floor that covers the smallest scale, and the worst imatrix-weighted relative RMS; the table takes
about twice each.

    .venv/bin/python bench/quant_bounds.py Q2_K Q3_K IQ4_XS IQ4_NL IQ3_S IQ2_S
"""

from __future__ import annotations

import argparse

import numpy as np


def rows(rng: np.random.Generator, kind: str, n_rows: int, n: int) -> np.ndarray:
    if kind == "gauss":
        x = rng.standard_normal((n_rows, n))
    elif kind == "student":
        x = rng.standard_t(3, (n_rows, n))
    elif kind == "uniform":
        x = rng.uniform(-1, 1, (n_rows, n))
    else:  # outliers
        x = rng.standard_normal((n_rows, n))
        idx = rng.integers(0, n, (n_rows, 4))
        np.put_along_axis(x, idx, 20 * np.sign(rng.standard_normal((n_rows, 4))), axis=1)
    return x.astype(np.float32)


def importance(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "random":
        im = rng.uniform(0, 1, n)
    elif kind == "lognormal":
        im = rng.lognormal(0, 2, n)
    elif kind == "halfzero":
        im = rng.uniform(0, 1, n)
        im[rng.permutation(n)[: n // 2]] = 0
    else:  # outlier channels
        im = np.full(n, 0.01)
        im[rng.integers(0, n, 8)] = 100.0
    return im.astype(np.float32)


def measure(qtype_name: str, n: int = 512, n_rows: int = 64, seed: int = 0) -> tuple[float, float, float]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from tinygptv_edge.export.gguf.quant import quantize

    qtype = GGMLQuantizationType[qtype_name]
    rng = np.random.default_rng(seed)
    row_max = floor = weighted = 0.0
    for kind in ("gauss", "student", "uniform", "outliers"):
        for scale in (1e-3, 1e-2, 1e-1, 1.0, 4.0):
            x = rows(rng, kind, n_rows, n) * np.float32(scale)
            d = dequantize(quantize(x, qtype, threads=1), qtype).reshape(x.shape)
            err = np.abs(d - x).max(axis=1)
            row_max = max(row_max, float((err / np.abs(x).max(axis=1)).max()))
            if scale == 1e-3:
                floor = max(floor, float(err.max()))
            for im_kind in ("random", "lognormal", "halfzero", "outlier"):
                im = importance(rng, im_kind, n)
                d = dequantize(quantize(x, qtype, im, threads=1), qtype).reshape(x.shape)
                diff = (d - x).astype(np.float64)
                w = float(np.sqrt((im * diff**2).sum() / (im * x.astype(np.float64) ** 2).sum()))
                weighted = max(weighted, w)
    return row_max, floor, weighted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("types", nargs="+")
    p.add_argument("--n", type=int, default=512, help="values per row (a multiple of the block)")
    args = p.parse_args()
    print(f"{'type':8} {'row_max':>10} {'floor@1e-3':>12} {'weighted':>10}")
    for t in args.types:
        r, f, w = measure(t, args.n)
        print(f"{t:8} {r:10.3g} {f:12.3g} {w:10.3g}")


if __name__ == "__main__":
    main()
