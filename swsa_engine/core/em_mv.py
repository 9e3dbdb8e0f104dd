"""Goix's Excess-Mass and Mass-Volume criteria, with his feature sub-sampling for high dimensions.

Nicolas Goix, "How to Evaluate the Quality of Unsupervised Anomaly Detection Algorithms?", ICML
2016 Workshop on Anomaly Detection (arXiv:1607.01152; reference code github.com/ngoix/EMMV_benchmarks,
``em.py`` and ``em_bench_high.py``). Pure arrays: the pass that fits each candidate's detector on
feature subsets and scores the samples is :mod:`swsa_engine.run.em_mv_pass`.

* :func:`excess_mass_mass_volume`: the two criteria of every candidate from its scores of the
  unlabelled test images and of uniform samples of a box of known volume.
* Feature sub-sampling (Goix's Algorithm for high-dimensional data): EM and MV curves can only be
  estimated by Monte Carlo in a few dimensions, so for each of ``m`` draws a random subset F_k of
  ``d'`` features is chosen, the detector is fitted on the data restricted to F_k, the criteria are
  computed in F_k with uniform samples drawn in the bounding box of the test data restricted to
  F_k, and the ``m`` criteria are averaged. Goix uses d' = 5, m = 50 and 100,000 uniform samples
  (:data:`SUBSET_FEATURES`, :data:`SUBSET_DRAWS`; swsa draws :data:`UNIFORM_SAMPLES` = 2,000 per
  draw to bound the pass's time, measured in :mod:`swsa_engine.run.em_mv_pass`: the Monte-Carlo
  error of a level set holding 1 % of a box is then about 22 % per draw, 3 % over the 50 draws).
  :func:`draw_feature_boxes` draws the subsets and boxes, :func:`uniform_in_boxes` the samples,
  :func:`subsampled_em_mv` computes and averages the criteria.
* Volumes are measured in standardised units (each feature divided by its standard deviation over
  the test images), as Goix's benchmark standardises every feature (``sklearn.preprocessing.scale``)
  before drawing boxes: candidates on different backbones have feature scales that differ by
  orders of magnitude, and an absolute volume (which scales EM by 1/c and MV by c) would compare
  the backbones' units, not their detectors. The detectors themselves see the raw features.
* :func:`em_mv_record` / :func:`em_mv_criteria`: the criteria as stored in a cube's
  ``config["em_mv"]`` (saved as datasets of the cube's file by :mod:`swsa_engine.run.cube_io`:
  :func:`split_em_mv`, :func:`join_em_mv`), read back aligned to any tasks and candidates.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from swsa_engine.core.detectors import PcaDetector, PyodDetector
from swsa_engine.core.detectors.pyod import PYOD_MODELS
from swsa_engine.core.label_free import checked_candidate_scores
from swsa_engine.core.metrics import UndefinedMetricWarning
from swsa_engine.core.metrics.inputs import warn_undefined
from swsa_engine.core.validation import as_real_array, check_positive_int

__all__ = [
    "EM_LEVEL", "MV_ALPHA_RANGE", "EM_GRID_POINTS", "SUBSET_FEATURES", "SUBSET_DRAWS", "UNIFORM_SAMPLES",
    "EM_MV_KEY", "EM_MV_ARRAYS", "FeatureBoxes", "excess_mass_mass_volume", "draw_feature_boxes", "uniform_in_boxes",
    "subsampled_em_mv", "unsupported_reason", "em_mv_record", "em_mv_criteria", "split_em_mv", "join_em_mv",
]

#: Goix (2016): the EM criterion integrates EM_s(t) over [0, EM_s^-1(EM_LEVEL)]
EM_LEVEL = 0.9
#: Goix (2016): the MV criterion integrates MV_s(alpha) over this interval of masses
MV_ALPHA_RANGE = (0.9, 0.999)
#: points of the trapezoid grid on [0, EM_s^-1(EM_LEVEL)] (EM_s is convex piecewise linear there)
EM_GRID_POINTS = 1001
#: Goix (2016), high-dimensional data: features per random subset (d') and number of subsets (m)
SUBSET_FEATURES = 5
SUBSET_DRAWS = 50
#: uniform samples per subset (Goix draws 100,000; the pass's time grows linearly with it, see
#: :mod:`swsa_engine.run.em_mv_pass`: 2,000 keeps the ELPV demo's pass to about 20 s)
UNIFORM_SAMPLES = 2_000
#: the key of a cube's config holding the criteria (:func:`em_mv_record`)
EM_MV_KEY = "em_mv"
#: the (T, C) arrays of the record: mean EM, mean MV, and the draws whose EM was undefined
EM_MV_ARRAYS = ("em", "mv", "em_undefined_draws")

# excess-mass grid blocks hold at most this many elements
_BLOCK_ELEMENTS = 1 << 22
# a level-set mass within this relative distance of EM_LEVEL counts as equal to it (rounding)
_MASS_TOLERANCE = 1e-9


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
    data, mask, available = checked_candidate_scores(data_scores, mask, "excess_mass_mass_volume", "data_scores")
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


# --------------------------------------------------------------------------- feature sub-sampling


@dataclass(frozen=True)
class FeatureBoxes:
    """``m`` random feature subsets of one task's test features and their bounding boxes.

    columns : (m, d) int64 the feature indices of each subset (sorted)
    low, high : (m, d) float64 the box: the test features' minimum and maximum on those columns
    volume : (m,) float64 the box volume in standardised units, prod((high - low) / std)
    """

    columns: np.ndarray
    low: np.ndarray
    high: np.ndarray
    volume: np.ndarray


def draw_feature_boxes(test_features, n_draws: int = SUBSET_DRAWS, n_features: int = SUBSET_FEATURES,
                       rng: np.random.Generator | None = None) -> FeatureBoxes:
    """Goix's feature sub-sampling for one task: ``n_draws`` subsets of ``n_features`` features.

    ``test_features`` (Q, D): the task's unlabelled test images, finite. Each subset is drawn
    uniformly without replacement among the features that are not constant over the test images
    (a constant feature has a box of width 0); with no more than ``n_features`` of those, every
    subset is all of them (the draws then differ only in their uniform samples). ``rng``:
    ``numpy.random.default_rng`` (a fresh unseeded one when None).
    """
    features = as_real_array(test_features, "test_features", ndim=2, shape_doc="(Q, D)").astype(np.float64, copy=False)
    n_draws = check_positive_int(n_draws, "n_draws", f"n_draws={SUBSET_DRAWS}")
    n_features = check_positive_int(n_features, "n_features", f"n_features={SUBSET_FEATURES}")
    if not np.isfinite(features).all():
        raise ValueError("test_features must be finite: leave out the images whose embedding failed")
    low, high = features.min(axis=0, initial=np.inf), features.max(axis=0, initial=-np.inf)
    eligible = np.flatnonzero(high > low)
    if eligible.size == 0:
        raise ValueError(f"every one of the {features.shape[1]} features is constant over the {features.shape[0]} test "
                         "images: there is no box to draw uniform samples in; EM/MV needs at least two distinct images")
    rng = np.random.default_rng() if rng is None else rng
    width = min(n_features, eligible.size)
    order = np.argsort(rng.random((n_draws, eligible.size)), axis=1)[:, :width]
    columns = np.sort(eligible[order], axis=1)
    scale = features.std(axis=0)  # > 0 wherever the range is
    volume = np.prod((high[columns] - low[columns]) / scale[columns], axis=1)
    return FeatureBoxes(columns, low[columns], high[columns], volume)


def uniform_in_boxes(boxes: FeatureBoxes, n_samples: int = UNIFORM_SAMPLES,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """(m, U, d) float64: ``n_samples`` points uniform in each of the ``m`` boxes."""
    n_samples = check_positive_int(n_samples, "n_samples", f"n_samples={UNIFORM_SAMPLES}")
    rng = np.random.default_rng() if rng is None else rng
    draws, width = boxes.low.shape
    return boxes.low[:, None, :] + (boxes.high - boxes.low)[:, None, :] * rng.random((draws, n_samples, width))


def subsampled_em_mv(data_scores, uniform_scores, volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Goix's criteria averaged over feature subsets (his high-dimensional protocol).

    Parameters
    ----------
    data_scores : (m, C, Q) each candidate's anomaly scores of the task's test images, by its
        detector fitted on subset k's features (NaN only for a candidate not scored on the task).
    uniform_scores : (m, C, U) the same on the uniform samples of subset k's box.
    volume : (m,) the boxes' volumes (:attr:`FeatureBoxes.volume`).

    Returns
    -------
    em, mv : (C,) the means over the m subsets; ``em`` over the subsets where it is defined (it is
        not when no uniform sample falls in a level set of mass above :data:`EM_LEVEL`), NaN when
        it is defined on none.
    em_undefined : (C,) int, the number of subsets where EM was undefined. An undefined EM means
        the level sets of mass above :data:`EM_LEVEL` hold no uniform sample (they are tiny: a
        concentrated, good score), so leaving those subsets out biases EM down for the most
        concentrated candidates; the count says how often (Goix's code integrates such a subset up
        to a fixed t instead, a cap in arbitrary volume units).
    """
    with warnings.catch_warnings():  # an undefined EM is counted and returned, not warned per call
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        em, mv = excess_mass_mass_volume(data_scores, None, uniform_scores, volume)
    scored = ~np.isnan(mv)
    defined = scored & ~np.isnan(em)
    with np.errstate(invalid="ignore", divide="ignore"):
        em_mean = np.where(defined, em, 0.0).sum(axis=0) / defined.sum(axis=0)
        mv_mean = np.where(scored, mv, 0.0).sum(axis=0) / scored.sum(axis=0)
    return em_mean, mv_mean, (scored & ~defined).sum(axis=0)


