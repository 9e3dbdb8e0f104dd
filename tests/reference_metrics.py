"""Reference detection metrics for the tests: scikit-learn on one set at a time."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve


def sklearn_detection_metrics(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(3,) AUPR, F1-max, FPR@95TPR of one set by scikit-learn; NaN without both classes."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return np.full(3, np.nan)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nanmax(2 * precision * recall / (precision + recall))
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return np.array([average_precision_score(labels, scores), f1, fpr[np.argmax(tpr >= 0.95)]])
