"""The field's label-free model-selection baselines, as pure array functions over all tasks at once.

Each function scores every candidate of every task in one call, from what a user without labels
has: each candidate's scores on the task's unlabelled test images, or its synthetic AUROCs. The
selection layer turns the scores into picks (argmax for "higher is better" values). Shapes:
``T`` tasks, ``C`` candidates, ``Q`` unlabelled test images per task (padded; ``mask`` (T, Q) is
True for a real image), ``V`` synthetic sources. Anomaly scores are
"higher = more anomalous", as everywhere in swsa.

A *missing* candidate of a task (NaN on every included image, e.g. a detector that was skipped
there) is left out of that task and gets NaN; a candidate NaN on only some included images is an
error, since leaving those images out for one candidate would compare rankings of different sets.

* :func:`model_centrality`: mean Kendall tau-b of a candidate's ranking of the test images with
  every other candidate's (the "MC" strategy of Ma, Zhao, Zhang & Akoglu 2021).
* :func:`rra_rho`, :func:`robust_rank_aggregation`: Kolde et al.'s (2012) robust rank aggregation
  of the candidates' rankings by the V synthetic sources.
* :func:`borda_points`, :func:`trimmed_borda_sources`, :func:`trimmed_borda`: Goswami et al.'s
  (ICLR 2023) trimmed Borda aggregation of the same rankings (outlying sources dropped first).
* Goix's (2016) Excess-Mass and Mass-Volume criteria, which also need uniform samples of the
  feature space scored by each candidate, are :mod:`swsa_engine.core.em_mv`.
* :func:`expected_random_pick`: the random pick's expected real AUROC. (The rank-averaged
  ensemble of all candidates is :mod:`swsa_engine.core.ensembles`: ``combine_scores(normalise_scores(s))``.)

References
----------
* Martin Q. Ma, Yue Zhao, Xiaorong Zhang, Leman Akoglu. "A Large-scale Study on Unsupervised
  Outlier Model Selection: Do Internal Strategies Suffice?" arXiv:2104.01422, 2021 (reference
  code: github.com/yzhao062/UOMS, ``Internal_Evaluation/concensus-based/MC.py``).
* Raivo Kolde, Sven Laur, Priit Adler, Jaak Vilo. "Robust rank aggregation for gene list
  integration and meta-analysis." Bioinformatics 28(4):573-580, 2012.
* Mononito Goswami, Cristian Challu, Laurent Callot, Lenon Minorics, Andrey Kan. "Unsupervised
  Model Selection for Time-series Anomaly Detection." ICLR 2023 (reference code:
  github.com/mononitogoswami/tsad-model-selection, ``src/model_selection/rank_aggregation.py``).
* Ronald Fagin, Ravi Kumar, Mohammad Mahdian, D. Sivakumar, Erik Vee. "Comparing partial rankings."
  SIAM J. Discrete Math. 20(3):628-648, 2006 (the Kendall distance with ties, K^(p), p = 1/2).
"""

from __future__ import annotations

import numpy as np
from scipy.special import betainc

from swsa_engine.core.metrics.kendall_long import kendall_tau_b_long
from swsa_engine.core.validation import as_bool_mask, as_real_array

__all__ = [
    "checked_candidate_scores", "model_centrality", "rra_rho", "robust_rank_aggregation", "borda_points",
    "trimmed_borda_sources", "trimmed_borda", "expected_random_pick", "RELIABILITY_TOLERANCE",
]

#: trimmed Borda: source reliabilities (differences of mean Kendall distances, in [-1, 1]) closer
#: than this are equal (the same value computed along two paths differs by rounding only)
RELIABILITY_TOLERANCE = 1e-12

# candidate-pair rows (and grid x threshold blocks) hold at most this many elements at once
_BLOCK_ELEMENTS = 1 << 22


