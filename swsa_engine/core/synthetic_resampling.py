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
           "resampled_aurocs"]

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


def part_aurocs_finite(scores, parts, n_sources: int) -> np.ndarray:
    """(T, ..., V) synthetic AUROC per source from scores (T, ..., W) with ``parts`` (T, W) as in
    :func:`resample_positions`; a NaN score leaves that query out for that candidate only, as the
    cube's sweep does. NaN where a task (or candidate) lacks the normals or the source's anomalies.

    One sort serves every source: an anomaly's doubled Mann-Whitney count is twice the held-out
    normals below its score plus those tied with it, summed per source and divided by
    ``2 n_normal n_source`` — the same integers, and the same one division, as
    :func:`~swsa_engine.core.metrics.auroc` on each source's subset, so the values are identical.
    """
    values = as_real_array(scores, "synthetic_scores").astype(np.float64, copy=False)
    parts = _checked_parts(parts, n_sources)
    if values.ndim < 2 or values.shape[0] != parts.shape[0] or values.shape[-1] != parts.shape[1]:
        raise ValueError(f"synthetic_scores {values.shape} must be (T, ..., W) for synthetic_part {parts.shape}")
    if n_sources == 0:
        return np.zeros(values.shape[:-1] + (0,))
    parts = np.broadcast_to(parts.reshape(parts.shape[0], *([1] * (values.ndim - 2)), parts.shape[1]), values.shape)
    parts = np.where(np.isfinite(values), parts, -1)  # a NaN score: that query is out, for that candidate only
    keys = np.where(parts >= 0, values, np.inf)
    # one flat gather per array (much faster than take_along_axis on many short rows)
    flat = np.argsort(keys, axis=-1) + (np.arange(keys.size // keys.shape[-1]) * keys.shape[-1]).reshape(keys.shape[:-1] + (1,))
    ordered_parts = parts.reshape(-1)[flat]
    normals_below, normals_tied = _normals_below_and_tied(keys.reshape(-1)[flat], ordered_parts == 0)
    doubled = 2 * normals_below + normals_tied
    # per row and part (-1 … V → 0 … V + 1): the doubled counts summed, and the queries counted
    n_rows = doubled.size // doubled.shape[-1]
    slot = (ordered_parts + 1 + (n_sources + 2) * np.arange(n_rows).reshape(doubled.shape[:-1] + (1,))).ravel()
    size = n_rows * (n_sources + 2)
    summed = np.bincount(slot, weights=doubled.ravel(), minlength=size).reshape(doubled.shape[:-1] + (n_sources + 2,))
    counts = np.bincount(slot, minlength=size).reshape(summed.shape)
    n_normal, n_source = counts[..., 1:2], counts[..., 2:]
    with np.errstate(divide="ignore", invalid="ignore"):
        area = summed[..., 2:] / (2.0 * n_source * n_normal)
    return np.where((n_source == 0) | (n_normal == 0), np.nan, area)


def _normals_below_and_tied(sorted_keys: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every entry of rows sorted along the last axis: how many ``normal`` entries lie strictly
    below its value, and how many share it (int64, shape of ``sorted_keys``)."""
    n = sorted_keys.shape[-1]
    starts = np.ones(sorted_keys.shape, dtype=bool)
    starts[..., 1:] = sorted_keys[..., 1:] != sorted_keys[..., :-1]
    ends = np.ones(sorted_keys.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    # normals strictly before each position, and at or before it, counted along the row
    inclusive = np.cumsum(normal, axis=-1, dtype=np.int64)
    exclusive = inclusive - normal
    # carry a group's first "exclusive" forward and its last "inclusive" backward (counts only grow)
    below = np.maximum.accumulate(np.where(starts, exclusive, 0), axis=-1)
    through = np.minimum.accumulate(np.where(ends, inclusive, np.iinfo(np.int64).max)[..., ::-1], axis=-1)[..., ::-1]
    return below, through - below


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
