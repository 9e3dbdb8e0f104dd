"""The field's threshold-curve metrics beside AUROC, batched: AUPR, F1-max and FPR at 95 % TPR.

All three come from one sort of every row (:func:`detection_metrics`): the rows are sorted by
decreasing score, true and false positives are counted cumulatively, and only the last entry of
each group of tied scores is a threshold (a threshold cannot split a tie). Then, for ``P``
anomalies and ``N`` normals among a row's included entries,

* **AUPR** (average precision) ``= Σ_i (R_i − R_{i−1}) · P_i`` over the thresholds, as
  ``sklearn.metrics.average_precision_score`` (no interpolation);
* **F1-max** ``= max_i 2·TP_i / (TP_i + FP_i + P)``, the best F1 over the thresholds, as the
  maximum of ``2PR / (P + R)`` along ``sklearn.metrics.precision_recall_curve``;
* **FPR@95TPR** ``= min {FP_i / N : TP_i / P ≥ 0.95}``, the false-positive rate at the first
  threshold whose recall reaches 95 %, as read from ``sklearn.metrics.roc_curve``.

Rows whose included entries hold one class only are NaN, with one
:class:`~swsa_engine.core.metrics.UndefinedMetricWarning` per call (as :func:`auroc`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from swsa_engine.core.metrics.inputs import broadcast_shape, reject_nan_or_nonfinite, warn_undefined
from swsa_engine.core.metrics.ranks import labels_as_bool
from swsa_engine.core.validation import as_bool_mask, as_real_array

__all__ = ["DETECTION_METRICS", "SortedRows", "detection_metrics", "average_precision", "f1_max", "fpr_at_tpr",
           "sorted_counts", "sort_rows", "counts_of_sorted", "curve_values", "check_tpr"]

#: the names :func:`detection_metrics` returns, in report order
DETECTION_METRICS = ("aupr", "f1_max", "fpr_at_95_tpr")


class SortedRows(NamedTuple):
    """Rows sorted by decreasing score (:func:`sort_rows`), all (..., n) but the counts (...):
    ``order`` the entries' indices, ``keys`` their scores (excluded entries -inf, last),
    ``positive`` / ``negative`` included anomalies / normals, ``n_pos`` / ``n_neg`` their counts."""

    order: np.ndarray
    keys: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    n_pos: np.ndarray
    n_neg: np.ndarray


def sort_rows(function: str, scores, labels, mask) -> SortedRows:
    """Validated inputs sorted by decreasing score, one stable sort of every row (:class:`SortedRows`).
    ``function`` names the caller in errors."""
    scores = as_real_array(scores, "scores")
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise ValueError(f"{function}: `labels` must have shape (..., n) or (n,) with one label per score, got a scalar.")
    mask = None if mask is None else as_bool_mask(mask, "mask")
    shape = broadcast_shape(function, {"scores": scores, "labels": labels, "mask": mask})
    if shape[-1] == 0:
        raise ValueError(f"{function}: `scores` has no entries along its last axis (shape {shape}); each row "
                         "needs at least one normal and one anomalous entry.")
    scores = np.broadcast_to(scores, shape)
    included = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
    positive = labels_as_bool(np.broadcast_to(labels, shape), included, function) & included
    negative = ~positive & included
    reject_nan_or_nonfinite(function, "scores", scores, included, allow_inf=False)
    # excluded entries sort last (-inf) and never count: they add no TP, no FP, no threshold
    keys = np.where(included, scores.astype(np.float64, copy=False), -np.inf)
    order = np.argsort(-keys, axis=-1, kind="stable")
    return SortedRows(order, np.take_along_axis(keys, order, axis=-1), np.take_along_axis(positive, order, axis=-1),
                      np.take_along_axis(negative, order, axis=-1), positive.sum(axis=-1), negative.sum(axis=-1))


def counts_of_sorted(keys: np.ndarray, positive: np.ndarray, negative: np.ndarray):
    """Cumulative TP and FP (..., n) int64 and the thresholds (..., n) bool (the last included entry
    of each group of tied scores) of rows already sorted by decreasing score: ``keys`` (..., n)
    (excluded entries -inf, after every included one), ``positive`` / ``negative`` (..., n) bool."""
    true_positives = np.cumsum(positive, axis=-1, dtype=np.int64)
    false_positives = np.cumsum(negative, axis=-1, dtype=np.int64)
    last_of_tie = np.ones(keys.shape, bool)
    last_of_tie[..., :-1] = keys[..., :-1] != keys[..., 1:]
    return true_positives, false_positives, last_of_tie & (positive | negative)


def sorted_counts(function: str, scores, labels, mask):
    """Validated inputs sorted by decreasing score: cumulative TP and FP (..., n), the thresholds
    (..., n) bool (last entry of each tie group among included entries), P, N (...) and the sorted
    scores (..., n) (excluded entries -inf, last). ``function`` names the caller in errors."""
    rows = sort_rows(function, scores, labels, mask)
    true_positives, false_positives, thresholds = counts_of_sorted(rows.keys, rows.positive, rows.negative)
    return true_positives, false_positives, thresholds, rows.n_pos, rows.n_neg, rows.keys


def curve_values(tp: np.ndarray, fp: np.ndarray, thresholds: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray,
                 tpr: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUPR, F1-max and FPR at ``tpr`` TPR (...) from the counts of :func:`counts_of_sorted` (..., n)
    and P, N (...); meaningless (not NaN) where a row lacks a class. The one place their arithmetic
    lives, so every caller gets the same floats from the same counts."""
    pos = n_pos[..., None].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tp / np.maximum(tp + fp, 1)
        # recall gained at each threshold since the previous one (tp never decreases)
        previous_tp = np.maximum.accumulate(np.where(thresholds, tp, 0), axis=-1)
        previous_tp = np.concatenate([np.zeros_like(previous_tp[..., :1]), previous_tp[..., :-1]], axis=-1)
        gained = np.where(thresholds, tp - previous_tp, 0) / pos
        aupr = (gained * precision).sum(axis=-1)
        f1 = np.where(thresholds, 2.0 * tp / (tp + fp + pos), -np.inf).max(axis=-1)
        reaches = thresholds & (tp >= np.ceil(float(tpr) * pos - 1e-9))
        first = np.argmax(reaches, axis=-1)
        fpr = np.take_along_axis(fp, first[..., None], axis=-1)[..., 0] / n_neg
    return aupr, f1, fpr