def checked_candidate_scores(scores, mask, function: str, name: str = "scores"):
    """``(scores float64 (T, C, Q), mask (T, Q), available (T, C))`` or a one-line ValueError.

    ``available``: the candidate has a value on every included image of the task (and the task
    has one); a candidate NaN on some but not all of them is refused.
    """
    scores = as_real_array(scores, name, ndim=3, shape_doc="(T, C, Q)").astype(np.float64, copy=False)
    n_tasks, _, n_images = scores.shape
    if n_images == 0:
        raise ValueError(f"{function}: `{name}` has no images (shape {scores.shape}); pass each candidate's "
                         "scores on the task's unlabelled test images, padded to a common Q")
    mask = as_bool_mask(mask, "mask", shape=(n_tasks, n_images), shape_doc="(T, Q)")
    n_nan = (np.isnan(scores) & mask[:, None, :]).sum(axis=2)
    n_included = mask.sum(axis=1)
    partial = (n_nan > 0) & (n_nan < n_included[:, None])
    if partial.any():
        task, candidate = (int(i) for i in np.argwhere(partial)[0])
        raise ValueError(
            f"{function}: `{name}`[{task}, {candidate}] is NaN on {int(n_nan[task, candidate])} of the task's "
            f"{int(n_included[task])} included images ({int(partial.sum())} such candidate rows); a candidate must "
            "be scored on every included image, or NaN on all of them (then it is left out): exclude those "
            "images with `mask` or rescore them")
    available = (n_nan == 0) & (n_included[:, None] > 0)
    return scores, mask, available


