"""Ensembles of candidates: label-free score normalisation, combination rules and ensemble selection.

Shapes: ``T`` tasks, ``C`` candidates (the pool), ``N`` images per task (padded; ``mask`` (T, N)
marks the real ones). Every function works on all tasks at once.

* :func:`normalise_scores` — each member's scores made comparable without labels, over the pool of
  images being scored: mid-ranks scaled to [0, 1] (default) or z-scores. Aggarwal & Sathe
  (SIGKDD Explorations 2015, "Theoretical foundations and algorithms for outlier ensembles")
  show that combining normalised scores reduces variance.
* :func:`combine_scores` — the combination rules of PyOD's ``pyod.models.combination`` (Zhao,
  Nasrullah & Li, JMLR 2019): ``mean``, ``max``, ``median``, and Aggarwal & Sathe's ``aom``
  (average of the bucket maxima) and ``moa`` (maximum of the bucket averages), plus a weighted
  mean (the result of ensemble selection).
* :func:`greedy_ensemble_weights` — Caruana, Niculescu-Mizil, Crew & Ksikes (ICML 2004,
  "Ensemble selection from libraries of models"): greedy forward selection with replacement
  on a validation set, bagged over random halves of the library. In swsa the validation set is
  the label-free synthetic one (held-out normals against synthetic anomalies), so the
  selection needs no real label.
"""

from __future__ import annotations

import numpy as np

from swsa_engine.core.synthetic_resampling import part_aurocs_finite, tie_groups
from swsa_engine.core.validation import as_bool_mask, as_real_array, check_positive_int

__all__ = ["NORMALISATIONS", "COMBINATIONS", "check_normalisation", "normalise_scores", "combine_scores", "shuffled_buckets",
           "greedy_ensemble_weights"]

NORMALISATIONS = ("rank", "zscore")
COMBINATIONS = ("mean", "max", "median", "aom", "moa")
#: greedy selection: validation AUROCs closer than this are a tie (broken by the member's order)
TIE_TOLERANCE = 1e-12
#: greedy selection: at most about this many trial scores (tasks × bags × members × queries) at once
GREEDY_CHUNK = 2 ** 18


def check_normalisation(method) -> str:
    """``method`` when it is one of :data:`NORMALISATIONS`, else a one-line :class:`ValueError`."""
    if method not in NORMALISATIONS:
        raise ValueError(f"normalisation {method!r} is unknown; choose one of {', '.join(NORMALISATIONS)} "
                         "(e.g. --ensemble-normalisation zscore)")
    return method


