"""Batched ranking metrics: AUROC and Kendall's tau over many tasks in one call.

Every function works along the last axis and is vectorised over all leading axes, so a
single call evaluates hundreds of tasks (or candidates) without a Python loop over rows.
Ragged tasks are padded to a common length and described by a boolean ``mask`` (True =
entry included); excluded entries are ignored completely.

Results equal, row by row and to floating-point tolerance,

* ``sklearn.metrics.roc_auc_score`` for :func:`auroc` (ties included), and
* ``scipy.stats.kendalltau`` with its defaults (tau-b, ``method='auto'``, two-sided) for
  :func:`kendall_tau`, statistic and p-value, including scipy's choice between the exact
  and the asymptotic p-value.

Rows on which a metric is undefined (one class for AUROC; fewer than two entries or a
constant input for Kendall's tau) give NaN and a single :class:`UndefinedMetricWarning`
per call. Malformed input raises :class:`ValueError` saying what was expected, what
arrived and how to fix it.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import numpy as np
from scipy.special import ndtr

__all__ = ["UndefinedMetricWarning", "auroc", "kendall_tau", "rankdata_midrank"]

# scipy.stats.kendalltau(method="auto") uses the exact null distribution when there are no
# ties and n is at most this, or (any n) when min(discordant, total - discordant) <= 1.
_KENDALL_EXACT_MAX_N = 33

# kendall_tau materialises (rows, n, n) pairwise comparisons; rows are processed in blocks
# of at most this many pair elements to keep peak memory near a few tens of MiB.
_PAIRWISE_BLOCK_ELEMENTS = 1 << 22


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for some rows (e.g. a single class); NaN was returned there."""


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def _as_real_array(name: str, value) -> np.ndarray:
    """``value`` as an array of real numbers with at least one axis, or ValueError."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"`{name}` must be an array of real numbers, got dtype {array.dtype}. "
            f"Convert it first, e.g. np.asarray({name}, dtype=float)."
        )
    if array.ndim == 0:
        raise ValueError(
            f"`{name}` must have shape (..., n) with at least one axis, got a scalar. "
            f"Pass the n values of a row as a 1-d array."
        )
    return array


def _as_mask_array(mask) -> np.ndarray:
    """``mask`` as a boolean array with at least one axis, or ValueError."""
    array = np.asarray(mask)
    # Integer masks are refused rather than cast: an integer array is as likely to be a
    # list of indices as a 0/1 mask, and guessing wrong would silently change the result.
    if array.dtype != np.bool_:
        raise ValueError(
            f"`mask` must be boolean (True = entry included), got dtype {array.dtype}. "
            f"Convert a 0/1 mask with mask.astype(bool); build one from indices with "
            f"np.isin(np.arange(n), indices)."
        )
    if array.ndim == 0:
        raise ValueError(
            "`mask` must have shape (..., n) with at least one axis, got a scalar. "
            "Leave mask=None to include every entry."
        )
    return array


def _broadcast_shape(function: str, arrays: dict[str, np.ndarray | None]) -> tuple[int, ...]:
    """Common shape (..., n) of the named arrays, or ValueError naming the culprit.

    The last axis must have the same length n everywhere (it indexes the same entries);
    leading axes broadcast with numpy rules, so e.g. labels of shape (n,) serve every row.
    """
    present = {name: array for name, array in arrays.items() if array is not None}
    (first_name, first), *others = present.items()
    n = first.shape[-1]
    for name, array in others:
        if array.shape[-1] != n:
            raise ValueError(
                f"{function}: `{name}` has {array.shape[-1]} entries along its last axis "
                f"(shape {array.shape}) but `{first_name}` has {n} (shape {first.shape}); "
                f"both must describe the same n entries. Check that they come from the "
                f"same task, or pad ragged rows and pass a `mask`."
            )
    try:
        return np.broadcast_shapes(*(array.shape for array in present.values()))
    except ValueError:
        shapes = ", ".join(f"`{name}` {array.shape}" for name, array in present.items())
        raise ValueError(
            f"{function}: shapes {shapes} do not broadcast. Leading axes must be equal or "
            f"1 (or missing): e.g. scores (tasks, n) with labels (tasks, n) or (n,)."
        ) from None


def _format_index(name: str, index: tuple[int, ...]) -> str:
    return f"{name}[{', '.join(str(int(i)) for i in index)}]"


def _reject_nan_or_nonfinite(
    function: str, name: str, values: np.ndarray, included: np.ndarray | None, *, allow_inf: bool
) -> None:
    """Raise ValueError if an included entry is NaN (or, unless ``allow_inf``, infinite)."""
    if values.dtype.kind != "f":
        return  # integers and booleans are always finite
    bad = np.isnan(values) if allow_inf else ~np.isfinite(values)
    if included is not None:
        bad &= included
    bad_count = int(np.count_nonzero(bad))
    if bad_count == 0:
        return
    first = tuple(np.argwhere(bad)[0])
    what = "NaN" if allow_inf else "non-finite (NaN or infinite)"
    raise ValueError(
        f"{function}: `{name}` contains {bad_count} {what} value(s) among included entries; "
        f"the first is {_format_index(name, first)} = {values[first]}. Fix the values that "
        f"produced them, or exclude those entries with `mask` (False = excluded)."
    )


def _labels_as_bool(labels: np.ndarray, included: np.ndarray | None) -> np.ndarray:
    """Boolean labels (True = anomaly) from a boolean or 0/1 array, or ValueError."""
    if labels.dtype == np.bool_:
        return labels
    if labels.dtype.kind not in "iuf":
        raise ValueError(
            f"auroc: `labels` must be boolean (True = anomaly) or contain only 0 and 1, got "
            f"dtype {labels.dtype}. Build them with e.g. labels = (kind == 'anomaly')."
        )
    invalid = (labels != 0) & (labels != 1)
    if included is not None:
        invalid &= included
    if np.any(invalid):
        offending = np.unique(labels[invalid])[:5]
        raise ValueError(
            f"auroc: `labels` must be boolean (True = anomaly) or contain only 0 and 1, got "
            f"other values such as {offending.tolist()} (dtype {labels.dtype}). Convert them "
            f"with labels == anomaly_value."
        )
    return labels == 1


def _warn_undefined(function: str, undefined: np.ndarray, reason: str) -> None:
    undefined_count = int(np.count_nonzero(undefined))
    if undefined_count:
        warnings.warn(
            f"{function} is undefined for {undefined_count} of {undefined.size} row(s) "
            f"because {reason}; NaN was returned for those rows.",
            UndefinedMetricWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------


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
    scores = _as_real_array("scores", scores)
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise ValueError(
            "auroc: `labels` must have shape (..., n) or (n,) with one label per score, "
            "got a scalar."
        )
    mask = None if mask is None else _as_mask_array(mask)
    shape = _broadcast_shape("auroc", {"scores": scores, "labels": labels, "mask": mask})
    if shape[-1] == 0:
        raise ValueError(
            f"auroc: `scores` has no entries along its last axis (shape {shape}); each row "
            f"needs at least one normal and one anomalous entry."
        )

    scores = np.broadcast_to(scores, shape)
    included = None if mask is None else np.broadcast_to(mask, shape)
    is_anomaly = _labels_as_bool(np.broadcast_to(labels, shape), included)
    _reject_nan_or_nonfinite("auroc", "scores", scores, included, allow_inf=False)

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
    _warn_undefined(
        "auroc", undefined, "their included entries hold fewer than two classes (all normal, "
        "all anomalous, or none included); give every task both classes, or skip it"
    )
    return area[()]


# --------------------------------------------------------------------------------------
# Kendall's tau
# --------------------------------------------------------------------------------------


def _mahonian_numbers(n: int, max_inversions: int) -> list[int]:
    """Number of permutations of n items with k inversions, for k = 0..max_inversions.

    Exact Python integers: the null distribution of Kendall's discordant-pair count for n
    untied observations is this sequence divided by n!.
    """
    counts = [1] + [0] * max_inversions
    for items in range(2, n + 1):
        # Inserting the items-th element adds 0..items-1 inversions, so the new count at k
        # is a window sum of the old counts over k-items+1..k (a difference of prefix sums).
        prefix = list(itertools.accumulate(counts))
        counts = [
            prefix[k] - (prefix[k - items] if k >= items else 0)
            for k in range(max_inversions + 1)
        ]
    return counts


@functools.lru_cache(maxsize=None)
def _kendall_exact_pvalue_table(n: int) -> np.ndarray:
    """Two-sided exact p-values for n untied observations, indexed by c = min(con, dis).

    Mirrors scipy's ``_kendall_p_exact(n, c)`` (two-sided): c = 0 and c = 1 use the same
    closed forms as scipy (so very large n gives 0.0 where n! overflows a float, as
    scipy does); larger c (only reached for n <= 33) sums exact Mahonian numbers, which is
    at least as accurate as scipy's float recurrence. A p-value above 1 (c at the centre
    of the distribution counts its mass twice) is clipped to 1, as scipy does.
    """
    closed_forms = [
        2.0 / math.factorial(n) if n < 171 else 0.0,
        2.0 / math.factorial(n - 1) if n < 172 else 0.0,
    ]
    if n > _KENDALL_EXACT_MAX_N:
        table = closed_forms  # method='auto' only goes exact here when c <= 1
    else:
        max_c = n * (n - 1) // 4
        permutation_count = math.factorial(n)
        # Python's int / int true division is correctly rounded.
        from_counts = [
            2 * below / permutation_count
            for below in itertools.accumulate(_mahonian_numbers(n, max_c))
        ]
        table = (closed_forms + from_counts[2:])[: max_c + 1]
    return np.minimum(np.array(table, dtype=np.float64), 1.0)


def _kendall_pair_counts(
    x_rows: np.ndarray, y_rows: np.ndarray, included_rows: np.ndarray
) -> dict[str, np.ndarray]:
    """Pair statistics of rows (r, n) -> int64 arrays (r,), by pairwise comparison.

    concordant / discordant: pairs (both entries included) strictly ordered the same /
    the opposite way in x and y. For x (and likewise y): tie_pairs = number of tied pairs,
    and the tie-group sums scipy's variance needs, sum t(t-1)(t-2) and sum t(t-1)(2t+5),
    accumulated per entry as (t-1)(t-2) and (t-1)(2t+5) with t the size of its tie group.
    """
    pair_included = included_rows[:, :, None] & included_rows[:, None, :]
    counts = {}
    signs = {}
    for name, rows in (("x", x_rows), ("y", y_rows)):
        left, right = rows[:, :, None], rows[:, None, :]
        # Comparisons, not differences: correct for +-inf and for any integer range.
        signs[name] = (left > right).astype(np.int8) - (left < right).astype(np.int8)
        group_size = np.count_nonzero((left == right) & pair_included, axis=-1)
        group_size = np.where(included_rows, group_size, 1).astype(np.int64)
        others_in_group = group_size - 1
        counts[f"{name}_tie_pairs"] = others_in_group.sum(axis=-1) // 2
        counts[f"{name}_tie_cubic"] = (others_in_group * (group_size - 2)).sum(axis=-1)
        counts[f"{name}_tie_variance"] = (others_in_group * (2 * group_size + 5)).sum(axis=-1)
    agreement = signs["x"] * signs["y"]
    agreement[~pair_included] = 0
    # Every unordered pair appears twice in the (n, n) comparison matrix.
    counts["concordant"] = np.count_nonzero(agreement > 0, axis=(-2, -1)) // 2
    counts["discordant"] = np.count_nonzero(agreement < 0, axis=(-2, -1)) // 2
    return counts


def kendall_tau(x, y, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Kendall's tau-b and its two-sided p-value for every row, batched over leading axes.

    Parameters
    ----------
    x, y : arrays of real numbers, shapes broadcastable to (..., n)
        The two rankings (or scores) to compare, paired along the last axis, which must
        have the same length n in both. Infinite values are ordered as usual.
    mask : array of bool, shape broadcastable to (..., n), optional
        True = entry included. Excluded entries are dropped, so rows may effectively have
        different lengths. Default: everything included.

    Returns
    -------
    tau, pvalue : np.ndarray of float64, each of shape (...)
        (``np.float64`` scalars for 1-d input.) Equal row by row to
        ``scipy.stats.kendalltau(x_row, y_row)`` with its defaults: tau-b, and a two-sided
        p-value that is exact when there are no ties and n <= 33 or
        min(discordant, n(n-1)/2 - discordant) <= 1, else the normal approximation with
        tie corrections. Rows with fewer than two included entries, or where x or y is
        constant, are NaN in both outputs, with one :class:`UndefinedMetricWarning` per
        call (scipy returns the same NaN, not always with a warning).

    Raises
    ------
    ValueError
        Shapes that do not broadcast or differ in n; n == 0; NaN among included entries
        (scipy would silently return NaN; exclude such entries with ``mask`` instead).

    Notes
    -----
    Uses O(n^2) pairwise comparisons, vectorised over (rows, n, n) blocks; meant for n up
    to a few hundred (e.g. candidate models).
    """
    x = _as_real_array("x", x)
    y = _as_real_array("y", y)
    mask = None if mask is None else _as_mask_array(mask)
    shape = _broadcast_shape("kendall_tau", {"x": x, "y": y, "mask": mask})
    if shape[-1] == 0:
        raise ValueError(
            f"kendall_tau: `x` and `y` have no entries along their last axis (shape "
            f"{shape}); each row needs at least two paired values."
        )
    included = None if mask is None else np.broadcast_to(mask, shape)
    # Infinite values have a well-defined order (scipy ranks them); NaN has none.
    for name, values in (("x", x), ("y", y)):
        _reject_nan_or_nonfinite(
            "kendall_tau", name, np.broadcast_to(values, shape), included, allow_inf=True
        )

    leading, n = shape[:-1], shape[-1]
    x_rows = np.broadcast_to(x, shape).reshape(-1, n)
    y_rows = np.broadcast_to(y, shape).reshape(-1, n)
    included_rows = (
        np.ones((x_rows.shape[0], n), dtype=bool) if included is None else included.reshape(-1, n)
    )

    rows_per_block = max(1, _PAIRWISE_BLOCK_ELEMENTS // (n * n))
    blocks = [
        _kendall_pair_counts(
            x_rows[start : start + rows_per_block],
            y_rows[start : start + rows_per_block],
            included_rows[start : start + rows_per_block],
        )
        for start in range(0, x_rows.shape[0], rows_per_block)
    ]
    if blocks:
        counts = {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}
    else:  # zero rows: keep the int64 dtypes of empty statistics
        counts = _kendall_pair_counts(x_rows, y_rows, included_rows)
    size = included_rows.sum(axis=-1, dtype=np.int64)
    tau, pvalue = _kendall_from_counts(size, **counts)
    _warn_undefined(
        "kendall_tau", np.isnan(tau), "they have fewer than two included entries or x or y "
        "is constant over them"
    )
    return tau.reshape(leading)[()], pvalue.reshape(leading)[()]


def _kendall_from_counts(
    size: np.ndarray,
    *,
    concordant: np.ndarray,
    discordant: np.ndarray,
    x_tie_pairs: np.ndarray,
    y_tie_pairs: np.ndarray,
    x_tie_cubic: np.ndarray,
    y_tie_cubic: np.ndarray,
    x_tie_variance: np.ndarray,
    y_tie_variance: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """tau-b and two-sided p-value from per-row pair statistics (all int64, shape (r,)).

    Follows scipy.stats.kendalltau step by step, with the same floating-point operations
    in the same order, so that results agree to the last few bits.
    """
    total_pairs = size * (size - 1) // 2
    # All pairs tied in x (or y) means a constant input; this also covers size < 2.
    undefined = (x_tie_pairs == total_pairs) | (y_tie_pairs == total_pairs)
    con_minus_dis = concordant - discordant

    with np.errstate(divide="ignore", invalid="ignore"):
        tau = (
            con_minus_dis / np.sqrt(total_pairs - x_tie_pairs) / np.sqrt(total_pairs - y_tie_pairs)
        )
        tau = np.minimum(1.0, np.maximum(-1.0, tau))  # scipy clips rounding excursions

        # Asymptotic: con - dis is approximately normal with this tie-corrected variance
        # (Kendall 1970 / Noether 1967, as in scipy).
        m = size * (size - 1.0)
        variance = (
            (m * (2 * size + 5) - x_tie_variance - y_tie_variance) / 18
            + (2.0 * x_tie_pairs * y_tie_pairs) / m
            + (x_tie_cubic.astype(np.float64) * y_tie_cubic) / (9 * m * (size - 2))
        )
        z = con_minus_dis / np.sqrt(variance)
        pvalue = 2 * ndtr(-np.abs(z))

    no_ties = (x_tie_pairs == 0) & (y_tie_pairs == 0)
    use_exact = (
        ~undefined
        & no_ties
        & ((size <= _KENDALL_EXACT_MAX_N) | (np.minimum(discordant, total_pairs - discordant) <= 1))
    )
    # One table per distinct n (cached across calls); rows are looked up, not looped over.
    for n_value in np.unique(size[use_exact]):
        rows = use_exact & (size == n_value)
        smaller_tail = np.minimum(concordant[rows], total_pairs[rows] - concordant[rows])
        pvalue[rows] = _kendall_exact_pvalue_table(int(n_value))[smaller_tail]

    tau[undefined] = np.nan
    pvalue[undefined] = np.nan
    return tau, pvalue