def model_centrality(scores, mask=None) -> np.ndarray:
    """Model centrality (MC): each candidate's mean Kendall tau-b with every other candidate.

    Ma, Zhao, Zhang & Akoglu, "A Large-scale Study on Unsupervised Outlier Model Selection: Do
    Internal Strategies Suffice?", arXiv:2104.01422, 2021: a candidate whose ranking of the
    unlabelled test images agrees with the others' is presumed good. As in their code (UOMS,
    ``MC.py``), ``MC_c = sum_{j != c} tau_b(c, j) / (m - 1)`` over the task's m candidates, with an
    undefined tau (a candidate constant on the task) counted as 0. Goswami et al. (ICLR 2023) use
    the same idea ("model centrality") among their surrogate metrics.

    Parameters
    ----------
    scores : (T, C, Q) anomaly scores of every candidate on each task's test images (higher = more
        anomalous; only their order matters). +-inf allowed; NaN only for a missing candidate.
    mask : (T, Q) bool, True = a real image (padding False); None = all real.

    Returns
    -------
    (T, C) float64, higher = more central. NaN for a missing candidate, and for every candidate of
    a task with fewer than two candidates or fewer than two images.

    Notes
    -----
    Each pair of available candidates' tau-b over the task's included images comes from
    :func:`~swsa_engine.core.metrics.kendall_long.kendall_tau_b_long` (O(Q log Q) per pair, ties
    exactly as ``scipy.stats.kendalltau``).
    """
    scores, mask, available = checked_candidate_scores(scores, mask, "model_centrality")
    n_tasks, n_candidates, n_images = scores.shape
    first, second = np.triu_indices(n_candidates, k=1)
    tasks, pairs = np.nonzero(available[:, first] & available[:, second])
    tau = np.zeros((n_tasks, n_candidates, n_candidates))
    step = max(1, _BLOCK_ELEMENTS // max(1, n_images))
    for lo in range(0, tasks.size, step):
        t, c, j = tasks[lo:lo + step], first[pairs[lo:lo + step]], second[pairs[lo:lo + step]]
        pair_tau = np.nan_to_num(kendall_tau_b_long(scores[t, c], scores[t, j], mask[t]))  # undefined: 0
        tau[t, c, j] = tau[t, j, c] = pair_tau
    others = available[:, :, None] & available[:, None, :] & ~np.eye(n_candidates, dtype=bool)
    m = available.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        centrality = (tau * others).sum(axis=2) / (m - 1)[:, None]
    undefined = ~available | (m < 2)[:, None] | (mask.sum(axis=1) < 2)[:, None]
    return np.where(undefined, np.nan, centrality)


def rra_rho(synthetic) -> np.ndarray:
    """Kolde et al.'s robust rank aggregation score rho of every candidate (lower = better).

    Kolde, Laur, Adler & Vilo, "Robust rank aggregation for gene list integration and
    meta-analysis", Bioinformatics 28(4):573-580, 2012. Each source v ranks the candidates by
    synthetic AUROC (best = rank 1; tied AUROCs share their mean rank) and the rank is normalised
    by the number of candidates the source ranks, ``r = rank / n_v`` in (0, 1]. For a candidate
    with normalised ranks from n sources, sorted ``r_(1) <= ... <= r_(n)``, the beta score
    ``beta_k = P(U_(k) <= r_(k))`` is the probability that the k-th smallest of n uniform ranks is
    at most r_(k) (``Beta(k, n - k + 1)`` CDF); ``rho = min(1, n * min_k beta_k)`` (the paper's
    Bonferroni-corrected minimum, as ``RobustRankAggreg::aggregateRanks`` computes it).

    Parameters
    ----------
    synthetic : (T, C, V) synthetic AUROC of every candidate on every source. NaN = not ranked
        by that source (Kolde's partial lists): a source that is NaN for a whole task is ignored,
        a candidate's NaN sources do not count among its n.

    Returns
    -------
    (T, C) float64 rho in (0, 1]; NaN where no source ranks the candidate.
    """
    values = as_real_array(synthetic, "synthetic", ndim=3, shape_doc="(T, C, V)").astype(np.float64, copy=False)
    ranked = ~np.isnan(values)
    # rank of candidate c within source v: 1 + (candidates above it) + half its ties (NaN compares False)
    above = (values[:, None, :, :] > values[:, :, None, :]).sum(axis=2)
    ties = (values[:, None, :, :] == values[:, :, None, :]).sum(axis=2) - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(ranked, (1.0 + above + 0.5 * ties) / ranked.sum(axis=1, keepdims=True), np.nan)
    ordered = np.sort(normalised, axis=2)  # NaN last
    n = ranked.sum(axis=2)
    k = np.arange(1, values.shape[2] + 1)
    used = k <= n[:, :, None]
    b = np.maximum(n[:, :, None] - k + 1, 1)
    beta = np.where(used, betainc(k, b, np.where(used, ordered, 1.0)), np.inf)
    with np.errstate(invalid="ignore"):  # n = 0: 0 * inf, replaced by NaN below
        rho = np.minimum(1.0, n * beta.min(axis=2, initial=np.inf))
    return np.where(n > 0, rho, np.nan)


def robust_rank_aggregation(synthetic) -> np.ndarray:
    """Robust rank aggregation of the synthetic sources' rankings as a score, higher = better.

    ``-log10(rra_rho(synthetic))`` (see :func:`rra_rho` for Kolde et al. 2012's rho, Bioinformatics
    28(4):573-580): 0 for rho = 1 (no evidence that the candidate ranks high), larger when the
    sources rank it consistently near the top. Goswami, Challu, Callot, Minorics & Kan
    ("Unsupervised Model Selection for Time-series Anomaly Detection", ICLR 2023) frame combining
    several imperfect surrogate rankings as robust rank aggregation; their own aggregator is a
    trimmed Borda / Kemeny count (:func:`trimmed_borda`), this one is Kolde's.

    Parameters
    ----------
    synthetic : (T, C, V) synthetic AUROC per task, candidate and source (NaN = not ranked).

    Returns
    -------
    (T, C) float64 >= 0; NaN where no source ranks the candidate.
    """
    rho = rra_rho(synthetic)
    with np.errstate(divide="ignore"):
        return 0.0 - np.log10(rho)  # 0.0 - : no negative zero for rho = 1


def borda_points(synthetic) -> np.ndarray:
    """(T, C, V) each source's normalised Borda points: the share of the other candidates the source
    ranks below the candidate, ties counting one half, ``(below + ties / 2) / (n_v - 1)`` in [0, 1].

    ``synthetic`` (T, C, V): synthetic AUROC per task, candidate and source (higher = better; NaN =
    not ranked by that source). NaN where the source does not rank the candidate or ranks fewer
    than two candidates of the task (it then orders nothing).
    """
    values = as_real_array(synthetic, "synthetic", ndim=3, shape_doc="(T, C, V)").astype(np.float64, copy=False)
    ranked = ~np.isnan(values)
    below = (values[:, None, :, :] < values[:, :, None, :]).sum(axis=2)  # NaN compares False
    ties = (values[:, None, :, :] == values[:, :, None, :]).sum(axis=2) - 1
    n = ranked.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        points = (below + 0.5 * ties) / (n - 1)
    return np.where(ranked & (n >= 2), points, np.nan)


def _sign_indicators(values: np.ndarray) -> tuple[np.ndarray, ...]:
    """For (R, C) values: (R, C * C) float32 indicators over ordered pairs (c, c'), c != c', both
    finite, of sign(x_c - x_c') = +1, -1, 0, != 0, and of the pair being comparable at all."""
    finite = np.isfinite(values)
    valid = finite[:, :, None] & finite[:, None, :] & ~np.eye(values.shape[1], dtype=bool)
    with np.errstate(invalid="ignore"):
        difference = values[:, :, None] - values[:, None, :]
    flat = lambda mask: (mask & valid).reshape(len(values), -1).astype(np.float32)
    return flat(difference > 0), flat(difference < 0), flat(difference == 0), flat(difference != 0), flat(valid)


def _kendall_distances(consensus: np.ndarray, rankings: np.ndarray) -> np.ndarray:
    """(S, V) normalised Kendall distance between each consensus (S, C) and each ranking (V, C):
    over the pairs both order (finite in both), the share that they order oppositely, a pair tied
    in exactly one counting one half (Fagin et al.'s K^(1/2)); NaN where no pair is comparable.
    All pairs at once as products of sign-indicator matrices (exact: counts below 2**24)."""
    b_up, b_down, b_tie, b_order, b_valid = _sign_indicators(consensus)
    r_up, r_down, r_tie, r_order, r_valid = _sign_indicators(rankings)
    disagree = b_up @ r_down.T + b_down @ r_up.T + 0.5 * (b_tie @ r_order.T + b_order @ r_tie.T)
    pairs = (b_valid @ r_valid.T).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, disagree / pairs, np.nan)