def normalise_scores(scores, mask=None, method: str = "rank") -> np.ndarray:
    """(T, C, N) scores → (T, C, N) float64 normalised over each task's masked images; NaN off ``mask``.

    ``rank``: mid-ranks (ties share their mean rank) scaled to [0, 1], ``(rank − 1) / (n − 1)``
    (0.5 for a task with one image); ``zscore``: ``(s − mean) / std`` (population std; 0 where a
    member is constant on the task). Higher stays more anomalous.
    """
    check_normalisation(method)
    values = as_real_array(scores, "scores", ndim=3, shape_doc="(T, C, N)").astype(np.float64, copy=False)
    included = as_bool_mask(mask, "mask", (values.shape[0], values.shape[2]), "(T, N)")[:, None, :]
    bad = included & ~np.isfinite(values)
    if bad.any():
        t, c, n = np.argwhere(bad)[0]
        raise ValueError(f"scores hold {int(bad.sum())} non-finite value(s) among masked-in images (first: task row {t}, "
                         f"candidate {c}, image {n}); exclude such a candidate by a recorded rule before combining")
    count = included.sum(axis=-1, keepdims=True)
    if method == "rank":
        keys = np.where(included, values, np.inf)
        ranks = _midranks(keys.reshape(-1, keys.shape[-1])).reshape(keys.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(count > 1, (ranks - 1.0) / (count - 1.0), 0.5)
    else:
        filled = np.where(included, values, 0.0)
        mean = filled.sum(-1, keepdims=True) / np.maximum(count, 1)
        std = np.sqrt((np.where(included, values - mean, 0.0) ** 2).sum(-1, keepdims=True) / np.maximum(count, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(std > 0, (values - mean) / std, 0.0)
    return np.where(included, out, np.nan)


def _midranks(keys: np.ndarray) -> np.ndarray:
    """(R, N) float64 mid-ranks 1..N of each row of ``keys`` (finite values, +inf for the padding,
    which ranks last): :func:`~swsa_engine.core.metrics.rankdata_midrank` on every entry that is not
    padding, but with one sort, one gather and one scatter per row and only the (rare) tie groups
    of :func:`~swsa_engine.core.synthetic_resampling.tie_groups` visited afterwards (the padding's
    ranks among themselves are left as positions: never read)."""
    n_rows, n = keys.shape
    order = np.argsort(keys, axis=1)
    order += (np.arange(n_rows) * n)[:, None]
    in_sorted = np.empty(keys.shape, dtype=np.float64)
    in_sorted[:] = np.arange(1, n + 1, dtype=np.float64)
    first, last, members = tie_groups(keys.reshape(-1)[order])
    if members.size:  # a group's mid-rank: half its doubled value (first + last positions + 2), as scipy's
        row_start = first - first % n
        in_sorted.reshape(-1)[members] = np.repeat((first + last - 2 * row_start + 2) / 2.0, last - first + 1)
    ranks = np.empty(keys.shape, dtype=np.float64)
    ranks.reshape(-1)[order] = in_sorted
    return ranks


def shuffled_buckets(n_members: int, n_buckets: int, seed: int = 0) -> list[np.ndarray]:
    """The members split into ``n_buckets`` contiguous buckets of a seeded permutation (sizes
    differ by at most one), as PyOD's static AOM/MOA build them."""
    n_buckets = check_positive_int(n_buckets, "n_buckets", "n_buckets=5")
    if n_buckets > n_members:
        raise ValueError(f"n_buckets={n_buckets} is more than the {n_members} members; use at most {n_members}")
    order = np.random.default_rng(seed).permutation(n_members)
    return np.array_split(order, n_buckets)


def combine_scores(normalised, method: str = "mean", *, weights=None, buckets: list | None = None) -> np.ndarray:
    """(T, C, N) normalised member scores → (T, N) ensemble scores (NaN where the members are).

    ``method``: ``mean`` (with ``weights`` (C,) or (T, C) ≥ 0: the weighted mean), ``max``,
    ``median``, ``aom`` / ``moa`` over ``buckets`` (lists of member indices; default
    :func:`shuffled_buckets` with 5 buckets, or fewer when there are fewer members).
    """
    if method not in COMBINATIONS:
        raise ValueError(f"combination {method!r} is unknown; choose one of {', '.join(COMBINATIONS)}")
    values = as_real_array(normalised, "normalised", ndim=3, shape_doc="(T, C, N)").astype(np.float64, copy=False)
    if values.shape[1] == 0:
        raise ValueError("an ensemble needs at least one member; the pool given has none")
    if method == "mean":
        if weights is None:
            return values.mean(axis=1)
        w = np.broadcast_to(np.asarray(weights, dtype=np.float64), values.shape[:2])
        if (w < 0).any() or not (w.sum(axis=1) > 0).all():
            raise ValueError("ensemble weights must be ≥ 0 with a positive sum for every task")
        return np.einsum("tcn,tc->tn", values, w) / w.sum(axis=1)[:, None]
    if method == "max":
        return values.max(axis=1)
    if method == "median":
        return _median(values)
    groups = buckets if buckets is not None else shuffled_buckets(values.shape[1], min(5, values.shape[1]))
    inner = np.max if method == "aom" else np.mean
    outer = np.mean if method == "aom" else np.max
    return outer(np.stack([inner(values[:, np.asarray(g), :], axis=1) for g in groups], axis=1), axis=1)


def _median(values: np.ndarray) -> np.ndarray:
    """(T, C, N) → (T, N) median over the members, exactly ``np.median(values, axis=1)`` (the
    middle value, or the mean of the two middle values: the same one addition and halving) but by
    one sort of the short member axis rather than a partition per image; NaN where a member is."""
    ordered = np.sort(values, axis=1)
    middle = values.shape[1] // 2
    out = ordered[:, middle] if values.shape[1] % 2 else (ordered[:, middle - 1] + ordered[:, middle]) / 2.0
    return np.where(np.isnan(ordered[:, -1]), np.nan, out)  # NaN sorts last: a NaN member makes it NaN


def _greedy_bags(packed: np.ndarray, parts: np.ndarray, n_sources: int, draws: np.ndarray, steps: int) -> np.ndarray:
    """(T, C) counts of every bag's greedy forward selection with replacement, all bags at once:
    ``packed`` (T, C, W) scores, ``parts`` (T, W), ``draws`` (B, S) each bag's members. Each bag
    keeps its own running total, added to in the same order as a bag run alone, so its trial
    scores (and so its choices) are those of a run of that bag by itself."""
    n_tasks, n_candidates, width = packed.shape
    n_bags = draws.shape[0]
    tasks = np.arange(n_tasks)[:, None]
    counts = np.zeros((n_tasks, n_candidates))
    total = np.zeros((n_tasks, n_bags, width))
    pool = packed[:, draws, :]  # (T, B, S, W)
    for step in range(steps):
        if step == 0:  # every total is still 0 (0 + x = x): each candidate's AUROCs serve every bag holding it
            value = _validation_value(packed, parts, n_sources)[:, draws]
        else:
            trial = total[:, :, None, :] + pool  # (T, B, S, W) the ensemble if each member were added
            trial /= step + 1
            value = _validation_value(trial, parts, n_sources)  # (T, B, S)
        value = np.where(np.isnan(value), -np.inf, value)
        # members within TIE_TOLERANCE of the best count as tied: the first of them is taken, so the
        # choice does not hinge on rounding in the last bits of an AUROC
        best = np.argmax(value >= value.max(axis=-1, keepdims=True) - TIE_TOLERANCE, axis=-1)  # (T, B)
        chosen = draws[np.arange(n_bags), best]
        np.add.at(counts, (np.broadcast_to(tasks, chosen.shape), chosen), 1)
        total += packed[tasks, chosen]
    return counts


def _validation_value(scores: np.ndarray, parts: np.ndarray, n_sources: int) -> np.ndarray:
    """(T, ...) synthetic AUROC averaged over the sources of ``scores`` (T, ..., W); NaN (padding)
    scores are left out by :func:`part_aurocs_finite` itself; NaN where no source is defined."""
    with np.errstate(invalid="ignore"):
        return np.nanmean(part_aurocs_finite(scores, parts, n_sources), axis=-1)


def greedy_ensemble_weights(normalised, parts, n_sources: int, *, steps: int = 20, bags: int = 10,
                            fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(T, C) ensemble weights (summing to 1 per task) chosen on the synthetic validation set.

    ``normalised`` (T, C, W) the candidates' normalised scores of each task's synthetic validation
    queries, ``parts`` (T, W) as in :func:`~swsa_engine.core.synthetic_resampling.part_aurocs_finite`. Each of ``bags`` runs draws ``fraction``
    of the candidates (seeded) and adds, ``steps`` times, the member (repeats allowed) that most
    raises the ensemble's synthetic AUROC averaged over the ``n_sources`` sources; the weights
    are the members' counts summed over the bags (Caruana et al. 2004, bagged selection).
    """
    values = as_real_array(normalised, "normalised", ndim=3, shape_doc="(T, C, W)").astype(np.float64, copy=False)
    steps = check_positive_int(steps, "steps", "steps=20")
    bags = check_positive_int(bags, "bags", "bags=10")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}; Caruana et al. bag half the library: 0.5")
    n_candidates = values.shape[1]
    size = max(1, int(round(fraction * n_candidates)))
    rng = np.random.default_rng(seed)
    draws = np.stack([np.sort(rng.choice(n_candidates, size=size, replace=False)) for _ in range(bags)])
    parts = np.asarray(parts)
    counts = np.zeros(values.shape[:2])
    # tasks of similar width together, their queries packed to the front: no sorting of padding
    # (AUROCs do not depend on the queries' order, so the weights are those of the padded arrays);
    # a few tasks at a time, so that the (tasks, bags, members, width) trials stay small
    for rows, width in _width_buckets((parts >= 0).sum(axis=1)):
        order = np.argsort(parts[rows] < 0, axis=1, kind="stable")[:, :width]
        packed = np.take_along_axis(values[rows], order[:, None, :], axis=2)
        packed_parts = np.take_along_axis(parts[rows], order, axis=1)
        step = max(1, GREEDY_CHUNK // (bags * size * width))
        for start in range(0, len(rows), step):
            chunk = slice(start, start + step)
            counts[rows[chunk]] = _greedy_bags(packed[chunk], packed_parts[chunk], n_sources, draws, steps)
    return counts / counts.sum(axis=1, keepdims=True)


def _width_buckets(widths: np.ndarray, growth: float = 1.5) -> list[tuple[np.ndarray, int]]:
    """Task rows grouped by their query count ``widths`` (T,): within a group the widest is at most
    ``growth`` times the narrowest (or 16 wider) → [(rows, widest)]."""
    order = np.argsort(widths, kind="stable")
    buckets, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or widths[order[i]] > max(growth * widths[order[start]], widths[order[start]] + 16):
            rows = np.sort(order[start:i])
            buckets.append((rows, max(1, int(widths[rows].max()))))
            start = i
    return buckets
