"""Each paper set's official metric from the model's per-item outputs, with bootstrap CIs.

    metric         per item                                   headline
    exact_match    normalized answer == the reference (GQA)   mean
    accuracy       VSR: answer read as true/false == label;   mean
                   IconQA: chosen choice == the right one
    vqa_accuracy   vqa_eval.vqa_accuracy over the 10 answers   mean
    auroc          (Hateful Memes) P(yes) ranks hateful above  AUROC over all items; accuracy of
                   not hateful                                 P(yes) > P(no) reported beside it

CIs: percentile bootstrap over items (seeded); the change against the reference cell resamples the
same items for both (paired). On a `--sample` the interval is the sample's, so it is as wide as the
sample is small (and slightly conservative: sampling was without replacement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinygptv_edge.runtime.errors import ConfigError

from ..metrics import Interval, normalize_answer
from .base import PaperSet
from .vqa_eval import vqa_accuracy

TRUE_WORDS, FALSE_WORDS = ("true", "yes"), ("false", "no")


@dataclass(frozen=True)
class Prediction:
    """What a cell answered for one item."""

    answer: str = ""  # generated text; the chosen choice (choice); "yes"/"no" (yes_no)
    choice: int = -1  # index of the chosen choice (choice)
    p_yes: float = math.nan  # P(yes) / (P(yes) + P(no)) at the first answer token (yes_no)

    def to_list(self) -> list:
        return [self.answer, self.choice, None if math.isnan(self.p_yes) else self.p_yes]

    @classmethod
    def from_list(cls, x: list) -> Prediction:
        return cls(x[0], x[1], math.nan if x[2] is None else x[2])


def read_true_false(answer: str) -> int:
    """1 for an answer starting "true"/"yes", 0 for "false"/"no", -1 for anything else."""
    words = normalize_answer(answer).split()
    first = words[0].strip(".,!?") if words else ""
    return 1 if first in TRUE_WORDS else 0 if first in FALSE_WORDS else -1


def item_scores(pset: PaperSet, preds: list[Prediction]) -> np.ndarray:
    """(N,) per-item score in [0, 1] whose mean is the metric (for auroc: the accuracy beside it)."""
    if len(preds) != len(pset.items):
        raise ConfigError(f"{pset.name}: expected {len(pset.items)} predictions, got {len(preds)}")
    m, items = pset.task.metric, pset.items
    if m == "exact_match":
        s = [
            normalize_answer(p.answer) == normalize_answer(it.answers[0])
            for it, p in zip(items, preds, strict=True)
        ]
    elif m == "vqa_accuracy":
        s = [vqa_accuracy(p.answer, it.answers) for it, p in zip(items, preds, strict=True)]
    elif pset.task.kind == "choice":
        s = [p.choice == it.label for it, p in zip(items, preds, strict=True)]
    elif pset.task.kind == "yes_no":
        s = [int(p.p_yes > 0.5) == it.label for it, p in zip(items, preds, strict=True)]
    else:
        s = [read_true_false(p.answer) == it.label for it, p in zip(items, preds, strict=True)]
    return np.asarray(s, dtype=np.float64)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    top = np.cumsum(counts)
    return (top - (counts - 1) / 2.0)[inv]


def auroc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counted 1/2
    (the Mann-Whitney U statistic over n_pos * n_neg). NaN when a class is absent."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ConfigError(f"auroc: expected labels and scores of one shape (N,), got {y.shape} and {s.shape}")
    if not np.isfinite(s).all():
        raise ConfigError("auroc: expected finite scores, found NaN or infinity")
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    r = average_ranks(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _index(n: int, n_boot: int, seed: int) -> np.ndarray:
    if n < 1 or n_boot < 1:
        raise ConfigError(f"bootstrap: expected items >= 1 and n_boot >= 1, got {n} and {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(value: float, boots: np.ndarray, level: float = 0.95) -> Interval:
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return Interval(float(value), math.nan, math.nan, level)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(lo), float(hi), level)


class Scorer:
    """The headline statistic of one paper set for any cell, and its CIs (one index matrix shared
    by every cell, so paired differences resample the same items)."""

    def __init__(self, pset: PaperSet, n_boot: int = 2000, seed: int = 0):
        self.pset = pset
        self.idx = _index(len(pset.items), n_boot, seed)  # (B, N)
        self.labels = np.array([it.label for it in pset.items])

    def values(self, preds: list[Prediction]) -> np.ndarray:
        """(N,) per item for a mean metric; the P(yes) scores for auroc."""
        if self.pset.task.metric == "auroc":
            return np.array([p.p_yes for p in preds], dtype=np.float64)
        return item_scores(self.pset, preds)

    def stat(self, v: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray | float:
        if self.pset.task.metric != "auroc":
            return v.mean() if idx is None else v[idx].mean(axis=1)
        if idx is None:
            return auroc(self.labels, v)
        return np.array([auroc(self.labels[i], v[i]) for i in idx])

    def interval(self, v: np.ndarray) -> Interval:
        return _interval(self.stat(v), self.stat(v, self.idx))

    def change(self, ref: np.ndarray, v: np.ndarray) -> Interval:
        return _interval(self.stat(v) - self.stat(ref), self.stat(v, self.idx) - self.stat(ref, self.idx))
