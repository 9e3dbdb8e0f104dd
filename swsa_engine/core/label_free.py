"""The field's label-free model-selection baselines, as pure array functions over all tasks at once.

Each function scores every candidate of every task in one call, from what a user without labels
has: each candidate's scores on the task's unlabelled test images, or its synthetic AUROCs. The
selection layer turns the scores into picks (argmax for "higher is better" values). Shapes:
``T`` tasks, ``C`` candidates, ``Q`` unlabelled test images per task (padded; ``mask`` (T, Q) is
True for a real image), ``V`` synthetic sources, ``U`` uniform samples. Anomaly scores are
"higher = more anomalous", as everywhere in swsa.

A *missing* candidate of a task (NaN on every included image, e.g. a detector that was skipped
there) is left out of that task and gets NaN; a candidate NaN on only some included images is an
error, since leaving those images out for one candidate would compare rankings of different sets.

* :func:`model_centrality`: mean Kendall tau-b of a candidate's ranking of the test images with
  every other candidate's (the "MC" strategy of Ma, Zhao, Zhang & Akoglu 2021).
* :func:`rra_rho`, :func:`robust_rank_aggregation`: Kolde et al.'s (2012) robust rank aggregation
  of the candidates' rankings by the V synthetic sources.
* :func:`excess_mass_mass_volume`: Goix's (2016) Excess-Mass and Mass-Volume criteria.
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
  Model Selection for Time-series Anomaly Detection." ICLR 2023.
* Nicolas Goix. "How to Evaluate the Quality of Unsupervised Anomaly Detection Algorithms?"
  ICML 2016 Workshop on Anomaly Detection; arXiv:1607.01152, 2016.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import betainc

from swsa_engine.core.metrics.inputs import warn_undefined
from swsa_engine.core.validation import as_bool_mask, as_real_array, check_positive_int

__all__ = [
    "model_centrality", "rra_rho", "robust_rank_aggregation", "excess_mass_mass_volume",
    "expected_random_pick", "EM_LEVEL", "MV_ALPHA_RANGE", "EM_GRID_POINTS",
]

#: Goix (2016): the EM criterion integrates EM_s(t) over [0, EM_s^-1(EM_LEVEL)]
EM_LEVEL = 0.9
#: Goix (2016): the MV criterion integrates MV_s(alpha) over this interval of masses
MV_ALPHA_RANGE = (0.9, 0.999)
#: points of the trapezoid grid on [0, EM_s^-1(EM_LEVEL)] (EM_s is convex piecewise linear there)
EM_GRID_POINTS = 1001

# pairwise (sign) temporaries and (grid x threshold) blocks hold at most this many elements
_BLOCK_ELEMENTS = 1 << 22
# a level-set mass within this relative distance of EM_LEVEL counts as equal to it (rounding)
_MASS_TOLERANCE = 1e-9


def _checked_scores(scores, mask, function: str, name: str = "scores"):
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


def _sign_gram(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(T, C, C) float64: for candidates c, j, the sum over image pairs p < q (both included) of
    sign(x_cp - x_cq) * sign(x_jp - x_jq), i.e. concordant minus discordant pairs; the diagonal is
    each candidate's number of untied pairs. Exact: blocks of rows p keep every float32 sum below 2**24."""
    n_tasks, n_candidates, n_images = values.shape
    gram = np.zeros((n_tasks, n_candidates, n_candidates))
    rows = max(1, _BLOCK_ELEMENTS // max(1, n_tasks * n_candidates * n_images))
    for start in range(0, n_images, rows):
        stop = min(n_images, start + rows)
        left = values[:, :, start:stop, None]
        right = values[:, :, None, start:]
        # comparisons, not differences: exact for +-inf
        signs = (left > right).view(np.int8) - (left < right).view(np.int8)
        later = np.arange(start, n_images)[None, :] > np.arange(start, stop)[:, None]
        pairs = mask[:, start:stop, None] & mask[:, None, start:] & later
        signs *= pairs[:, None].view(np.int8)
        flat = torch.from_numpy(signs.reshape(n_tasks, n_candidates, -1).astype(np.float32))
        gram += torch.bmm(flat, flat.transpose(1, 2)).numpy()  # batched BLAS; numpy's stacked matmul is slower
    return gram


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
    tau-b is the cosine similarity of the candidates' pair-sign vectors, so all C x C taus of all
    tasks come from one batched matrix product (O(T C^2 Q^2) multiply-adds in BLAS) instead of
    C^2 / 2 calls of an O(Q^2) tau; ties are handled exactly as ``scipy.stats.kendalltau``.
    """
    scores, mask, available = _checked_scores(scores, mask, "model_centrality")
    values = np.where(available[:, :, None] & mask[:, None, :], scores, 0.0)  # missing: constant
    gram = _sign_gram(values, mask)
    untied = np.sqrt(np.diagonal(gram, axis1=1, axis2=2))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = gram / (untied[:, :, None] * untied[:, None, :])
    tau = np.clip(np.where(np.isfinite(tau), tau, 0.0), -1.0, 1.0)
    n_candidates = scores.shape[1]
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
    trimmed Borda / Kemeny count, this one is Kolde's.

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


def _checked_volume(volume, n_tasks: int, n_candidates: int) -> np.ndarray:
    """``volume`` (T,) or (T, C) as float64 (T, C), finite and > 0, else a one-line ValueError."""
    volume = as_real_array(volume, "volume", shape_doc="(T,) or (T, C)").astype(np.float64, copy=False)
    if volume.shape not in ((n_tasks,), (n_tasks, n_candidates)):
        raise ValueError(f"`volume` must have shape (T,) = ({n_tasks},) or (T, C) = ({n_tasks}, {n_candidates}), "
                         f"got shape {volume.shape}")
    bad = ~(np.isfinite(volume) & (volume > 0))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"`volume`{list(where)} = {volume[where]} must be finite and > 0: the Lebesgue volume of "
                         "the box the uniform samples were drawn in (in high dimension it under/overflows: "
                         "subsample features as Goix 2016 does)")
    return np.broadcast_to(volume.reshape(n_tasks, -1), (n_tasks, n_candidates))


def _checked_uniform(uniform_scores, available: np.ndarray) -> np.ndarray:
    """``uniform_scores`` as float64 (T, C, U), U >= 1, NaN only for missing candidates, else a ValueError."""
    n_tasks, n_candidates = available.shape
    uniform = as_real_array(uniform_scores, "uniform_scores", ndim=3, shape_doc="(T, C, U)").astype(np.float64)
    if uniform.shape[:2] != (n_tasks, n_candidates) or uniform.shape[2] == 0:
        raise ValueError(f"`uniform_scores` must have shape (T, C, U) = ({n_tasks}, {n_candidates}, U) with U >= 1, "
                         f"got shape {uniform.shape}")
    bad = np.isnan(uniform).any(axis=2) & available
    if bad.any():
        task, candidate = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"`uniform_scores`[{task}, {candidate}] holds NaN for a candidate scored on the test images; "
                         "score every uniform sample (NaN is allowed only for a missing candidate)")
    return uniform


def _checked_settings(em_level, alpha_range, em_grid_points) -> tuple[float, float, float, int]:
    """``(em_level, alpha_low, alpha_high, grid points)`` or a one-line ValueError."""
    if not 0.0 < float(em_level) < 1.0:
        raise ValueError(f"em_level must be in (0, 1), got em_level={em_level!r}; Goix 2016 uses {EM_LEVEL}")
    low, high = (float(a) for a in alpha_range)
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"alpha_range must be (low, high) with 0 <= low < high <= 1, got {tuple(alpha_range)!r}; "
                         f"Goix 2016 uses {MV_ALPHA_RANGE}")
    points = check_positive_int(em_grid_points, "em_grid_points", f"em_grid_points={EM_GRID_POINTS}")
    if points < 2:
        raise ValueError(f"em_grid_points must be >= 2, got {points}; pass e.g. em_grid_points={EM_GRID_POINTS}")
    return float(em_level), low, high, points


def _mass_volume(volume_fraction, n, volume, low, high) -> np.ndarray:
    """(T, C) exact integral of MV_s(alpha) over [low, high].

    ``volume_fraction`` (T, C, Q): for the i-th smallest normality score x_(i) of the task's n
    images (0-based, padding after), the fraction of uniform samples with s >= x_(i). MV_s(alpha)
    is volume * that fraction at the ceil(alpha n)-th largest score, i.e. at position n - k for
    alpha in ((k - 1) / n, k / n]; the integral weighs each position by that interval's overlap
    with [low, high].
    """
    positions = np.arange(volume_fraction.shape[2])
    k = n[:, None] - positions[None, :]  # (T, Q): mass rank of each position (<= 0 for padding)
    with np.errstate(invalid="ignore", divide="ignore"):
        upper = np.minimum(k / n[:, None], high)
        lower = np.maximum((k - 1) / n[:, None], low)
    weight = np.where(k >= 1, np.clip(upper - lower, 0.0, None), 0.0)
    return volume * (volume_fraction * weight[:, None, :]).sum(axis=2)


def _excess_mass(volume_fraction, n, volume, level, grid_points) -> tuple[np.ndarray, np.ndarray]:
    """``(criterion, unbounded)`` (T, C): the integral of EM_s(t) over [0, EM_s^-1(level)], NaN where
    ``unbounded``, i.e. EM_s^-1(level) is infinite.

    Level set i (the images with s >= x_(i), see :func:`_mass_volume`) has mass m_i = (n - i) / n
    and volume lambda_i = volume * fraction_i; EM_s(t) = max(0, max_i m_i - t lambda_i) is convex,
    piecewise linear and decreasing, so EM_s^-1(level) = max over m_i > level of
    (m_i - level) / lambda_i exactly, and on [0, EM_s^-1(level)] only level sets of mass >= level
    can attain the maximum. The integral is a trapezoid rule on ``grid_points`` points.
    """
    n_tasks, n_candidates, _ = volume_fraction.shape
    keep = int(min(volume_fraction.shape[2], np.floor((1.0 - level + _MASS_TOLERANCE) * n.max()) + 1))
    counts = (n[:, None] - np.arange(keep)[None, :]).astype(np.float64)  # (T, K): images in level set i
    excess = counts - level * n[:, None]
    above = excess > _MASS_TOLERANCE * n[:, None]
    heavy = excess >= -_MASS_TOLERANCE * n[:, None]  # mass >= level: may attain EM_s on [0, t_max]
    mass = np.where(heavy, counts / np.maximum(n, 1)[:, None], -np.inf)[:, None, :]
    lam = volume[:, :, None] * volume_fraction[:, :, :keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        reach = np.where(above[:, None, :], (excess / np.maximum(n, 1)[:, None])[:, None, :] / lam, 0.0)
    t_max = reach.max(axis=2)  # inf where a level set of mass > level has Monte-Carlo volume 0
    finite = np.isfinite(t_max)
    steps = np.linspace(0.0, 1.0, grid_points)
    flat_t = np.where(finite, t_max, 0.0).reshape(-1)
    flat_lam = lam.reshape(-1, 1, keep)
    flat_mass = np.broadcast_to(mass, lam.shape).reshape(-1, 1, keep)
    rows = max(1, _BLOCK_ELEMENTS // (grid_points * keep))
    integral = np.empty(flat_t.shape)
    for start in range(0, flat_t.size, rows):
        block = slice(start, start + rows)
        t = flat_t[block, None] * steps[None, :]  # (r, G)
        curve = np.maximum(0.0, (flat_mass[block] - t[:, :, None] * flat_lam[block]).max(axis=2))
        integral[block] = (curve.sum(axis=1) - 0.5 * (curve[:, 0] + curve[:, -1])) * flat_t[block] / (grid_points - 1)
    integral = integral.reshape(n_tasks, n_candidates)
    return np.where(finite, integral, np.nan), ~finite


def excess_mass_mass_volume(data_scores, mask, uniform_scores, volume, *, em_level: float = EM_LEVEL,
                            alpha_range: tuple[float, float] = MV_ALPHA_RANGE,
                            em_grid_points: int = EM_GRID_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Goix's Excess-Mass (higher = better) and Mass-Volume (lower = better) criteria of every candidate.

    Goix, "How to Evaluate the Quality of Unsupervised Anomaly Detection Algorithms?", ICML 2016
    Workshop on Anomaly Detection (arXiv:1607.01152). Goix's scoring function s is "higher = more
    normal", so s = -score here (both criteria depend on the order of s only). With P_n the
    empirical mass of the n test images and Leb(s >= u) estimated as ``volume`` times the fraction
    of the U uniform samples with s >= u (Monte Carlo):

    * ``EM_s(t) = sup_u P_n(s >= u) - t Leb(s >= u)``; criterion ``EM = integral of EM_s over
      [0, EM_s^-1(em_level)]``, ``EM_s^-1(0.9) = inf{t >= 0 : EM_s(t) <= 0.9}`` (the paper's
      interval: its upper end is each candidate's own; computed exactly, then a trapezoid rule
      on ``em_grid_points`` points; EM_s is convex piecewise linear there);
    * ``MV_s(alpha) = inf_u Leb(s >= u) s.t. P_n(s >= u) >= alpha``; criterion ``MV = integral of
      MV_s over alpha_range = [0.9, 0.999]`` (exact: MV_s is a step function of alpha).

    The caller draws the uniform samples and scores them: U points uniform in the bounding box of
    the task's test-image features (of Lebesgue volume ``volume``), scored by each candidate's
    detector like the test images. Candidates in different feature spaces (backbones) need their
    own box: pass ``volume`` (T, C). Monte-Carlo volumes only work in low dimension; Goix averages
    the criteria over random subsets of d' = 5 features (``volume`` then is the subset box's).

    Parameters
    ----------
    data_scores : (T, C, Q) anomaly scores on the test images (higher = more anomalous; NaN only
        for a missing candidate).
    mask : (T, Q) bool, True = a real image; None = all real.
    uniform_scores : (T, C, U) the same candidates' anomaly scores on the uniform samples (finite
        or +-inf; NaN only for a missing candidate).
    volume : (T,) or (T, C) the box volume, finite and > 0.
    em_level, alpha_range, em_grid_points : Goix's settings (:data:`EM_LEVEL`,
        :data:`MV_ALPHA_RANGE`) and the EM grid (:data:`EM_GRID_POINTS`).

    Returns
    -------
    em, mv : (T, C) float64. NaN for a missing candidate; ``em`` is also NaN (with one
    :class:`~swsa_engine.core.metrics.UndefinedMetricWarning`) where no uniform sample falls in
    a level set of mass above ``em_level``, so that EM_s never drops to it: draw more uniform
    samples or use fewer features.
    """
    data, mask, available = _checked_scores(data_scores, mask, "excess_mass_mass_volume", "data_scores")
    n_tasks, n_candidates, _ = data.shape
    uniform = _checked_uniform(uniform_scores, available)
    volume = _checked_volume(volume, n_tasks, n_candidates)
    level, low, high, grid_points = _checked_settings(em_level, alpha_range, em_grid_points)
    n = mask.sum(axis=1)
    normality = np.sort(np.where(mask[:, None, :] & available[:, :, None], -data, np.inf), axis=2)
    uniform_sorted = np.sort(np.where(available[:, :, None], -uniform, 0.0), axis=2)
    below = torch.searchsorted(torch.from_numpy(np.ascontiguousarray(uniform_sorted)),
                               torch.from_numpy(np.ascontiguousarray(normality)), side="left").numpy()
    fraction = (uniform.shape[2] - below) / uniform.shape[2]  # uniform samples with s >= each data value
    mv = _mass_volume(fraction, n, volume, low, high)
    em, unbounded = _excess_mass(fraction, n, volume, level, grid_points)
    warn_undefined("excess_mass_mass_volume (EM)", unbounded & available,
                   f"no uniform sample falls in a level set of mass above {level} (its Monte-Carlo volume is 0); "
                   "draw more uniform samples or use fewer features")
    return np.where(available, em, np.nan), np.where(available, mv, np.nan)


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
