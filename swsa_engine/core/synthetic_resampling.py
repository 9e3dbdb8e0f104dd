"""Bootstrap resamples of each task's synthetic validation set, and the synthetic AUROCs on them.

Shared by :mod:`swsa_engine.core.pick_confidence` (how stable a pick is) and
:mod:`swsa_engine.core.recommendation` (whether a single pick beats the ensemble on the synthetic
sets with high probability): both resample with the same draws (:func:`resample_positions`), so
their numbers are comparable. Moved here from ``pick_confidence`` unchanged (it re-exports every
name), so that :mod:`swsa_engine.core.selection` can use it without an import cycle. Pure arrays: no I/O.
"""

from __future__ import annotations

import numpy as np

from swsa_engine.core.validation import as_real_array, check_positive_int

__all__ = ["DEFAULT_RESAMPLES", "DEFAULT_SEED", "MAX_GATHERED", "resample_positions", "part_aurocs_finite",
           "resampled_aurocs", "tie_groups"]

#: bootstrap resamples of each task's synthetic validation set
DEFAULT_RESAMPLES = 200
#: the seed of ``numpy.random.default_rng`` that draws them
DEFAULT_SEED = 0
#: at most this many scores are gathered at once (the resamples are processed in chunks)
MAX_GATHERED = 2 ** 22


def _checked_parts(parts, n_sources: int) -> np.ndarray:
    """``parts`` (T, W) as int64 with every value in [-1, n_sources]."""
    parts = np.asarray(parts)
    if parts.ndim != 2 or not np.issubdtype(parts.dtype, np.integer):
        raise ValueError(f"synthetic_part must be an integer array of shape (T, W), got {parts.dtype} {parts.shape}")
    if parts.size and (parts.min() < -1 or parts.max() > n_sources):
        raise ValueError(f"synthetic_part values must lie in [-1, {n_sources}] (-1 padding, 0 held-out normal, v + 1 "
                         f"source v of {n_sources}), got [{parts.min()}, {parts.max()}]")
    return parts.astype(np.int64)


