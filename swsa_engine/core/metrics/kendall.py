"""Kendall's tau-b and its p-value (two-sided, or one-sided with ``alternative``), batched, equal to
``scipy.stats.kendalltau`` row by row."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from scipy.special import ndtr

from swsa_engine.core.metrics.inputs import broadcast_shape, reject_nan_or_nonfinite, warn_undefined
from swsa_engine.core.validation import as_bool_mask, as_real_array

__all__ = ["kendall_tau", "ALTERNATIVES"]

# scipy.stats.kendalltau(method="auto") uses the exact null distribution when there are no
# ties and n is at most this, or (any n) when min(discordant, total - discordant) <= 1.
_KENDALL_EXACT_MAX_N = 33

#: the alternatives kendall_tau accepts, as in scipy.stats.kendalltau
ALTERNATIVES = ("two-sided", "greater", "less")

# kendall_tau materialises (rows, n, n) pairwise comparisons; rows are processed in blocks
# of at most this many pair elements to keep peak memory near a few tens of MiB.
_PAIRWISE_BLOCK_ELEMENTS = 1 << 22


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


@functools.lru_cache(maxsize=None)
def _kendall_exact_cdf_table(n: int) -> np.ndarray:
    """P(discordant <= k) for n untied observations under independence, k = 0..n(n-1)/2
    (n <= 33), from exact Mahonian numbers: the one-sided exact p-value of scipy's
    ``_kendall_p_exact(n, c, alternative)`` (which takes the complement plus the mass at c
    for the far tail; the same number)."""
    total = n * (n - 1) // 2
    permutation_count = math.factorial(n)
    return np.array([below / permutation_count for below in itertools.accumulate(_mahonian_numbers(n, total))])


def _kendall_exact_one_sided(n: int, opposing: np.ndarray) -> np.ndarray:
    """One-sided exact p-values P(K <= opposing) for n untied observations, K the null count of
    pairs ordered against the alternative (discordant pairs for "greater"). For n > 33 scipy
    only goes exact when min(K, total - K) <= 1: closed forms there, and the complement
    1 - P(K <= total - opposing - 1) in the far tail (as scipy: 0.0 once n! overflows)."""
    if n <= _KENDALL_EXACT_MAX_N:
        return _kendall_exact_cdf_table(n)[opposing]
    total = n * (n - 1) // 2
    near = [1.0 / math.factorial(n) if n < 171 else 0.0, 1.0 / math.factorial(n - 1) if n < 172 else 0.0]
    near_cdf = lambda k: np.where(k < 0, 0.0, np.where(k == 0, near[0], near[1]))
    return np.where(opposing <= 1, near_cdf(np.minimum(opposing, 1)), 1.0 - near_cdf(total - opposing - 1))


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


def kendall_tau(x, y, mask=None, *, alternative: str = "two-sided") -> tuple[np.ndarray, np.ndarray]:
    """Kendall's tau-b and its p-value for every row, batched over leading axes.

    Parameters
    ----------
    x, y : arrays of real numbers, shapes broadcastable to (..., n)
        The two rankings (or scores) to compare, paired along the last axis, which must
        have the same length n in both. Infinite values are ordered as usual.
    mask : array of bool, shape broadcastable to (..., n), optional
        True = entry included. Excluded entries are dropped, so rows may effectively have
        different lengths. Default: everything included.
    alternative : "two-sided" (default), "greater" (tau > 0) or "less" (tau < 0)
        The alternative hypothesis of the p-value, as in ``scipy.stats.kendalltau``; e.g.
        "greater" asks whether the two rankings agree.

    Returns
    -------
    tau, pvalue : np.ndarray of float64, each of shape (...)
        (``np.float64`` scalars for 1-d input.) Equal row by row to
        ``scipy.stats.kendalltau(x_row, y_row, alternative=alternative)`` with its other
        defaults: tau-b, and a p-value that is exact when there are no ties and n <= 33 or
        min(discordant, n(n-1)/2 - discordant) <= 1, else the normal approximation with
        tie corrections. Rows with fewer than two included entries, or where x or y is
        constant, are NaN in both outputs, with one :class:`UndefinedMetricWarning` per
        call (scipy returns the same NaN, not always with a warning).

    Raises
    ------
    ValueError
        Shapes that do not broadcast or differ in n; n == 0; NaN among included entries
        (scipy would silently return NaN; exclude such entries with ``mask`` instead); an
        unknown ``alternative``.

    Notes
    -----
    Uses O(n^2) pairwise comparisons, vectorised over (rows, n, n) blocks; meant for n up
    to a few hundred (e.g. candidate models).
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"kendall_tau: unknown alternative {alternative!r}; use one of {', '.join(ALTERNATIVES)}")
    x = as_real_array(x, "x")
    y = as_real_array(y, "y")
    mask = None if mask is None else as_bool_mask(mask, "mask")
    shape = broadcast_shape("kendall_tau", {"x": x, "y": y, "mask": mask})
    if shape[-1] == 0:
        raise ValueError(
            f"kendall_tau: `x` and `y` have no entries along their last axis (shape "
            f"{shape}); each row needs at least two paired values."
        )
    included = None if mask is None else np.broadcast_to(mask, shape)
    # Infinite values have a well-defined order (scipy ranks them); NaN has none.
    for name, values in (("x", x), ("y", y)):
        reject_nan_or_nonfinite(
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
    tau, pvalue = _kendall_from_counts(size, alternative=alternative, **counts)
    warn_undefined(
        "kendall_tau", np.isnan(tau), "they have fewer than two included entries or x or y "
        "is constant over them"
    )
    return tau.reshape(leading)[()], pvalue.reshape(leading)[()]


def _kendall_from_counts(
    size: np.ndarray,
    *,
    alternative: str = "two-sided",
    concordant: np.ndarray,
    discordant: np.ndarray,
    x_tie_pairs: np.ndarray,
    y_tie_pairs: np.ndarray,
    x_tie_cubic: np.ndarray,
    y_tie_cubic: np.ndarray,
    x_tie_variance: np.ndarray,
    y_tie_variance: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """tau-b and its p-value for ``alternative`` from per-row pair statistics (all int64, shape (r,)).

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
        pvalue = {"two-sided": lambda: 2 * ndtr(-np.abs(z)), "greater": lambda: ndtr(-z),
                  "less": lambda: ndtr(z)}[alternative]()

    no_ties = (x_tie_pairs == 0) & (y_tie_pairs == 0)
    use_exact = (
        ~undefined
        & no_ties
        & ((size <= _KENDALL_EXACT_MAX_N) | (np.minimum(discordant, total_pairs - discordant) <= 1))
    )
    # One table per distinct n (cached across calls); rows are looked up, not looped over.
    for n_value in np.unique(size[use_exact]):
        rows = use_exact & (size == n_value)
        if alternative == "two-sided":
            smaller_tail = np.minimum(concordant[rows], total_pairs[rows] - concordant[rows])
            pvalue[rows] = _kendall_exact_pvalue_table(int(n_value))[smaller_tail]
        else:  # P(pairs ordered against the alternative <= observed)
            opposing = discordant[rows] if alternative == "greater" else total_pairs[rows] - discordant[rows]
            pvalue[rows] = np.clip(_kendall_exact_one_sided(int(n_value), opposing), 0.0, 1.0)

    tau[undefined] = np.nan
    pvalue[undefined] = np.nan
    return tau, pvalue
