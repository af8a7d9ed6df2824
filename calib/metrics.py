"""Accuracy-drop statistics: a quantized model against its reference, numpy only.

The per-position and per-row comparisons (KL, cosine, SQNR) live in runtime/metrics.py, which the
export layer shares; this module adds what only the report needs:

    next-token distributions   logits (T, V) of the reference and of the level, same positions
        same_top1              argmax agrees, per position
        delta_p_target         p_q(target) - p_ref(target), per position
        ppl_ratio              exp(mean NLL_q - mean NLL_ref) over the reference answers
    answers                    exact match after `normalize_answer`, flips vs the reference answers
    uncertainty                paired bootstrap over examples (seeded): CI of a mean and of a difference
    cost                       bits per weight from bytes and parameter counts

Every function validates shapes and says expected vs got (ConfigError).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from tinygptv_edge.runtime.errors import ConfigError
from tinygptv_edge.runtime.metrics import as_pair as _pair
from tinygptv_edge.runtime.metrics import log_softmax


def same_top1(ref_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """(T,) bool: the two argmaxes agree."""
    a, b = _pair(ref_logits, q_logits, "same_top1", ndim=2)
    return np.argmax(a, axis=-1) == np.argmax(b, axis=-1)


def _targets(targets, T: int, V: int, what: str) -> np.ndarray:
    t = np.asarray(targets)
    if t.shape != (T,) or not np.issubdtype(t.dtype, np.integer):
        raise ConfigError(f"{what}: expected {T} integer target ids, got {t.dtype} array of shape {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= V):
        raise ConfigError(f"{what}: expected target ids in [0, {V}), got range [{t.min()}, {t.max()}]")
    return t


def target_nll(logits: np.ndarray, targets) -> np.ndarray:
    """(T,) negative log-likelihood of `targets[t]` under position t's distribution."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2:
        raise ConfigError(f"target_nll: expected logits (T, V), got shape {x.shape}")
    t = _targets(targets, *x.shape, "target_nll")
    return -log_softmax(x)[np.arange(len(t)), t]


def delta_p_target(ref_logits: np.ndarray, q_logits: np.ndarray, targets) -> np.ndarray:
    """(T,) p_q(target) - p_ref(target): negative when the level believes the reference answer less."""
    a, b = _pair(ref_logits, q_logits, "delta_p_target", ndim=2)
    return np.exp(-target_nll(b, targets)) - np.exp(-target_nll(a, targets))


def perplexity_ratio(ref_nll: np.ndarray, q_nll: np.ndarray) -> float:
    """exp(mean NLL_q - mean NLL_ref) over the same target tokens; 1.0 = no change."""
    a, b = _pair(ref_nll, q_nll, "perplexity_ratio", ndim=1)
    return float(math.exp(b.mean() - a.mean()))


# -- answers -----------------------------------------------------------------------------------------
_SPACES = re.compile(r"\s+")
_EDGE_PUNCT = ".,;:!?\"'`"


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no punctuation at either end ("Two circles." -> "two circles")."""
    return _SPACES.sub(" ", text.strip().lower()).strip(_EDGE_PUNCT + " ")


def exact_match(predictions, answers) -> np.ndarray:
    """(N,) bool: normalized prediction equals the normalized reference answer."""
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers):
        raise ConfigError(
            f"exact_match: expected as many predictions as answers, got {len(predictions)} vs {len(answers)}"
        )
    return np.array(
        [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers, strict=True)], bool
    )


def flips(reference_predictions, predictions) -> np.ndarray:
    """(N,) bool: the level's answer differs from the reference model's answer (after normalizing)."""
    return ~exact_match(predictions, reference_predictions)


# -- uncertainty -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the full sample
    low: float
    high: float
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _resample_index(n: int, n_boot: int, seed: int) -> np.ndarray:
    if n < 1:
        raise ConfigError("bootstrap: expected at least one example, got none")
    if n_boot < 1:
        raise ConfigError(f"bootstrap: expected n_boot >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (B, N)


def _interval(value: float, boots: np.ndarray, level: float) -> Interval:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"bootstrap: expected a confidence level in (0, 1), got {level}")
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(lo), float(hi), level)


def bootstrap_mean(x, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap CI of mean(x)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    idx = _resample_index(len(x), n_boot, seed)
    return _interval(x.mean(), x[idx].mean(axis=1), level)


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """CI of mean(b) - mean(a) when a[i] and b[i] come from the same example i (resampled together)."""
    a, b = _pair(a, b, "paired_bootstrap", ndim=1)
    idx = _resample_index(len(a), n_boot, seed)
    d = b - a
    return _interval(d.mean(), d[idx].mean(axis=1), level)


# -- summaries and cost ------------------------------------------------------------------------------
def summarize(x) -> dict[str, float]:
    """mean, median, p99, max (and n) of a 1-D sample."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ConfigError("summarize: expected at least one value, got none")
    return {
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "p99": float(np.quantile(x, 0.99)),
        "max": float(x.max()),
        "n": int(x.size),
    }


def bits_per_weight(n_bytes: int, n_params: int) -> float:
    """8 * bytes / parameters."""
    if n_params <= 0 or n_bytes < 0:
        raise ConfigError(
            f"bits_per_weight: expected bytes >= 0 and parameters > 0, got {n_bytes}, {n_params}"
        )
    return 8.0 * n_bytes / n_params