def unsupported_reason(detector, n_draws: int = SUBSET_DRAWS, n_features: int = SUBSET_FEATURES,
                       n_samples: int = UNIFORM_SAMPLES) -> str:
    """Why EM/MV by feature sub-sampling does not apply to ``detector`` ("" when it does).

    Goix's protocol refits the detector on ``n_features`` features and scores uniform samples of
    that space, so it needs a detector of feature vectors whose score depends on them alone, that
    stays a detector on a small subset, and that scores ``n_samples`` points per subset quickly.
    """
    if detector.needs != "features":
        return (f"{detector.label} scores patch tokens (several vectors per image): a uniform sample of a feature box "
                "is not an image's patch tokens")
    if detector.text_prior:
        return (f"{detector.label} adds CLIP's text prior of the image, which a uniform sample of the feature space "
                "does not have")
    settings = dict(detector.settings) if isinstance(detector, PyodDetector) else {}
    components = detector.n if isinstance(detector, PcaDetector) else settings.get("n_components")
    if isinstance(components, (int, np.integer)) and components >= n_features:
        return (f"{detector.label} keeps {components} principal axes of a {n_features}-feature subset: it reconstructs "
                "every point exactly (score 0 everywhere), so EM/MV would measure the sub-sampling, not the detector")
    if isinstance(detector, PyodDetector) and PYOD_MODELS[detector.model].transductive:
        return (f"{detector.label} is transductive in PyOD and scored one query at a time: {n_draws} subsets x "
                f"{n_samples} uniform samples = {n_draws * n_samples:,} decision_function calls per task, too slow here")
    return ""


