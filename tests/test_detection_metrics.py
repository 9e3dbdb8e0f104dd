"""AUPR, F1-max and FPR@95TPR (swsa_engine.core.metrics.curves) against scikit-learn, row by row."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from swsa_engine.core.metrics import (UndefinedMetricWarning, average_precision, detection_metrics, f1_max,
                                      fpr_at_tpr)


def sklearn_row(scores, labels, tpr=0.95):
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    fpr, true_rate, _ = roc_curve(labels, scores, drop_intermediate=False)
    return average_precision_score(labels, scores), f1.max(), fpr[np.argmax(true_rate >= tpr)]


@pytest.mark.parametrize("seed", range(6))
def test_equal_to_sklearn_with_ties_and_masks(seed):
    rng = np.random.default_rng(seed)
    tasks, n = 7, 41
    scores = rng.integers(0, 6, size=(tasks, n)).astype(float)  # many ties
    labels = rng.random((tasks, n)) < 0.3
    labels[:, 0], labels[:, 1] = True, False  # both classes in every row
    mask = rng.random((tasks, n)) < 0.8
    mask[:, :2] = True
    got = detection_metrics(scores, labels, mask)
    for t in range(tasks):
        want = sklearn_row(scores[t, mask[t]], labels[t, mask[t]])
        assert got["aupr"][t] == pytest.approx(want[0], abs=1e-12)
        assert got["f1_max"][t] == pytest.approx(want[1], abs=1e-12)
        assert got["fpr_at_95_tpr"][t] == pytest.approx(want[2], abs=1e-12)


def test_continuous_scores_leading_axes_and_single_functions():
    rng = np.random.default_rng(11)
    scores = rng.normal(size=(3, 4, 60))
    labels = rng.random(60) < 0.25  # (n,) broadcasts over the leading axes
    got = detection_metrics(scores, labels)
    assert got["aupr"].shape == (3, 4)
    for i in range(3):
        for j in range(4):
            want = sklearn_row(scores[i, j], labels)
            assert got["aupr"][i, j] == pytest.approx(want[0], abs=1e-12)
            assert got["f1_max"][i, j] == pytest.approx(want[1], abs=1e-12)
            assert got["fpr_at_95_tpr"][i, j] == pytest.approx(want[2], abs=1e-12)
    np.testing.assert_array_equal(average_precision(scores, labels), got["aupr"])
    np.testing.assert_array_equal(f1_max(scores, labels), got["f1_max"])
    np.testing.assert_array_equal(fpr_at_tpr(scores, labels), got["fpr_at_95_tpr"])


def test_tpr_exactly_reached_and_other_levels():
    # 20 anomalies: 19 of 20 is exactly 95 %, which counts as reaching it (float 0.95 * 20 is not 19.0)
    rng = np.random.default_rng(3)
    scores = rng.normal(size=60)
    labels = np.zeros(60, bool)
    labels[:20] = True
    for level in (0.95, 0.5, 1.0):
        fpr, true_rate, _ = roc_curve(labels, scores, drop_intermediate=False)
        assert fpr_at_tpr(scores, labels, tpr=level) == pytest.approx(fpr[np.argmax(true_rate >= level)], abs=1e-12)


def test_one_class_rows_are_nan_with_one_warning():
    scores = np.array([[0.1, 0.4, 0.3], [0.2, 0.5, 0.9]])
    labels = np.array([[False, False, False], [False, True, True]])
    with pytest.warns(UndefinedMetricWarning, match="1 of 2 row"):
        got = detection_metrics(scores, labels)
    assert np.isnan(got["aupr"][0]) and np.isnan(got["f1_max"][0]) and np.isnan(got["fpr_at_95_tpr"][0])
    assert got["aupr"][1] == 1.0 and got["f1_max"][1] == 1.0 and got["fpr_at_95_tpr"][1] == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"scores": np.array([0.1, np.nan]), "labels": np.array([0, 1])}, r"detection_metrics: `scores` contains 1 non-finite"),
    ({"scores": np.array([0.1, 0.2]), "labels": np.array([0, 2])}, r"detection_metrics: `labels` must be boolean"),
    ({"scores": np.array([0.1, 0.2]), "labels": np.array([0, 1]), "mask": np.array([1, 1])}, r"`mask` must be boolean"),
    ({"scores": np.array([0.1, 0.2, 0.3]), "labels": np.array([0, 1])}, r"`labels` has 2 entries"),
    ({"scores": np.array([0.1, 0.2]), "labels": np.array([0, 1]), "tpr": 1.5}, r"tpr must be in \(0, 1\]"),
])
def test_errors_say_what_arrived(kwargs, message):
    with pytest.raises(ValueError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        detection_metrics(**kwargs)
