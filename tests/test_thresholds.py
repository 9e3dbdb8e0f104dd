"""Label-free thresholds (swsa_engine.core.thresholds) against plain loops and scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from swsa_engine.core.thresholds import f1_optimal_threshold, normal_quantile_threshold, rates_at_threshold


def test_quantile_threshold_is_the_conformal_order_statistic():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 9, size=(5, 150)).astype(float)  # ties
    mask = rng.random((5, 150)) < 0.9
    got = normal_quantile_threshold(scores, mask, quantile=0.9)
    for t in range(5):
        kept = np.sort(scores[t, mask[t]])
        rank = math.ceil((len(kept) + 1) * 0.9)
        assert got[t] == kept[rank - 1]


def test_quantile_threshold_keeps_its_false_positive_promise_on_average():
    rng = np.random.default_rng(1)
    calibration = rng.normal(size=(4000, 40))
    thresholds = normal_quantile_threshold(calibration, quantile=0.9)
    new_normals = rng.normal(size=4000)
    false_positive_rate = np.mean(new_normals >= thresholds)
    assert 0.07 < false_positive_rate <= 0.1 + 0.01  # ≤ 1 − q in expectation (≈ 0.098 for H = 40)


def test_too_few_or_no_normals():
    scores = np.array([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    mask = np.array([[True, True, True], [False, False, False]])
    got = normal_quantile_threshold(scores, mask, quantile=0.99)
    assert np.isposinf(got[0]) and np.isnan(got[1])
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\), got 1.5"):
        normal_quantile_threshold(scores, quantile=1.5)


@pytest.mark.parametrize("seed", range(5))
def test_f1_optimal_threshold_is_the_best_of_every_cut(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 7, size=(6, 50)).astype(float)
    labels = rng.random((6, 50)) < 0.4
    labels[:, 0], labels[:, 1] = True, False
    mask = rng.random((6, 50)) < 0.85
    mask[:, :2] = True
    threshold, f1, fpr = f1_optimal_threshold(scores, labels, mask)
    for t in range(6):
        s, y = scores[t, mask[t]], labels[t, mask[t]]
        best = max((f1_score(y, s >= c), c) for c in np.unique(s))  # ties in F1 → the highest cut
        assert f1[t] == pytest.approx(best[0], abs=1e-12)
        assert f1_score(y, s >= threshold[t]) == pytest.approx(best[0], abs=1e-12)
        assert threshold[t] == max(c for c in np.unique(s) if abs(f1_score(y, s >= c) - best[0]) < 1e-12)
        assert fpr[t] == pytest.approx(np.mean(s[~y] >= threshold[t]), abs=1e-12)


def test_rates_at_threshold_equal_sklearn():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(3, 80))
    labels = rng.random((3, 80)) < 0.3
    threshold = np.array([0.0, 0.5, -0.5])
    got = rates_at_threshold(scores, labels, threshold)
    for t in range(3):
        predicted = scores[t] >= threshold[t]
        assert got["precision"][t] == pytest.approx(precision_score(labels[t], predicted))
        assert got["recall"][t] == pytest.approx(recall_score(labels[t], predicted))
        assert got["fpr"][t] == pytest.approx(np.mean(predicted[~labels[t]]))


def test_non_finite_normal_scores_are_refused_unless_masked_out():
    scores = np.array([[0.1, np.nan, 0.3, 0.2]])
    with pytest.raises(ValueError, match=r"normal_scores holds 1 non-finite included score\(s\); mask them out"):
        normal_quantile_threshold(scores, quantile=0.5)
    masked = normal_quantile_threshold(scores, np.array([[True, False, True, True]]), quantile=0.5)
    assert masked[0] == 0.2
    with pytest.raises(ValueError, match=r"f1_optimal_threshold: `scores` contains 1 non-finite"):
        f1_optimal_threshold(scores, np.array([[False, True, True, False]]))