# --------------------------------------------------------------------------- the criteria stored with a cube


def _json_matrix(values: np.ndarray) -> list:
    """A (T, C) array as nested lists with None for NaN (JSON has no NaN)."""
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(values, dtype=np.float64)]


def em_mv_record(task_ids, candidates, em, mv, em_undefined, *, settings: dict, skipped: list) -> dict:
    """The criteria as a cube's ``config[EM_MV_KEY]`` (JSON-able): ``task_ids`` (T,), ``candidates``
    (C names), ``em``, ``mv``, ``em_undefined_draws`` (T, C) (NaN stored as None), ``settings``
    (subset size, draws, uniform samples, seed, seconds, ...) and ``skipped`` ([candidate, reason]
    pairs: the candidates, or candidate on a task, left NaN and why)."""
    return {"task_ids": [int(t) for t in task_ids], "candidates": [str(c) for c in candidates],
            "em": _json_matrix(em), "mv": _json_matrix(mv), "em_undefined_draws": _json_matrix(em_undefined),
            "settings": dict(settings), "skipped": [[str(c), str(r)] for c, r in skipped]}


def em_mv_criteria(config: dict, task_ids, candidates, rows=None) -> dict[str, np.ndarray]:
    """``{"em": (T', C), "mv": (T', C)}`` from a cube's config, aligned to ``task_ids`` (T,) and
    ``candidates`` (C names) by id and name (NaN where the record has none), for the tasks
    ``rows`` (default all); ``{}`` when the config holds no EM/MV record."""
    record = config.get(EM_MV_KEY)
    if not record:
        return {}
    task_ids = np.asarray(task_ids, dtype=np.int64)
    task_ids = task_ids if rows is None else task_ids[np.asarray(rows)]
    task_row = {int(t): i for i, t in enumerate(record["task_ids"])}
    column = {str(c): j for j, c in enumerate(record["candidates"])}
    t_index = np.array([task_row.get(int(t), -1) for t in task_ids], dtype=np.int64)
    c_index = np.array([column.get(str(c), -1) for c in candidates], dtype=np.int64)
    out = {}
    for name in ("em", "mv"):
        stored = np.array(record[name], dtype=np.float64).reshape(len(task_row), len(column))  # None -> NaN
        values = stored[np.maximum(t_index, 0)][:, np.maximum(c_index, 0)] if stored.size else \
            np.full((len(t_index), len(c_index)), np.nan)
        out[name] = np.where((t_index >= 0)[:, None] & (c_index >= 0)[None, :], values, np.nan)
    return out


def split_em_mv(config: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config without the record's (T, C) arrays, {"em_mv_<name>": array})``: what a cube file
    stores as attributes and as datasets (an attribute holds at most 64 KiB); ``config`` is not changed."""
    record = config.get(EM_MV_KEY)
    if not record:
        return config, {}
    arrays = {f"{EM_MV_KEY}_{name}": np.array(record[name], dtype=np.float64).reshape(
        len(record["task_ids"]), len(record["candidates"])) for name in EM_MV_ARRAYS}
    rest = {key: value for key, value in record.items() if key not in EM_MV_ARRAYS}
    return {**config, EM_MV_KEY: rest}, arrays


def join_em_mv(config: dict, arrays: dict[str, np.ndarray]) -> dict:
    """The inverse of :func:`split_em_mv`: ``config`` with the record's arrays put back (a config
    without a record, from a cube saved before EM/MV existed, is returned as it is)."""
    record = config.get(EM_MV_KEY)
    if not record or f"{EM_MV_KEY}_em" not in arrays:
        return config
    restored = {name: _json_matrix(arrays[f"{EM_MV_KEY}_{name}"]) for name in EM_MV_ARRAYS}
    return {**config, EM_MV_KEY: {**record, **restored}}
