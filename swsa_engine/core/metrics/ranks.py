"""Mid-ranks and AUROC (the Mann-Whitney U statistic), batched over all leading axes."""

from __future__ import annotations

import numpy as np

from swsa_engine.core.metrics.inputs import broadcast_shape, reject_nan_or_nonfinite, warn_undefined
from swsa_engine.core.validation import as_bool_mask, as_real_array

__all__ = ["auroc", "labels_as_bool", "rankdata_midrank"]


def labels_as_bool(labels: np.ndarray, included: np.ndarray | None, function: str = "auroc") -> np.ndarray:
    """Boolean labels (True = anomaly) from a boolean or 0/1 array (entries outside ``included`` are
    not checked), or ValueError worded for ``function``."""
    if labels.dtype == np.bool_:
        return labels
    if labels.dtype.kind not in "iuf":
        raise ValueError(
            f"{function}: `labels` must be boolean (True = anomaly) or contain only 0 and 1, got "
            f"dtype {labels.dtype}. Build them with e.g. labels = (kind == 'anomaly')."
        )
    invalid = (labels != 0) & (labels != 1)
    if included is not None:
        invalid &= included
    if np.any(invalid):
        offending = np.unique(labels[invalid])[:5]
        raise ValueError(
            f"{function}: `labels` must be boolean (True = anomaly) or contain only 0 and 1, got "
            f"other values such as {offending.tolist()} (dtype {labels.dtype}). Convert them "
            f"with labels == anomaly_value."
        )
    return labels == 1


def _doubled_midranks_of_sorted(sorted_values: np.ndarray) -> np.ndarray:
    """Twice the 1-based mid-rank of every entry of rows already sorted along the last axis.

    Shape (..., n) -> int64 (..., n). Doubling keeps mid-ranks (which can end in .5) exact
    integers. A tie group spanning sorted positions start..end (0-based, inclusive) has
    mid-rank (start + end) / 2 + 1, i.e. doubled start + end + 2; start and end are found
    for every position at once with running max / min over group boundaries.
    """
    n = sorted_values.shape[-1]
    positions = np.arange(n, dtype=np.int64)
    starts_group = np.ones(sorted_values.shape, dtype=bool)
    starts_group[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    ends_group = np.ones(sorted_values.shape, dtype=bool)
    ends_group[..., :-1] = starts_group[..., 1:]
    group_start = np.maximum.accumulate(np.where(starts_group, positions, 0), axis=-1)
    group_end_reversed = np.where(ends_group, positions, n - 1)[..., ::-1]
    group_end = np.minimum.accumulate(group_end_reversed, axis=-1)[..., ::-1]
    return group_start + group_end + 2


def rankdata_midrank(a, axis: int | None = -1) -> np.ndarray:
    """Ranks 1..n along ``axis`` with tied values sharing their mean rank.

    Equals ``scipy.stats.rankdata(a, method='average', axis=axis)``: ``a`` of any shape
    gives float64 ranks of the same shape (``axis=None`` ranks the flattened array, and a
    scalar counts as one value); a slice containing NaN gives NaN throughout, as scipy's
    default ``nan_policy='propagate'`` does.
    """
    array = np.atleast_1d(np.asarray(a))
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"rankdata_midrank: `a` must be an array of real numbers, got dtype "
            f"{array.dtype}. Convert it first, e.g. np.asarray(a, dtype=float)."
        )
    if axis is None:
        array, axis = array.ravel(), -1
    rows = np.moveaxis(array, axis, -1)
    ranks = np.empty(rows.shape, dtype=np.float64)
    if rows.shape[-1] > 0:
        order = np.argsort(rows, axis=-1)
        doubled = _doubled_midranks_of_sorted(np.take_along_axis(rows, order, axis=-1))
        np.put_along_axis(ranks, order, doubled / 2.0, axis=-1)
        if rows.dtype.kind == "f":
            ranks[np.isnan(rows).any(axis=-1)] = np.nan
    return np.moveaxis(ranks, -1, axis)