def check_tpr(tpr: float) -> float:
    """``tpr`` as a float in (0, 1]; a ValueError saying so otherwise."""
    if not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}; the field reports the FPR at tpr=0.95")
    return float(tpr)


def detection_metrics(scores, labels, mask=None, *, tpr: float = 0.95) -> dict[str, np.ndarray]:
    """AUPR, F1-max and FPR at ``tpr`` TPR of every row, from one sort.

    scores (..., n) float (higher = more anomalous), labels (..., n) or (n,) bool / 0-1
    (True = anomaly), mask broadcastable to (..., n) bool (True = included) → a dict of
    float64 arrays of shape (...) under :data:`DETECTION_METRICS` (``fpr_at_95_tpr`` is the FPR at
    ``tpr``). Equal to scikit-learn row by row (see the module docstring).
    """
    tpr = check_tpr(tpr)
    tp, fp, thresholds, n_pos, n_neg, _ = sorted_counts("detection_metrics", scores, labels, mask)
    values = curve_values(tp, fp, thresholds, n_pos, n_neg, tpr)
    undefined = (n_pos == 0) | (n_neg == 0)
    warn_undefined("detection_metrics", undefined, "their included entries hold fewer than two classes; give "
                   "every task both classes, or skip it")
    return {name: np.where(undefined, np.nan, value)[()] for name, value in zip(DETECTION_METRICS, values)}


def average_precision(scores, labels, mask=None) -> np.ndarray:
    """(...) AUPR of every row (``sklearn.metrics.average_precision_score``); see :func:`detection_metrics`."""
    return detection_metrics(scores, labels, mask)["aupr"]


def f1_max(scores, labels, mask=None) -> np.ndarray:
    """(...) the best F1 over every threshold of each row; see :func:`detection_metrics`."""
    return detection_metrics(scores, labels, mask)["f1_max"]


def fpr_at_tpr(scores, labels, mask=None, *, tpr: float = 0.95) -> np.ndarray:
    """(...) the false-positive rate at the first threshold whose TPR reaches ``tpr``; see :func:`detection_metrics`."""
    return detection_metrics(scores, labels, mask, tpr=tpr)["fpr_at_95_tpr"]
