"""AUPR, F1-max and FPR@95TPR of the normals against each group of anomalies, from one sort per row.

:func:`grouped_detection_metrics` gives, for every row and every group ``g``, what
:func:`~swsa_engine.core.metrics.detection_metrics` gives on that row with only its normals and the
anomalies of ``g`` included — the same floats — without sorting the row once per group:

1. one sort of each row over its normals and grouped anomalies (:func:`~swsa_engine.core.metrics.sort_rows`);
2. group ``g``'s entries keep that order, so an entry's place among them is the number of normals
   before it plus the number of ``g``'s anomalies before it: an anomaly's from its rank within its
   group (a stable sort of small integers), a normal's from a running count of each group's
   anomalies by how many normals precede them;
3. each group's entries are laid into a compact row (:func:`summation_widths` wide) whose counts and
   metrics come from :func:`~swsa_engine.core.metrics.counts_of_sorted` and
   :func:`~swsa_engine.core.metrics.curve_values`, the code of ``detection_metrics`` itself.

Beyond the sort the work is linear in ``Σ_g (N + P_g)`` per row (N normals, P_g anomalies of g),
not in ``G × n``. Why the floats are the same: TP and FP at every threshold are the same integers
(a threshold is a tie group's last included entry, and its counts do not depend on the order
within the tie), F1 and FPR are elementwise, and the AUPR adds the same terms in the same order:
numpy sums a row pairwise, halving a row of more than 128 entries at a multiple of 8, so when every
entry beyond ``W`` is zero the sum over the row's ``n`` entries is the sum over its first ``W``
for each ``W`` on the left edge of that split — checked on a probe row at first use for each ``n``;
where the probe disagrees (another numpy) every group's row is ``n`` wide, as before.
"""

from __future__ import annotations

import functools

import numpy as np

from swsa_engine.core.metrics.curves import (DETECTION_METRICS, check_tpr, counts_of_sorted, curve_values,
                                             sort_rows)
from swsa_engine.core.metrics.inputs import broadcast_shape, reject_nan_or_nonfinite
from swsa_engine.core.validation import as_real_array

__all__ = ["grouped_detection_metrics", "summation_widths"]

#: numpy sums up to this many entries in one unrolled loop and halves longer rows (pairwise summation)
PAIRWISE_BLOCK = 128
#: rows are processed in chunks of about this many entries (sorted rows, per-group counts, compact rows)
CHUNK_ENTRIES = 2 ** 22


@functools.lru_cache(maxsize=64)
def summation_widths(n: int) -> tuple[int, ...]:
    """Ascending widths ``W ≤ n`` such that numpy's sum along the last axis of ``n`` entries whose
    last ``n − W`` are zero equals its sum of the first ``W``: ``n`` and the left parts of its
    pairwise split. ``(n,)`` alone when a probe row (distinct mantissas) says otherwise."""
    widths = [int(n)]
    while widths[-1] > PAIRWISE_BLOCK:
        half = widths[-1] // 2
        widths.append(half - half % 8)
    # irregular mantissas: another order of the additions shows in the last bits
    terms = (np.arange(1, n + 1) * 0.6180339887498949) % 1.0 + 0.5
    for width in widths[1:]:
        row = np.zeros((2, n))
        row[:, :width] = terms[:width]
        if not np.array_equal(row.sum(axis=-1), np.ascontiguousarray(row[:, :width]).sum(axis=-1)):
            return (int(n),)
    return tuple(widths[::-1])


