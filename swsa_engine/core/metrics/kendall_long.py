"""Kendall's tau-b of many long rows in O(n log n) each (no p-value): :func:`kendall_tau_b_long`.

:func:`~swsa_engine.core.metrics.kendall.kendall_tau` compares every pair of entries, O(n²) per
row, vectorised over rows: right for rankings of a few hundred candidates, far too slow for
rankings of thousands of test images (model centrality compares every pair of candidates'
rankings of a task's test images: on the paper-shaped bench, 14,805 pairs of 7,169-image
rankings took 389 s that way). Here each row goes to ``scipy.stats.kendalltau``, whose Knight
algorithm (sort by (x, y), count y's inversions by merge sort, correct for ties) is
O(n log n) in compiled code: about 0.9 ms per 7,169-entry row, 13 s for that bench. A
vectorised Fenwick-tree count over all rows was tried and was 6× slower (its random accesses).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import kendalltau

from swsa_engine.core.validation import as_bool_mask, as_real_array

__all__ = ["kendall_tau_b_long"]


def kendall_tau_b_long(x, y, mask=None) -> np.ndarray:
    """Kendall's tau-b of every row of ``x`` and ``y`` (R, n), over the entries ``mask`` (R, n) keeps.

    Equal to ``scipy.stats.kendalltau(x_row, y_row).statistic`` on the kept entries (ties handled
    as tau-b does); NaN where fewer than two entries are kept or x or y is constant on them.
    ``x`` and ``y`` must not hold NaN where kept (±inf allowed: only the order matters).
    """
    x = as_real_array(x, "x", ndim=2, shape_doc="(R, n)").astype(np.float64, copy=False)
    y = as_real_array(y, "y", ndim=2, shape_doc="(R, n)").astype(np.float64, copy=False)
    if x.shape != y.shape:
        raise ValueError(f"x {x.shape} and y {y.shape} must have the same shape (R, n)")
    keep = as_bool_mask(mask, "mask", x.shape, "(R, n)")
    if (keep & (np.isnan(x) | np.isnan(y))).any():
        raise ValueError("x and y must not hold NaN among the kept entries; leave such entries out with `mask`")
    out = np.full(x.shape[0], np.nan)
    whole = keep.all(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant row: NaN, said by the caller
        for r in np.flatnonzero(keep.sum(axis=1) >= 2):
            xr, yr = (x[r], y[r]) if whole[r] else (x[r, keep[r]], y[r, keep[r]])
            out[r] = kendalltau(xr, yr).statistic
    return out
