"""Sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds, config validation."""

from __future__ import annotations

import numpy as np
import pytest

from tinygptv_edge.runtime.errors import ConfigError
from tinygptv_edge.runtime.sampling import GREEDY, TINYGPTV, Sampler, SamplingConfig, warp


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=50).astype(np.float32)
        assert Sampler(GREEDY)(logits) == int(np.argmax(logits))


def test_tinygptv_defaults():
    assert (TINYGPTV.top_p, TINYGPTV.temperature, TINYGPTV.repetition_penalty) == (0.9, 1.0, 1.05)
    assert TINYGPTV.max_new_tokens == 300 and TINYGPTV.do_sample


def test_repetition_penalty_hf_semantics():
    logits = np.array([2.0, 1.9, -1.0, -1.1])
    cfg = SamplingConfig(repetition_penalty=1.2)
    assert Sampler(cfg)(logits, previous=[0]) == 1  # 2.0 / 1.2 < 1.9
    assert Sampler(cfg)(logits, previous=[0, 1, 0]) == 0  # both divided: order kept
    neg = np.array([-1.0, -1.1, -5.0])
    assert Sampler(cfg)(neg, previous=[0]) == 1  # negative logits are multiplied (-1.2 < -1.1)


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = np.zeros(1000)
    a = [Sampler(SamplingConfig(do_sample=True, seed=7))(logits) for _ in range(5)]
    b = [Sampler(SamplingConfig(do_sample=True, seed=7))(logits) for _ in range(5)]
    assert a == b
    s = Sampler(SamplingConfig(do_sample=True, seed=7))
    seq1 = [s(logits) for _ in range(10)]
    s = Sampler(SamplingConfig(do_sample=True, seed=8))
    seq2 = [s(logits) for _ in range(10)]
    assert seq1 != seq2


def test_top_k_support():
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    s = Sampler(SamplingConfig(do_sample=True, top_k=2, seed=0))
    assert {s(logits) for _ in range(300)} == {0, 1}
    s = Sampler(SamplingConfig(do_sample=True, top_k=1, seed=0))
    assert {s(logits) for _ in range(50)} == {0}


def test_top_p_keeps_the_smallest_nucleus():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p)
    kept = lambda top_p: set(np.flatnonzero(np.isfinite(warp(logits, 1.0, 0, top_p))))  # noqa: E731
    assert kept(0.5) == {0}
    assert kept(0.6) == {0, 1}
    assert kept(0.79) == {0, 1}
    assert kept(0.81) == {0, 1, 2}
    assert kept(0.01) == {0}  # the best token always stays
    s = Sampler(SamplingConfig(do_sample=True, top_p=0.6, seed=1))
    draws = [s(logits) for _ in range(2000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / 2000 - 0.5 / 0.8) < 0.05  # renormalised over the nucleus


def test_min_p_drops_tokens_far_below_the_best():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p)
    kept = lambda min_p: set(np.flatnonzero(np.isfinite(warp(logits, 1.0, 0, 1.0, min_p))))  # noqa: E731
    assert kept(0.0) == {0, 1, 2, 3}
    assert kept(0.2) == {0, 1, 2}  # 0.05 < 0.2 * 0.5
    assert kept(0.5) == {0, 1}
    assert kept(1.0) == {0}
    assert kept(0.5) == set(np.flatnonzero(np.isfinite(warp(logits, 5.0, 0, 1.0, 0.5))))  # before temperature
    s = Sampler(SamplingConfig(do_sample=True, min_p=0.5, seed=1))
    assert {s(logits) for _ in range(300)} == {0, 1}


def test_temperature_sharpens_and_flattens():
    logits = np.array([1.0, 0.0])
    cold = Sampler(SamplingConfig(do_sample=True, temperature=0.05, seed=0))
    assert {cold(logits) for _ in range(200)} == {0}
    hot = Sampler(SamplingConfig(do_sample=True, temperature=100.0, seed=0))
    share = np.mean([hot(logits) for _ in range(2000)])
    assert 0.4 < share < 0.6


def test_nan_logits_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        Sampler(GREEDY)(np.full(4, np.nan))


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=0),
        dict(temperature=0.0),
        dict(temperature=float("nan")),
        dict(top_k=-1),
        dict(top_k=True),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(min_p=1.5),
        dict(repetition_penalty=0),
        dict(seed=-3),
        dict(do_sample=1),
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_allowed_mask_restricts_the_choice():
    logits = np.array([5.0, 1.0, 3.0, 2.0], np.float32)
    assert Sampler(GREEDY)(logits, allowed=np.array([False, True, False, True])) == 3
    assert Sampler(GREEDY)(logits, allowed=np.array([False, True])) == 1  # entries past the mask: False
    sampled = Sampler(SamplingConfig(do_sample=True, temperature=2.0, seed=0))
    assert {sampled(logits, allowed=np.array([False, True, False, True])) for _ in range(50)} == {1, 3}
    with pytest.raises(ValueError, match="allows no token"):
        Sampler(GREEDY)(logits, allowed=np.zeros(4, bool))


@pytest.mark.parametrize("penalty", [1e-310, 5e-324, 1e308])
def test_an_extreme_repetition_penalty_still_samples_a_token(penalty):
    """A penalty near 0 divides a positive logit to infinity (and 1e308 multiplies a negative one to
    -infinity): found by the server's fuzzing as a 500 ("Probabilities contain NaN"). Clamped to the
    largest finite logit, sampling picks a token, and the penalty still acts in its direction."""
    logits = np.array([1.0, 2.0, -0.5, -3.0])
    for previous in ([0, 1], [0, 1, 2, 3], [2, 3]):
        token = Sampler(SamplingConfig(do_sample=True, repetition_penalty=penalty, seed=0))(logits, previous)
        assert 0 <= token < 4
    greedy = Sampler(SamplingConfig(repetition_penalty=penalty))(logits, [1])
    assert greedy == (1 if penalty < 1 else 0)  # the seen token boosted to the top / pushed below 1.0