def resample_positions(parts, n_sources: int, n_resamples: int = DEFAULT_RESAMPLES,
                       seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws of every task's synthetic validation set, part by part.

    ``parts`` (T, W): 0 held-out normal, ``v + 1`` anomaly of source ``v``, -1 padding. Returns
    ``positions`` (T, B, W') into the W axis and ``resampled_parts`` (T, W'), the resampled
    set laid out in blocks, part 0 then 1 … V, each as wide as its largest count ``m_p``
    (``resampled_parts`` -1 on a task's padding). The draws: ``rng = default_rng(seed)``; for
    each part p in order, ``u = rng.random((T, B, m_p))``; task t's j-th draw (j < n_tp, its count)
    is its ``floor(u · n_tp)``-th query of part p in the order of W. Padding points at position 0.
    """
    parts = _checked_parts(parts, n_sources)
    n_resamples = check_positive_int(n_resamples, "n_resamples", f"n_resamples={DEFAULT_RESAMPLES}")
    rng = np.random.default_rng(seed)
    n_tasks = parts.shape[0]
    blocks, block_parts = [], []
    for part in range(n_sources + 1):
        member = parts == part
        counts = member.sum(axis=1)
        width = int(counts.max()) if n_tasks else 0
        # each task's positions of part p, in W order, padded with 0
        order = np.argsort(~member, axis=1, kind="stable")[:, :max(width, 1)]
        u = rng.random((n_tasks, n_resamples, width))
        draw = np.minimum(np.floor(u * counts[:, None, None]).astype(np.int64), np.maximum(counts - 1, 0)[:, None, None])
        picked = np.take_along_axis(order[:, None, :width], draw, axis=2) if width else draw
        valid = np.arange(width)[None, :] < counts[:, None]
        blocks.append(np.where(valid[:, None, :], picked, 0))
        block_parts.append(np.where(valid, part, -1))
    return np.concatenate(blocks, axis=2), np.concatenate(block_parts, axis=1)


def part_aurocs_finite(scores, parts, n_sources: int, hardest: tuple[int, ...] = ()) -> np.ndarray:
    """(T, ..., V) synthetic AUROC per source from scores (T, ..., W) with ``parts`` (T, W) as in
    :func:`resample_positions`; a NaN (or infinite) score leaves that query out for that candidate
    only, as the cube's sweep does. NaN where a task (or candidate) lacks the normals or the source's
    anomalies. With ``hardest`` (N, ...) the V × len(hardest) AUROCs of each source's N hardest
    anomalies (its N lowest scores) follow, source by source (the cube's ``source@hardN`` columns).

    One sort serves every source: an anomaly's doubled Mann-Whitney count is twice the held-out
    normals below its score plus those tied with it, summed per source and divided by
    ``2 n_normal n_source`` — the same integers, and the same one division, as
    :func:`~swsa_engine.core.metrics.auroc` on each source's subset, so the values are identical
    (the N hardest are the first N of the source in the sorted row). Only tied entries are
    visited beyond the running count of normals, and when every query of a task is scored its
    parts are read from the (T, W) array rather than copied per row. ``parts`` may number other
    groups than synthetic sources (e.g. 0 normal, g + 1 an anomaly of class g).
    """
    values = as_real_array(scores, "synthetic_scores").astype(np.float64, copy=False)
    parts = _checked_parts(parts, n_sources)
    if values.ndim < 2 or values.shape[0] != parts.shape[0] or values.shape[-1] != parts.shape[1]:
        raise ValueError(f"synthetic_scores {values.shape} must be (T, ..., W) for synthetic_part {parts.shape}")
    if n_sources == 0:
        return np.zeros(values.shape[:-1] + (0,))
    n_tasks, width = parts.shape
    per_task = int(np.prod(values.shape[1:-1], dtype=np.int64))
    rows = values.reshape(n_tasks, per_task, width)
    in_part = (parts >= 0)[:, None, :]
    unscored = in_part & ~np.isfinite(rows)  # a NaN score: that query is out, for that candidate only
    if unscored.any():
        row_parts = np.where(unscored, -1, parts[:, None, :]).reshape(n_tasks * per_task, width)
        keys = np.where(in_part & ~unscored, rows, np.inf).reshape(n_tasks * per_task, width)
    else:
        row_parts = None
        keys = np.where(in_part, rows, np.inf).reshape(n_tasks * per_task, width)
    sums, counts = _doubled_counts_by_part(keys, parts, row_parts, per_task, n_sources, tuple(hardest))
    n_normal = counts[:, 1:2]
    # the anomalies each column compares: the source's, or its N hardest (at most N of them)
    n_anomaly = np.concatenate([counts[:, 2:]] + [np.minimum(counts[:, 2:], int(n)) for n in hardest], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        area = sums / (2.0 * n_anomaly * n_normal)
    area = np.where((n_anomaly == 0) | (n_normal == 0), np.nan, area)
    if hardest:  # (R, H blocks of V) → the cube's order: each source's hardest N in turn
        hard = area[:, n_sources:].reshape(-1, len(hardest), n_sources).transpose(0, 2, 1)
        area = np.concatenate([area[:, :n_sources], hard.reshape(-1, n_sources * len(hardest))], axis=1)
    return area.reshape(values.shape[:-1] + (area.shape[1],))


def _doubled_counts_by_part(keys: np.ndarray, parts: np.ndarray, row_parts: np.ndarray | None, per_task: int,
                            n_sources: int, hardest: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``keys`` (R, W) (+inf: out): the anomalies' doubled counts of normals below
    (+ tied) summed per source and then over each source's N hardest for N in ``hardest`` →
    (R, V × (1 + H)); and the queries of each part -1 … V counted → (R, V + 2). ``parts`` (T, W)
    are the parts of every row (R = T × ``per_task``, task-major) unless ``row_parts`` (R, W) says otherwise."""
    n_rows, width = keys.shape
    order = np.argsort(keys, axis=1)
    if row_parts is None:  # every row of a task shares its parts: read them from the (T, W) array
        task_start = np.repeat(np.arange(parts.shape[0]) * width, per_task)[:, None]
        ordered_parts = parts.astype(np.int8 if n_sources < 127 else np.int64).reshape(-1)[order + task_start]
        counts = np.repeat(_part_counts(parts, n_sources), per_task, axis=0)
    else:
        ordered_parts = np.take_along_axis(row_parts, order, axis=1)
        counts = _part_counts(row_parts, n_sources)
    order += (np.arange(n_rows) * width)[:, None]
    ordered_keys = keys.reshape(-1)[order]
    del order
    normal = ordered_parts == 0
    # doubled counts reach 2 W per entry and 2 W² per row: int32 while that fits
    count_type = np.int32 if 2 * width * width < 2 ** 31 else np.int64
    inclusive = np.cumsum(normal, axis=1, dtype=count_type)
    # outside a tie group an anomaly's doubled count is twice the normals before it in the sorted row
    doubled = inclusive * count_type(2)
    first, last, members = tie_groups(ordered_keys)
    if members.size:  # in a group: the normals before the group plus those up to its end
        flat_inclusive = inclusive.reshape(-1)
        value = flat_inclusive[first] - normal.reshape(-1)[first] + flat_inclusive[last]
        doubled.reshape(-1)[members] = np.repeat(value, last - first + 1)
    return _sums_by_part(doubled, ordered_parts, n_sources, hardest), counts


def _sums_by_part(doubled: np.ndarray, ordered_parts: np.ndarray, n_sources: int, hardest: tuple) -> np.ndarray:
    """(R, V × (1 + H)) the ``doubled`` counts (R, W) summed over each part 1 … V of the sorted
    rows, then over each part's first N entries (its N lowest scores) for N in ``hardest``."""
    n_rows = doubled.shape[0]
    if n_sources > 8 and not hardest:  # many parts (e.g. classes): one pass
        slot = ordered_parts.astype(np.int64) + 1 + (np.arange(n_rows) * (n_sources + 2))[:, None]
        summed = np.bincount(slot.ravel(), weights=doubled.ravel(), minlength=n_rows * (n_sources + 2))
        return summed.reshape(n_rows, n_sources + 2)[:, 2:]
    out = np.zeros((n_rows, n_sources * (1 + len(hardest))))
    for v in range(n_sources):
        member = (ordered_parts == v + 1).view(np.int8)
        out[:, v] = np.einsum("rw,rw->r", doubled, member)
        if hardest:
            seen = np.cumsum(member, axis=1, dtype=np.int32)  # the source's entries so far, lowest first
            for h, n in enumerate(hardest):
                out[:, n_sources * (1 + h) + v] = np.einsum("rw,rw->r", doubled, member * (seen <= n))
    return out


def tie_groups(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The groups of equal finite values in rows sorted along the last axis (R, N) (+inf, the
    padding, is never a group): ``first`` and ``last`` (G,) flat positions (into the (R, N) array)
    of each group's first and last entry, and ``members`` the flat positions of every entry of
    every group, group by group. Only the (usually few) tied entries are visited after one
    comparison of neighbours."""
    n = ordered.shape[-1]
    empty = np.zeros(0, dtype=np.int64)
    if n < 2 or ordered.size == 0:
        return empty, empty, empty
    rows = ordered.reshape(-1, n)
    pairs = np.flatnonzero(rows[:, 1:] == rows[:, :-1])
    left = pairs + pairs // (n - 1)  # (R, N - 1) positions → (R, N) positions of each pair's left entry
    left = left[rows.reshape(-1)[left] < np.inf]
    if not left.size:
        return empty, empty, empty
    new_group = np.ones(left.size, dtype=bool)
    new_group[1:] = np.diff(left) != 1  # consecutive pairs chain into one group (never across rows)
    first = left[new_group]
    last = left[np.r_[new_group[1:], True]] + 1
    lengths = last - first + 1
    members = np.repeat(first - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    return first, last, members


def _part_counts(parts: np.ndarray, n_sources: int) -> np.ndarray:
    """(R, V + 2) how many entries of each row of ``parts`` (R, W) belong to each part -1 … V."""
    n_rows = parts.shape[0]
    slot = parts.astype(np.int64) + 1 + (np.arange(n_rows) * (n_sources + 2))[:, None]
    return np.bincount(slot.ravel(), minlength=n_rows * (n_sources + 2)).reshape(n_rows, n_sources + 2)


def resampled_aurocs(scores, parts, n_sources: int, n_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> np.ndarray:
    """(T, C, B, V) synthetic AUROCs of every candidate on each of the B resamples of
    :func:`resample_positions`; ``scores`` (T, C, W) per-image synthetic scores."""
    values = as_real_array(scores, "synthetic_scores", ndim=3, shape_doc="(T, C, W)").astype(np.float64, copy=False)
    positions, new_parts = resample_positions(parts, n_sources, n_resamples, seed)
    if values.shape[0] != positions.shape[0] or values.shape[2] != np.shape(parts)[1]:
        raise ValueError(f"synthetic_scores {values.shape} must be (T, C, W) for synthetic_part {np.shape(parts)}")
    n_tasks, n_candidates = values.shape[:2]
    step = max(1, MAX_GATHERED // max(1, n_tasks * n_candidates * positions.shape[2]))
    rows = np.arange(n_tasks)[:, None, None, None]
    members = np.arange(n_candidates)[None, :, None, None]
    out = np.empty((n_tasks, n_candidates, positions.shape[1], n_sources))
    for start in range(0, positions.shape[1], step):
        chunk = positions[:, None, start:start + step, :]
        gathered = values[rows, members, chunk]  # (T, C, b, W')
        gathered = np.where(new_parts[:, None, None, :] >= 0, gathered, np.nan)
        out[:, :, start:start + step] = part_aurocs_finite(gathered, new_parts, n_sources)
    return out
