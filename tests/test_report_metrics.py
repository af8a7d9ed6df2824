"""Report metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinygptv_edge.calib import metrics as M
from tinygptv_edge.runtime.errors import ConfigError

LN3 = math.log(3.0)


def test_kl_by_hand_and_stable_for_huge_logits():
    # p = softmax(0, ln 3) = (1/4, 3/4), q = softmax(0, 0) = (1/2, 1/2)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812...
    ref, q = np.array([[0.0, LN3]]), np.array([[0.0, 0.0]])
    assert M.kl_divergence(ref, q) == pytest.approx([want], abs=1e-12)
    assert M.kl_divergence(ref + 1e4, q - 1e4) == pytest.approx([want], abs=1e-9)  # no overflow
    assert M.kl_divergence(q, q) == pytest.approx([0.0], abs=1e-15)
    # KL is not symmetric: KL(q || p) = 1/2 ln(2) + 1/2 ln(2/3)
    assert M.kl_divergence(q, ref) == pytest.approx([0.5 * math.log(2) + 0.5 * math.log(2 / 3)], abs=1e-12)


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


def test_sqnr_and_cosine_by_hand():
    ref, q = np.array([3.0, 4.0]), np.array([3.0, 5.0])
    assert M.sqnr_db(ref, q) == pytest.approx(10 * math.log10(25.0))  # signal 25, noise 1
    assert M.sqnr_db(ref, ref) == math.inf
    rows = M.sqnr_db(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 1.0], [0.0, 2.2]]), axis=-1)
    assert rows == pytest.approx([0.0, 10 * math.log10(4 / 0.04)])
    assert M.cosine_rows(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]])) == pytest.approx([1 / math.sqrt(2)])
    with pytest.raises(ConfigError, match="same shape"):
        M.cosine_rows(np.zeros((2, 3)), np.zeros((3, 2)))


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
