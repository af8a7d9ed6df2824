"""Numeric comparisons of a result against its reference, numpy only: one home for every layer.

    log_softmax, kl_divergence   next-token distributions, logits (T, V): KL(p_ref || p_q) per position
    cosine_rows                  (..., D) rows -> (...,) cosine similarity
    sqnr_db, sqnr_db_from_sums   10 log10(sum ref^2 / sum (ref - q)^2), from arrays or streamed sums

The export layer (ONNX parity and QDQ diagnostics) and the report layer (calib/metrics.py statistics)
both use these. Shapes are validated and errors say expected vs got (ConfigError).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError


def as_pair(
    a: np.ndarray, b: np.ndarray, what: str, ndim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64, same shape, non-empty (and `ndim`-D when given)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ConfigError(f"{what}: expected arrays of the same shape, got {a.shape} and {b.shape}")
    if ndim is not None and a.ndim != ndim:
        raise ConfigError(f"{what}: expected {ndim}-D arrays, got shape {a.shape}")
    if a.size == 0:
        raise ConfigError(f"{what}: expected non-empty arrays, got shape {a.shape}")
    return a, b


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """log p = x - max - log sum exp(x - max), in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_q) in nats per position: (T, V), (T, V) -> (T,)."""
    a, b = as_pair(ref_logits, q_logits, "kl_divergence", ndim=2)
    lp, lq = log_softmax(a), log_softmax(b)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return np.maximum(kl, 0.0)  # rounding can give -1e-17


def cosine_rows(ref: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """(..., D) -> (...,) cosine similarity of matching rows (norms product floored at `eps`)."""
    a, b = as_pair(ref, q, "cosine_rows")
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, eps)


def sqnr_db_from_sums(signal, noise, floor: float = 0.0) -> np.ndarray | float:
    """10 log10(signal / noise) from sums of squares, each floored at `floor` first.

    With floor 0, no noise gives +inf; onnxruntime's QDQ helpers floor both at float32 eps^2.
    """
    s, n = np.maximum(signal, floor), np.maximum(noise, floor)
    with np.errstate(divide="ignore"):
        out = 10.0 * (np.log10(s) - np.log10(n))
    return float(out) if np.ndim(out) == 0 else out


def sqnr_db(ref: np.ndarray, q: np.ndarray, axis=None) -> np.ndarray | float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - q)^2).

    Summed over `axis` (None: the whole array -> float). Identical arrays give +inf.
    """
    a, b = as_pair(ref, q, "sqnr_db")
    return sqnr_db_from_sums(np.sum(a * a, axis=axis), np.sum((a - b) ** 2, axis=axis))