def _subset_borda(points: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(S, C) mean Borda points over each subset of sources ``members`` (S, V) bool; ``points``
    (C, V); NaN where no member ranks the candidate."""
    ranked = ~np.isnan(points)
    weight = members[:, None, :] & ranked[None]
    total = np.where(weight, points[None], 0.0).sum(axis=2)
    count = weight.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _kept_sources(points: np.ndarray) -> np.ndarray:
    """(V,) bool: the sources one task's trimmed Borda keeps, from its Borda points (C, V)."""
    valid = ~np.isnan(points).all(axis=0)
    n_valid = int(valid.sum())
    if n_valid <= 2:  # one ranking: nothing to trim; two: their reliabilities are equal by symmetry
        return valid
    subsets = np.vstack([valid, valid & ~np.eye(len(valid), dtype=bool)])  # all, then all but v
    distances = _kendall_distances(_subset_borda(points, subsets), points.T)  # (1 + V, V)
    counted = subsets & ~np.isnan(distances)
    with np.errstate(invalid="ignore", divide="ignore"):
        objective = np.where(counted, distances, 0.0).sum(axis=1) / counted.sum(axis=1)
    reliability = objective[1:] - objective[0]  # (V,): a source whose removal lowers the objective is an outlier
    values = reliability[valid]
    if not np.isfinite(values).all():
        return valid
    order = np.argsort(values, kind="stable")
    gaps = np.diff(values[order])
    if gaps.max() <= RELIABILITY_TOLERANCE:  # all equal: no outlier to trim
        return valid
    cut = int(np.flatnonzero(gaps >= gaps.max() - RELIABILITY_TOLERANCE)[0])  # tied largest gaps: the lowest cut
    lower, upper = order[: cut + 1], order[cut + 1:]
    keep = upper if values[upper].sum() >= values[lower].sum() else lower  # tied sums: the more reliable side
    kept = np.zeros(len(valid), dtype=bool)
    kept[np.flatnonzero(valid)[keep]] = True
    return kept


def trimmed_borda_sources(synthetic) -> np.ndarray:
    """(T, V) bool: the synthetic sources whose rankings trimmed Borda keeps, per task.

    Goswami, Challu, Callot, Minorics & Kan, "Unsupervised Model Selection for Time-series Anomaly
    Detection", ICLR 2023 (reference code: github.com/mononitogoswami/tsad-model-selection,
    ``rank_aggregation.py``: ``trimmed_borda`` with ``metric="influence"``, ``top_kr=None``). Each
    source's *reliability* is its influence on the Borda objective: with B_S the Borda consensus of
    the rankings S and obj(S) the mean Kendall distance of the rankings in S to B_S,
    ``reliability_v = obj(all but v) - obj(all)`` (very negative for a source whose ranking
    disagrees with the rest). The reliabilities are split in two by single-linkage clustering,
    which in one dimension cuts at the largest gap between sorted values, and the cluster with the
    larger sum of reliabilities is kept.

    Where this differs from the reference code, for ties and missing values it does not handle:
    rankings keep their ties (tied AUROCs share their Borda points, a pair tied in exactly one of
    two rankings is half a disagreement) and may be partial (a source's NaN candidates are left
    out; distances are over the pairs both rank, normalised by their number, which for complete
    rankings is the reference's distance divided by a constant, so the same sources are kept);
    all reliabilities equal (within :data:`RELIABILITY_TOLERANCE`; always so for two sources) keep
    every source; among equally large gaps the lowest is cut; equal cluster sums keep the upper
    cluster. A source ranking fewer than two candidates of the task is never kept.

    Parameters
    ----------
    synthetic : (T, C, V) synthetic AUROC per task, candidate and source (NaN = not ranked).
    """
    points = borda_points(synthetic)
    kept = np.zeros(points.shape[::2], dtype=bool)
    for task, task_points in enumerate(points):  # a few sources per task: the loop is over tasks only
        kept[task] = _kept_sources(task_points)
    return kept


def trimmed_borda(synthetic) -> np.ndarray:
    """Trimmed Borda aggregation of the synthetic sources' rankings (Goswami et al., ICLR 2023).

    The robust rank aggregation of Goswami, Challu, Callot, Minorics & Kan ("Unsupervised Model
    Selection for Time-series Anomaly Detection", ICLR 2023): drop the sources whose rankings are
    outliers (:func:`trimmed_borda_sources`), then the Borda count of the rest, here as each
    candidate's mean normalised Borda points over the kept sources that rank it
    (:func:`borda_points`; the reference code orders candidates by their summed ranks, the same
    order when every kept source ranks every candidate).

    Parameters
    ----------
    synthetic : (T, C, V) synthetic AUROC per task, candidate and source (NaN = not ranked).

    Returns
    -------
    (T, C) float64 in [0, 1], higher = better; NaN where no kept source ranks the candidate.
    """
    points = borda_points(synthetic)
    kept = trimmed_borda_sources(synthetic)
    ranked = kept[:, None, :] & ~np.isnan(points)
    count = ranked.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(ranked, points, 0.0).sum(axis=2) / count, np.nan)


def expected_random_pick(real) -> np.ndarray:
    """(T,) the expected real AUROC of a uniformly random pick: the mean over the task's candidates.

    The "random pick" baseline as its expectation, not one draw (so it needs no seed). ``real``
    (T, C): real AUROC per task and candidate; NaN candidates (not scored) are left out, and a task
    with none gives NaN.
    """
    real = as_real_array(real, "real", ndim=2, shape_doc="(T, C)").astype(np.float64, copy=False)
    scored = ~np.isnan(real)
    count = scored.sum(axis=1)
    total = np.where(scored, real, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)