def auroc(scores, labels, mask=None) -> np.ndarray:
    """Area under the ROC curve of every row, batched over leading axes.

    Parameters
    ----------
    scores : array of float, shape (..., n)
        Anomaly scores; higher means more anomalous. Must be finite where included.
    labels : array of bool, shape (..., n) or (n,)
        True = anomaly, False = normal; 0/1 numbers are accepted too. Broadcasts against
        ``scores`` over the leading axes (the last axis must match).
    mask : array of bool, shape broadcastable to (..., n), optional
        True = entry included. Excluded entries are ignored completely, so padded ragged
        tasks evaluate as if they had their own length. Default: everything included.

    Returns
    -------
    np.ndarray of float64, shape (...)
        AUROC per row (an ``np.float64`` scalar for 1-d input), equal to
        ``sklearn.metrics.roc_auc_score(labels_row, scores_row)`` with ties counted as
        one half. Rows whose included entries hold only one class (or none) are NaN, and
        one :class:`UndefinedMetricWarning` per call reports how many.

    Raises
    ------
    ValueError
        Shapes that do not broadcast or differ in n; n == 0; labels that are not boolean
        or 0/1; non-finite scores among included entries.

    Notes
    -----
    Computed as the Mann-Whitney U statistic with mid-ranks, U / (n_pos * n_neg), which
    is exactly the trapezoidal ROC area; ranks are kept as doubled int64 so the only
    rounding is the final division.
    """
    scores = as_real_array(scores, "scores")
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise ValueError(
            "auroc: `labels` must have shape (..., n) or (n,) with one label per score, "
            "got a scalar."
        )
    mask = None if mask is None else as_bool_mask(mask, "mask")
    shape = broadcast_shape("auroc", {"scores": scores, "labels": labels, "mask": mask})
    if shape[-1] == 0:
        raise ValueError(
            f"auroc: `scores` has no entries along its last axis (shape {shape}); each row "
            f"needs at least one normal and one anomalous entry."
        )

    scores = np.broadcast_to(scores, shape)
    included = None if mask is None else np.broadcast_to(mask, shape)
    is_anomaly = labels_as_bool(np.broadcast_to(labels, shape), included)
    reject_nan_or_nonfinite("auroc", "scores", scores, included, allow_inf=False)

    sort_keys = scores.astype(np.float64, copy=False)
    is_positive, is_negative = is_anomaly, ~is_anomaly
    if included is not None:
        # Excluded entries become +inf: they sort after every (finite) included entry and
        # never join an included tie group, so included entries keep their own ranks.
        sort_keys = np.where(included, sort_keys, np.inf)
        is_positive = is_positive & included
        is_negative = is_negative & included

    order = np.argsort(sort_keys, axis=-1)
    doubled_ranks = _doubled_midranks_of_sorted(np.take_along_axis(sort_keys, order, axis=-1))
    positive_in_order = np.take_along_axis(is_positive, order, axis=-1)
    doubled_rank_sum = np.where(positive_in_order, doubled_ranks, 0).sum(axis=-1)
    positive_count = is_positive.sum(axis=-1, dtype=np.int64)
    negative_count = is_negative.sum(axis=-1, dtype=np.int64)

    # Mann-Whitney: U = R_pos - n_pos (n_pos + 1) / 2, here doubled to stay integral.
    doubled_u = doubled_rank_sum - positive_count * (positive_count + 1)
    undefined = (positive_count == 0) | (negative_count == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        area = doubled_u / (2.0 * positive_count * negative_count)
    area = np.where(undefined, np.nan, area)
    warn_undefined(
        "auroc", undefined, "their included entries hold fewer than two classes (all normal, "
        "all anomalous, or none included); give every task both classes, or skip it"
    )
    return area[()]
