"""Report statistics against values computed by hand (KL, cosine, SQNR: tests/runtime/test_metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinygptv_edge.calib import metrics as M
from tinygptv_edge.runtime.errors import ConfigError

LN3 = math.log(3.0)


def test_top1_delta_p_and_nll():
    ref = np.array([[0.0, LN3], [2.0, 0.0]])
    q = np.array([[0.0, 0.0], [0.0, 1.0]])
    assert M.same_top1(ref, q).tolist() == [False, False]  # a tie picks index 0
    assert M.same_top1(ref, ref).tolist() == [True, True]
    # p_q(1) - p_ref(1) at position 0: 1/2 - 3/4
    assert M.delta_p_target(ref, q, np.array([1, 0]))[0] == pytest.approx(-0.25)
    assert M.target_nll(q[:1], np.array([1])) == pytest.approx([math.log(2)])
    assert M.perplexity_ratio(np.full(3, math.log(2)), np.full(3, math.log(4))) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="target ids in"):
        M.target_nll(q, np.array([0, 5]))


def test_answers_exact_match_and_flips():
    assert M.normalize_answer("  Two  Circles. ") == "two circles"
    em = M.exact_match(["Red", "blue", "yes!"], ["red", "green", "yes"])
    assert em.tolist() == [True, False, True]
    assert M.flips(["red", "blue"], ["red", "Blue ", "x"][:2]).tolist() == [False, False]
    assert M.flips(["red", "blue"], ["green", "blue"]).tolist() == [True, False]
    with pytest.raises(ConfigError, match="as many"):
        M.exact_match(["a"], ["a", "b"])


def test_bootstrap_known_cases():
    # a constant paired difference has a degenerate interval
    ci = M.paired_bootstrap(np.zeros(20), np.ones(20), n_boot=200, seed=3)
    assert (ci.value, ci.low, ci.high) == (1.0, 1.0, 1.0)
    assert ci.excludes_zero()
    # two values 0 and 1: resampled means are 0, 1/2, 1 with p 1/4, 1/2, 1/4 -> the 95% interval is [0, 1]
    ci = M.bootstrap_mean([0.0, 1.0], n_boot=4000, seed=0)
    assert (ci.value, ci.low, ci.high) == (0.5, 0.0, 1.0)
    # 50 of 100: standard error 0.05, so the interval is about 0.5 +- 0.098
    x = np.r_[np.ones(50), np.zeros(50)]
    ci = M.bootstrap_mean(x, n_boot=4000, seed=1)
    assert ci.low == pytest.approx(0.402, abs=0.02) and ci.high == pytest.approx(0.598, abs=0.02)
    assert not M.paired_bootstrap(x, x[::-1]).excludes_zero()
    # seeded: the same seed gives the same interval
    assert M.bootstrap_mean(x, seed=7) == M.bootstrap_mean(x, seed=7)
    with pytest.raises(ConfigError, match="at least one"):
        M.bootstrap_mean([])


def test_summary_and_bits_per_weight():
    s = M.summarize(np.arange(101.0))
    assert (s["mean"], s["median"], s["p99"], s["max"], s["n"]) == (50.0, 50.0, 99.0, 100.0, 101)
    assert M.bits_per_weight(18, 32) == 4.5  # one Q4_0 block
    with pytest.raises(ConfigError):
        M.bits_per_weight(10, 0)
