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

from swsa_engine.core.metrics import rankdata_midrank
from swsa_engine.core.synthetic_resampling import part_aurocs_finite
from swsa_engine.core.validation import as_bool_mask, as_real_array, check_positive_int

__all__ = ["NORMALISATIONS", "COMBINATIONS", "check_normalisation", "normalise_scores", "combine_scores", "shuffled_buckets",
           "greedy_ensemble_weights"]

NORMALISATIONS = ("rank", "zscore")
COMBINATIONS = ("mean", "max", "median", "aom", "moa")
#: greedy selection: validation AUROCs closer than this are a tie (broken by the member's order)
TIE_TOLERANCE = 1e-12


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
    values = as_real_array(scores, "scores", ndim=3, shape_doc="(T, C, N)").astype(np.float64)
    included = as_bool_mask(mask, "mask", (values.shape[0], values.shape[2]), "(T, N)")[:, None, :]
    bad = included & ~np.isfinite(values)
    if bad.any():
        t, c, n = np.argwhere(bad)[0]
        raise ValueError(f"scores hold {int(bad.sum())} non-finite value(s) among masked-in images (first: task row {t}, "
                         f"candidate {c}, image {n}); exclude such a candidate by a recorded rule before combining")
    count = included.sum(axis=-1, keepdims=True)
    if method == "rank":
        ranks = rankdata_midrank(np.where(included, values, np.inf))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(count > 1, (ranks - 1.0) / (count - 1.0), 0.5)
    else:
        filled = np.where(included, values, 0.0)
        mean = filled.sum(-1, keepdims=True) / np.maximum(count, 1)
        std = np.sqrt((np.where(included, values - mean, 0.0) ** 2).sum(-1, keepdims=True) / np.maximum(count, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(std > 0, (values - mean) / std, 0.0)
    return np.where(included, out, np.nan)


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
    values = as_real_array(normalised, "normalised", ndim=3, shape_doc="(T, C, N)").astype(np.float64)
    if values.shape[1] == 0:
        raise ValueError("an ensemble needs at least one member; the pool given has none")
    if method == "mean":
        if weights is None:
            return values.mean(axis=1)
        w = np.broadcast_to(np.asarray(weights, dtype=np.float64), values.shape[:2])
        if (w < 0).any() or not (w.sum(axis=1) > 0).all():
            raise ValueError("ensemble weights must be ≥ 0 with a positive sum for every task")
        return np.einsum("tcn,tc->tn", values, w) / w.sum(axis=1)[:, None]
    if method in ("max", "median"):
        return values.max(axis=1) if method == "max" else np.median(values, axis=1)
    groups = buckets if buckets is not None else shuffled_buckets(values.shape[1], min(5, values.shape[1]))
    inner = np.max if method == "aom" else np.mean
    outer = np.mean if method == "aom" else np.max
    return outer(np.stack([inner(values[:, np.asarray(g), :], axis=1) for g in groups], axis=1), axis=1)


def _greedy_run(normalised: np.ndarray, parts: np.ndarray, n_sources: int, members: np.ndarray, steps: int) -> np.ndarray:
    """(T, C) counts of one greedy forward selection with replacement over ``members`` (indices)."""
    n_tasks, n_candidates, width = normalised.shape
    counts = np.zeros((n_tasks, n_candidates))
    total = np.zeros((n_tasks, width))
    pool = normalised[:, members, :]  # (T, M, W)
    for step in range(steps):
        trial = (total[:, None, :] + pool) / (step + 1)  # (T, M, W) the ensemble if each member were added
        with np.errstate(invalid="ignore"):
            # NaN (padding) scores are left out by part_aurocs_finite itself
            value = np.nanmean(part_aurocs_finite(trial, parts, n_sources), axis=-1)  # (T, M)
        value = np.where(np.isnan(value), -np.inf, value)
        # members within TIE_TOLERANCE of the best count as tied: the first of them is taken, so the
        # choice does not hinge on rounding in the last bits of an AUROC
        best = np.argmax(value >= value.max(axis=1, keepdims=True) - TIE_TOLERANCE, axis=1)
        chosen = members[best]
        counts[np.arange(n_tasks), chosen] += 1
        total += normalised[np.arange(n_tasks), chosen, :]
    return counts


def greedy_ensemble_weights(normalised, parts, n_sources: int, *, steps: int = 20, bags: int = 10,
                            fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(T, C) ensemble weights (summing to 1 per task) chosen on the synthetic validation set.

    ``normalised`` (T, C, W) the candidates' normalised scores of each task's synthetic validation
    queries, ``parts`` (T, W) as in :func:`~swsa_engine.core.synthetic_resampling.part_aurocs_finite`. Each of ``bags`` runs draws ``fraction``
    of the candidates (seeded) and adds, ``steps`` times, the member (repeats allowed) that most
    raises the ensemble's synthetic AUROC averaged over the ``n_sources`` sources; the weights
    are the members' counts summed over the bags (Caruana et al. 2004, bagged selection).
    """
    values = as_real_array(normalised, "normalised", ndim=3, shape_doc="(T, C, W)").astype(np.float64)
    steps = check_positive_int(steps, "steps", "steps=20")
    bags = check_positive_int(bags, "bags", "bags=10")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}; Caruana et al. bag half the library: 0.5")
    n_candidates = values.shape[1]
    size = max(1, int(round(fraction * n_candidates)))
    rng = np.random.default_rng(seed)
    draws = [np.sort(rng.choice(n_candidates, size=size, replace=False)) for _ in range(bags)]
    parts = np.asarray(parts)
    counts = np.zeros(values.shape[:2])
    # tasks of similar width together, their queries packed to the front: no sorting of padding
    # (AUROCs do not depend on the queries' order, so the weights are those of the padded arrays)
    for rows, width in _width_buckets((parts >= 0).sum(axis=1)):
        order = np.argsort(parts[rows] < 0, axis=1, kind="stable")[:, :width]
        packed = np.take_along_axis(values[rows], order[:, None, :], axis=2)
        packed_parts = np.take_along_axis(parts[rows], order, axis=1)
        for members in draws:
            counts[rows] += _greedy_run(packed, packed_parts, n_sources, members, steps)
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