def _checked_inputs(scores, labels, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """The three arrays validated and their common shape (..., n)."""
    scores = as_real_array(scores, "scores")
    labels, groups = np.asarray(labels), np.asarray(groups)
    shape = broadcast_shape("grouped_detection_metrics", {"scores": scores, "labels": labels, "groups": groups})
    if labels.dtype.kind not in "iu" or (labels.size and (labels.min() < -1 or labels.max() > 1)):
        found = (f"values such as {np.unique(labels[(labels < -1) | (labels > 1)])[:5].tolist()}"
                 if labels.dtype.kind in "iu" else f"dtype {labels.dtype}")
        raise ValueError(f"grouped_detection_metrics: `labels` must be integers -1 (excluded), 0 (normal) or 1 "
                         f"(anomaly), got {found}; build them with e.g. np.where(keep, is_anomaly, -1).astype(np.int8)")
    if groups.dtype.kind not in "iu":
        raise ValueError(f"grouped_detection_metrics: `groups` must be integer group indices (an anomaly's group, "
                         f"-1 elsewhere), got dtype {groups.dtype}; pass groups.astype(np.int64)")
    return scores, labels, groups, shape


def grouped_detection_metrics(scores, labels, groups, n_groups: int, *, tpr: float = 0.95) -> dict[str, np.ndarray]:
    """AUPR, F1-max and FPR at ``tpr`` TPR of the normals against each group of anomalies, every row.

    scores (..., n) float (higher = more anomalous; any value where ``labels == -1``), labels
    (..., n) int: -1 excluded, 0 normal, 1 anomaly; groups (..., n) int: an anomaly's group in
    ``[0, n_groups)`` (an anomaly of no such group is in no group's set); the three broadcast.
    Returns a dict of (..., n_groups) float64 under :data:`DETECTION_METRICS`: for group ``g``, the
    floats of ``detection_metrics(scores, labels == 1, (labels == 0) | ((labels == 1) & (groups ==
    g)))``; NaN, without a warning, where a row has no normal or no anomaly of ``g``.
    """
    tpr = check_tpr(tpr)
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or n_groups < 0:
        raise ValueError(f"grouped_detection_metrics: n_groups must be a whole number >= 0 (the groups are 0 … "
                         f"n_groups - 1), got {n_groups!r}; pass e.g. n_groups=int(groups.max()) + 1")
    n_groups = int(n_groups)
    scores, labels, groups, shape = _checked_inputs(scores, labels, groups)
    lead, n = shape[:-1], shape[-1]
    out = {name: np.full(lead + (n_groups,), np.nan) for name in DETECTION_METRICS}
    n_rows = int(np.prod(lead, dtype=np.int64))
    if n == 0 or n_groups == 0 or n_rows == 0:
        return out
    scores, labels, groups = (np.broadcast_to(a, shape) for a in (scores, labels, groups))
    included = (labels == 0) | ((labels == 1) & (groups >= 0) & (groups < n_groups))
    reject_nan_or_nonfinite("grouped_detection_metrics", "scores", scores, included, allow_inf=False,
                            how_to_exclude="label those entries -1 (excluded)")
    lead = lead or (1,)  # one row: as a (1, n) array
    scores, labels, groups = (a.reshape(lead + (n,)) for a in (scores, labels, groups))
    most_normals = int((labels == 0).sum(axis=-1).max())
    step = max(1, CHUNK_ENTRIES // (4 * n + 3 * n_groups * (most_normals + 1)))
    flat = {name: value.reshape(n_rows, n_groups) for name, value in out.items()}
    for start in range(0, n_rows, step):
        index = np.unravel_index(np.arange(start, min(start + step, n_rows)), lead)  # copies only this chunk
        values = _chunk_metrics(scores[index], labels[index].astype(np.int8), groups[index], n_groups, tpr)
        for name, value in zip(DETECTION_METRICS, values):
            flat[name][start:start + step] = value
    return out


def _chunk_metrics(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_groups: int,
                   tpr: float) -> tuple[np.ndarray, ...]:
    """(R, G) AUPR, F1-max, FPR of rows (R, n) (NaN where a group or the normals are missing)."""
    grouped = (labels == 1) & (groups >= 0) & (groups < n_groups)
    rows = sort_rows("grouped_detection_metrics", scores, grouped, grouped | (labels == 0))
    group_sorted = np.where(rows.positive, np.take_along_axis(groups, rows.order, axis=1), n_groups)
    normals_before = np.cumsum(rows.negative, axis=1, dtype=np.int64) - rows.negative
    anomaly = _anomaly_places(group_sorted, normals_before, rows.keys, n_groups)
    n_neg = rows.n_neg
    n_pos = np.bincount(anomaly["row"] * n_groups + anomaly["group"], minlength=len(n_neg) * n_groups)
    n_pos = n_pos.reshape(len(n_neg), n_groups)
    normal = _normal_places(rows.negative, rows.keys, normals_before, anomaly, n_groups)
    out = np.full((3,) + n_pos.shape, np.nan)
    widths = np.asarray(summation_widths(scores.shape[1]))
    width_of = widths[np.searchsorted(widths, n_pos + n_neg[:, None])]
    active = (n_pos > 0) & (n_neg[:, None] > 0)
    for width in np.unique(width_of[active]):
        pair_row, pair_group = np.nonzero(active & (width_of == width))
        keys, positive, negative = _compact_rows(pair_row, pair_group, int(width), anomaly, normal, n_neg, n_groups)
        tp, fp, thresholds = counts_of_sorted(keys, positive, negative)
        out[:, pair_row, pair_group] = curve_values(tp, fp, thresholds, n_pos[pair_row, pair_group], n_neg[pair_row], tpr)
    return tuple(out)


def _anomaly_places(group_sorted: np.ndarray, normals_before: np.ndarray, keys: np.ndarray,
                    n_groups: int) -> dict[str, np.ndarray]:
    """Every grouped anomaly of the sorted rows (R, n) (``group_sorted`` its group, ``n_groups``
    elsewhere): its ``row``, ``group``, ``key``, ``normals`` before it and ``slot`` in its group's
    row (normals before it + its rank among its group's anomalies), each (A,)."""
    n_rows, n = group_sorted.shape
    small = np.int16 if n_groups < np.iinfo(np.int16).max else np.int64  # a radix sort for few groups
    by_group = np.argsort(group_sorted.astype(small), axis=1, kind="stable")  # group by group, in sorted order
    group_of = np.take_along_axis(group_sorted, by_group, axis=1)
    counts = np.bincount((np.arange(n_rows)[:, None] * (n_groups + 1) + group_of).ravel(),
                         minlength=n_rows * (n_groups + 1)).reshape(n_rows, n_groups + 1)
    starts = np.cumsum(counts, axis=1) - counts
    row, rank = np.nonzero(group_of < n_groups)
    group = group_of[row, rank]
    place = by_group[row, rank]
    before = normals_before[row, place]
    return {"row": row, "group": group, "key": keys[row, place], "normals": before,
            "slot": before + rank - starts[row, group]}


def _normal_places(negative: np.ndarray, keys: np.ndarray, normals_before: np.ndarray, anomaly: dict,
                   n_groups: int) -> dict[str, np.ndarray]:
    """The normals of the sorted rows (R, n): ``keys`` (R, M) in order (-inf padded, M the most
    normals of a row) and ``anomalies_before`` (R, G, M): group g's anomalies before normal j
    (those with at most j normals before them)."""
    n_rows = negative.shape[0]
    most = int(negative.sum(axis=1).max()) if n_rows else 0
    row, place = np.nonzero(negative)
    normal_keys = np.full((n_rows, most), -np.inf)
    normal_keys[row, normals_before[row, place]] = keys[row, place]
    counted = np.bincount((anomaly["row"] * n_groups + anomaly["group"]) * (most + 1) + anomaly["normals"],
                          minlength=n_rows * n_groups * (most + 1)).reshape(n_rows, n_groups, most + 1)
    return {"keys": normal_keys, "anomalies_before": np.cumsum(counted[..., :most], axis=2)}


def _compact_rows(pair_row: np.ndarray, pair_group: np.ndarray, width: int, anomaly: dict, normal: dict,
                  n_neg: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sorted rows (K, ``width``) of K (row, group) pairs: keys (-inf after the pair's entries)
    and which entries are its anomalies / its normals."""
    n_pairs = len(pair_row)
    local = np.full(len(n_neg) * n_groups, -1)
    local[pair_row * n_groups + pair_group] = np.arange(n_pairs)
    keys = np.full((n_pairs, width), -np.inf)
    positive = np.zeros((n_pairs, width), bool)
    negative = np.zeros((n_pairs, width), bool)
    pair_of = local[anomaly["row"] * n_groups + anomaly["group"]]
    taken = pair_of >= 0
    keys[pair_of[taken], anomaly["slot"][taken]] = anomaly["key"][taken]
    positive[pair_of[taken], anomaly["slot"][taken]] = True
    most = normal["keys"].shape[1]
    pair, j = np.nonzero(np.arange(most)[None, :] < n_neg[pair_row][:, None])
    slot = j + normal["anomalies_before"][pair_row[pair], pair_group[pair], j]
    keys[pair, slot] = normal["keys"][pair_row[pair], j]
    negative[pair, slot] = True
    return keys, positive, negative
