"""runtime/metrics.py (shared by export and the report) against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinygptv_edge.runtime import metrics as RM
from tinygptv_edge.runtime.errors import ConfigError

LN3 = math.log(3.0)


def test_kl_by_hand_and_stable_for_huge_logits():
    # p = softmax(0, ln 3) = (1/4, 3/4), q = softmax(0, 0) = (1/2, 1/2)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812...
    ref, q = np.array([[0.0, LN3]]), np.array([[0.0, 0.0]])
    assert RM.kl_divergence(ref, q) == pytest.approx([want], abs=1e-12)
    assert RM.kl_divergence(ref + 1e4, q - 1e4) == pytest.approx([want], abs=1e-9)  # no overflow
    assert RM.kl_divergence(q, q) == pytest.approx([0.0], abs=1e-15)
    # KL is not symmetric: KL(q || p) = 1/2 ln(2) + 1/2 ln(2/3)
    assert RM.kl_divergence(q, ref) == pytest.approx([0.5 * math.log(2) + 0.5 * math.log(2 / 3)], abs=1e-12)


def test_sqnr_and_cosine_by_hand():
    ref, q = np.array([3.0, 4.0]), np.array([3.0, 5.0])
    assert RM.sqnr_db(ref, q) == pytest.approx(10 * math.log10(25.0))  # signal 25, noise 1
    assert RM.sqnr_db(ref, ref) == math.inf
    rows = RM.sqnr_db(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 1.0], [0.0, 2.2]]), axis=-1)
    assert rows == pytest.approx([0.0, 10 * math.log10(4 / 0.04)])
    assert RM.cosine_rows(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]])) == pytest.approx([1 / math.sqrt(2)])
    with pytest.raises(ConfigError, match="same shape"):
        RM.cosine_rows(np.zeros((2, 3)), np.zeros((3, 2)))


def test_sqnr_from_sums_floor_matches_onnxruntime_clamp():
    eps2 = float(np.finfo(np.float32).eps) ** 2
    assert RM.sqnr_db_from_sums(25.0, 1.0) == pytest.approx(10 * math.log10(25.0))
    assert RM.sqnr_db_from_sums(1.0, 0.0) == math.inf
    assert RM.sqnr_db_from_sums(1.0, 0.0, floor=eps2) == pytest.approx(-10 * math.log10(eps2))
    assert RM.sqnr_db_from_sums(0.0, 0.0, floor=eps2) == 0.0
