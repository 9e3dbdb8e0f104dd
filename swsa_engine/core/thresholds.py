"""Decision thresholds for anomaly scores, chosen without real labels, and how they fare with labels.

A detector says "anomaly" when its score is at least the threshold. Two label-free rules:

* :func:`normal_quantile_threshold` — from held-out normal images only. The threshold is the
  ``⌈(H + 1)·q⌉``-th smallest of ``H`` held-out normal scores (the split-conformal rank), so a
  new normal image from the same distribution is flagged with probability at most ``1 − q``
  (exchangeability; Vovk et al. 2005, Angelopoulos & Bates 2021, "A gentle introduction to
  conformal prediction"). The expected false-positive rate ``1 − q`` is what the report states.
  With too few normals (``⌈(H + 1)·q⌉ > H``) no finite threshold keeps that promise: +inf.
* :func:`f1_optimal_threshold` — from the synthetic validation set (held-out normals against
  synthetic anomalies): the score that maximises F1 there. Its false-positive rate on the
  held-out normals is returned with it, since that is the only rate one can state without
  real labels.

With real labels, :func:`f1_optimal_threshold` gives the F1-max threshold, and
:func:`rates_at_threshold` gives precision, recall and FPR of any threshold, which is how the
report compares the label-free rules with the truth.
"""

from __future__ import annotations

import numpy as np

from swsa_engine.core.metrics import sorted_counts
from swsa_engine.core.validation import as_bool_mask, as_real_array

__all__ = ["normal_quantile_threshold", "f1_optimal_threshold", "rates_at_threshold"]


def normal_quantile_threshold(normal_scores, mask=None, *, quantile: float = 0.99) -> np.ndarray:
    """(...) the split-conformal ``quantile`` threshold of the held-out normal scores (..., H).

    ``mask`` (..., H) bool marks the included normals (default all). The expected false-positive
    rate on new normal images is at most ``1 − quantile``; rows with too few normals for that
    (``⌈(H + 1)·quantile⌉ > H``) get +inf, rows with none NaN.
    """
    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}; e.g. quantile=0.99 for an expected FPR of 1 %")
    scores = as_real_array(normal_scores, "normal_scores").astype(np.float64)
    included = as_bool_mask(mask, "mask", scores.shape)
    bad = included & ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"normal_scores holds {int(bad.sum())} non-finite included score(s); mask them out")
    count = included.sum(axis=-1)
    rank = np.ceil((count + 1) * float(quantile) - 1e-12).astype(np.int64)  # 1-based order statistic
    ordered = np.sort(np.where(included, scores, np.inf), axis=-1)
    picked = np.take_along_axis(ordered, np.clip(rank - 1, 0, max(scores.shape[-1] - 1, 0))[..., None], axis=-1)[..., 0]
    threshold = np.where(rank > count, np.inf, picked)
    return np.where(count == 0, np.nan, threshold)[()]


def f1_optimal_threshold(scores, labels, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The threshold maximising F1 of every row, its F1 and its false-positive rate.

    scores (..., n), labels (..., n) or (n,) (True = anomaly), mask (..., n) → ``threshold``,
    ``f1``, ``fpr`` of shape (...). The threshold is a score of the row (predict "anomaly" when
    ``score >= threshold``); among equal F1 the highest threshold (fewest alarms). Rows with one
    class only are NaN.
    """
    tp, fp, thresholds, n_pos, n_neg, sorted_scores = sorted_counts("f1_optimal_threshold", scores, labels, mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(thresholds, 2.0 * tp / (tp + fp + n_pos[..., None]), -np.inf)
        best = np.argmax(f1, axis=-1)[..., None]  # first maximum = highest score
        threshold = np.take_along_axis(sorted_scores, best, axis=-1)[..., 0]
        best_f1 = np.take_along_axis(f1, best, axis=-1)[..., 0]
        fpr = np.take_along_axis(fp, best, axis=-1)[..., 0] / n_neg
    undefined = (n_pos == 0) | (n_neg == 0)
    return tuple(np.where(undefined, np.nan, value)[()] for value in (threshold, best_f1, fpr))


def rates_at_threshold(scores, labels, threshold, mask=None) -> dict[str, np.ndarray]:
    """Precision, recall (TPR) and FPR of ``score >= threshold`` per row.

    scores (..., n), labels (..., n) or (n,) bool, threshold (...) (broadcast), mask (..., n) →
    dict of (...) float64: ``precision`` (NaN when nothing is flagged), ``recall`` (NaN without
    anomalies), ``fpr`` (NaN without normals), ``flagged`` (share of included images flagged).
    """
    scores = as_real_array(scores, "scores").astype(np.float64)
    labels = np.broadcast_to(np.asarray(labels, dtype=bool), scores.shape)
    included = as_bool_mask(mask, "mask", scores.shape)
    flagged = included & (scores >= np.asarray(threshold, dtype=np.float64)[..., None])
    positive, negative = included & labels, included & ~labels
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "precision": ((flagged & positive).sum(-1) / flagged.sum(-1))[()],
            "recall": ((flagged & positive).sum(-1) / positive.sum(-1))[()],
            "fpr": ((flagged & negative).sum(-1) / negative.sum(-1))[()],
            "flagged": (flagged.sum(-1) / included.sum(-1))[()],
        }
