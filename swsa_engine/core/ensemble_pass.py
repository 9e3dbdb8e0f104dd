"""Ensembles as candidates: combinations of a sweep's single candidates, scored like any candidate.

From a sweep's :class:`~swsa_engine.core.score_cube.ScoreCube` (every single candidate's scores
of each task's real test images and synthetic validation queries), :func:`ensemble_candidates`
builds (issue 25, Aggarwal & Sathe 2015; Zhao et al., PyOD's ``combination``; Caruana et al. 2004):

* ``ensemble(mean)``, ``ensemble(max)``, ``ensemble(median)``, ``ensemble(aom)``,
  ``ensemble(moa)`` over all eligible candidates (:func:`~swsa_engine.core.ensembles.combine_scores`);
* ``ensemble(mean, backbone=B)`` over backbone B's detectors (when there are several detectors)
  and ``ensemble(mean, detector=D)`` over detector D's backbones (when there are several backbones);
* ``ensemble(selected)``: the weighted mean with Caruana's bagged greedy weights
  (:func:`~swsa_engine.core.ensembles.greedy_ensemble_weights`) chosen on each task's synthetic
  validation set (mean synthetic AUROC over the base sources) — no real label.

Each member's scores are normalised without labels (:func:`~swsa_engine.core.ensembles.normalise_scores`,
mid-ranks by default) over the pool being scored: the task's real test images for the real
AUROCs, the task's synthetic validation queries for the synthetic AUROCs. The ensembles' AUROCs
are those :func:`~swsa_engine.core.score_cube.score_aurocs` gives their scores, as every single
candidate's (hardest-N: the anomalies the ensemble scores lowest), bit for bit, but computed with
one sort per pool (:func:`_ensemble_aurocs`).

Exclusion rule (:data:`EXCLUSION_RULE`), per task, recorded as skips and in the config, never
silent: a member is left out of a task's ensembles when its weights are random
(``weights_kind == "random"``), when it has no scores on the task, when some of the task's real
images or synthetic queries lack a finite score (self-validation, protocol limits, unusable
images), or when its scores are constant on the real images or on the synthetic queries.

Time and memory: every member is normalised once (one sort per candidate) for all ensembles;
the combinations and the AUROCs read a few tasks at a time (:data:`COMBINE_CHUNK`), so beyond the
score cube, its normalised copy and the ensembles' own scores the pass holds no (T, C, Q)
temporary. Pure arrays: no I/O.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from swsa_engine.core.cube import SKIP_COLUMNS, AurocCube, hard_source_name
from swsa_engine.core.ensembles import combine_scores, greedy_ensemble_weights, normalise_scores, shuffled_buckets
from swsa_engine.core.score_cube import ScoreCube
from swsa_engine.core.synthetic_resampling import part_aurocs_finite

__all__ = ["ENSEMBLE_FAMILY", "SELECTED", "EXCLUSION_RULE", "COMBINE_CHUNK", "EnsembleSpec", "EnsembleResult",
           "ensemble_specs", "single_candidates", "eligible_members", "ensemble_candidates", "with_ensembles"]

#: the ``family`` (and ``weights_kind``) of ensemble candidates in a cube's candidates table
ENSEMBLE_FAMILY = "ensemble"
#: the Caruana-selected ensemble's name
SELECTED = "ensemble(selected)"
#: the recorded rule that leaves members out of a task's ensembles
EXCLUSION_RULE = ("a member is left out of a task's ensembles when its weights are random (weights_kind 'random'), "
                  "it has no scores on the task, some of the task's real test images or synthetic validation queries "
                  "lack a finite score, or its scores are constant on either")
#: the tasks of a step of the pass hold at most about this many scores (tasks × candidates × images)
COMBINE_CHUNK = 2 ** 20


@dataclass(frozen=True)
class EnsembleSpec:
    """One ensemble: its candidate name, combination ``method`` (``mean``, ``max``, ``median``,
    ``aom``, ``moa``, or ``selected`` for the greedy weighted mean) and ``members`` (candidate indices)."""

    name: str
    method: str
    members: tuple[int, ...]


@dataclass
class EnsembleResult:
    """The ensembles of :func:`ensemble_candidates`: ``candidates`` (K rows of the cube's
    candidates table), ``real`` (T, K, 2), ``per_class`` (T, K, G), ``synthetic`` (T, K, V'),
    ``scores`` the score cube with the K ensembles appended, ``skips`` [(task_id, name, reason)]
    and ``config`` (name → method, members, exclusions, weights)."""

    candidates: pd.DataFrame
    real: np.ndarray
    per_class: np.ndarray
    synthetic: np.ndarray
    scores: ScoreCube
    skips: list
    config: dict


def ensemble_specs(candidates: pd.DataFrame) -> list[EnsembleSpec]:
    """The ensembles of the single candidates ``candidates`` (name, feature, detector, ...; rows
    of family :data:`ENSEMBLE_FAMILY` are not members): the five combinations over all, the
    per-backbone and per-detector means (only where they differ from the mean over all and have
    two members or more) and the selected ensemble. None with fewer than two candidates."""
    family = candidates["family"].astype(str).to_numpy() if "family" in candidates else np.full(len(candidates), "")
    singles = np.flatnonzero(family != ENSEMBLE_FAMILY)
    if len(singles) < 2:
        return []
    every = tuple(int(c) for c in singles)
    specs = [EnsembleSpec(f"ensemble({m})", m, every) for m in ("mean", "max", "median", "aom", "moa")]
    if {"feature", "detector"} <= set(candidates):
        own = candidates.iloc[singles]
        own = own[own["detector"].astype(str) != "imported"]
        by_feature = own.groupby("feature", sort=False).groups
        by_detector = own.groupby("detector", sort=False).groups
        if len(by_detector) > 1:
            specs += [EnsembleSpec(f"ensemble(mean, backbone={f})", "mean", tuple(int(i) for i in idx))
                      for f, idx in by_feature.items() if len(idx) > 1]
        if len(by_feature) > 1:
            specs += [EnsembleSpec(f"ensemble(mean, detector={d})", "mean", tuple(int(i) for i in idx))
                      for d, idx in by_detector.items() if len(idx) > 1]
    return specs + [EnsembleSpec(SELECTED, "selected", every)]


def single_candidates(candidates: pd.DataFrame) -> np.ndarray:
    """(C,) bool: the candidates whose ``family`` is not ``"ensemble"`` (all, without a family column)."""
    if "family" not in candidates:
        return np.ones(len(candidates), dtype=bool)
    return candidates["family"].astype(str).to_numpy() != ENSEMBLE_FAMILY


def _pools(scores: ScoreCube, single: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, Q) and (T, W) bool: each task's real test images and synthetic validation queries that
    some ``single`` candidate scored (an image no candidate could score is no one's fault); one
    candidate at a time, so that no (T, C, Q) temporary is made."""
    real_any = np.zeros(scores.real_label.shape, dtype=bool)
    synth_any = np.zeros(scores.synthetic_part.shape, dtype=bool)
    for c in np.flatnonzero(single):
        real_any |= np.isfinite(scores.real_scores[:, c])
        synth_any |= np.isfinite(scores.synthetic_scores[:, c])
    return scores.real_pool & real_any, scores.synthetic_pool & synth_any


def _member_checks(values: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One candidate's scores (T, N) over its tasks' ``pool`` (T, N) → (T,) each: how many pool
    images lack a finite score, whether it scored any, whether its finite scores are all equal (a
    non-finite score makes the candidate ineligible by the missing-score rule in any case)."""
    finite = np.isfinite(values)
    inside = pool & finite
    high = np.where(inside, values, -np.inf).max(axis=1, initial=-np.inf)
    low = np.where(inside, values, np.inf).min(axis=1, initial=np.inf)
    return (pool & ~finite).sum(axis=1), inside.any(axis=1), high <= low


def eligible_members(scores: ScoreCube, candidates: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``eligible`` (T, C) bool and ``reason`` (T, C) object ("" where eligible) under :data:`EXCLUSION_RULE`.

    The pools are the task's real test images and synthetic validation queries that some single
    candidate scored (an image no candidate could score is no one's fault)."""
    single = single_candidates(candidates)
    return _eligibility(scores, candidates, single, _pools(scores, single))


def _eligibility(scores: ScoreCube, candidates: pd.DataFrame, single: np.ndarray,
                 pools: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`eligible_members` with the ``single`` mask and the ``pools`` of :func:`_pools`."""
    shape = (len(scores.task_ids), len(scores.candidates))
    missing_real, missing_synth = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    scored, constant = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    for c in range(shape[1]):  # one candidate at a time: no (T, C, Q) temporary
        missing_real[:, c], scored_real, constant_real = _member_checks(scores.real_scores[:, c], pools[0])
        missing_synth[:, c], scored_synth, constant_synth = _member_checks(scores.synthetic_scores[:, c], pools[1])
        scored[:, c], constant[:, c] = scored_real | scored_synth, constant_real | constant_synth
    random = (candidates["weights_kind"].astype(str).to_numpy() == "random") if "weights_kind" in candidates else ~single
    reason = np.full(shape, "", dtype=object)
    rules = [
        (constant, "its scores are constant on the task's real test images or synthetic validation queries"),
        (missing_real > 0, "{r} of the task's real test images have no finite score"),
        (missing_synth > 0, "{s} of the task's synthetic validation queries have no finite score (self-validation, "
                            "protocol limits or unusable images)"),
        (~scored, "it has no scores on the task (skipped there)"),
        (np.broadcast_to(random, shape), "its weights are random (weights_kind 'random')"),
        (np.broadcast_to(~single, shape), "it is an ensemble"),
    ]
    for hit, text in rules:  # the last rule that applies is the reason given
        for t, c in np.argwhere(hit):
            reason[t, c] = text.format(r=int(missing_real[t, c]), s=int(missing_synth[t, c]))
    return reason == "", reason


def _normalised(scores: ScoreCube, rows: slice, eligible: np.ndarray, pools: tuple,
                normalisation: str) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate's real (T', C, Q) and synthetic (T', C, W) scores on the tasks ``rows``,
    normalised over each task's pools once for all ensembles (a member's normalised scores do not
    depend on the other members); 0 off the pools and where a candidate is not eligible (never
    read: the ensembles mask their scores by the pools, and choose only among eligible members).
    ``eligible`` and ``pools`` are those of the tasks ``rows``."""
    out = []
    for values, pool in zip((scores.real_scores[rows], scores.synthetic_scores[rows]), pools):
        target = np.zeros(values.shape)
        for c in range(values.shape[1]):
            members = np.flatnonzero(eligible[:, c])
            if members.size:
                target[members, c] = _normalised_member(values[members, c], pool[members], normalisation)
        out.append(target)
    return out[0], out[1]


def _normalised_member(values: np.ndarray, pool: np.ndarray, normalisation: str) -> np.ndarray:
    """One candidate's scores (T', N) normalised over each task's ``pool`` (T', N); 0 off the pool."""
    normalised = normalise_scores(np.where(pool, values, 0.0)[:, None], pool, normalisation)[:, 0]
    return np.where(pool, normalised, 0.0)


def _member_sets(eligible: np.ndarray) -> dict[tuple, np.ndarray]:
    """Tasks grouped by their member set: member indices (tuple) → task rows."""
    sets: dict[tuple, list] = {}
    for t, row in enumerate(eligible):
        sets.setdefault(tuple(np.flatnonzero(row).tolist()), []).append(t)
    return {members: np.asarray(rows) for members, rows in sets.items()}


def _ensemble_scores(scores: ScoreCube, rows: slice, spec: EnsembleSpec, eligible: np.ndarray, pools: tuple,
                     normalised: tuple, selection: dict, out: tuple) -> dict:
    """One ensemble over the tasks ``rows``: its (T', Q) and (T', W) scores written into ``out``
    (NaN off the pools; left NaN for a task with no member left), and its per-task members and
    weights {task_id: {candidate: weight}} returned. ``eligible``, ``pools`` and ``normalised``
    (:func:`_normalised`) are those of the tasks ``rows``."""
    weights_by_task = {}
    in_spec = np.zeros(eligible.shape[1], dtype=bool)
    in_spec[list(spec.members)] = True
    for members, sub in _member_sets(eligible & in_spec).items():
        if not members:
            continue
        index = np.asarray(members)
        weights, method = None, spec.method
        if method == "selected":
            parts = np.where(pools[1][sub], scores.synthetic_part[rows][sub], -1)
            weights = greedy_ensemble_weights(normalised[1][sub[:, None], index], parts, len(scores.sources),
                                              **selection)
            method = "mean"
        buckets = shuffled_buckets(len(index), min(5, len(index))) if method in ("aom", "moa") else None
        for values, pool, target in zip(normalised, pools, out):
            combined = combine_scores(values[sub[:, None], index], method, weights=weights, buckets=buckets)
            target[sub] = np.where(pool[sub], combined, np.nan)
        w = np.full((len(sub), len(index)), 1.0 / len(index)) if weights is None else weights
        for r, t in enumerate(scores.task_ids[rows][sub]):
            weights_by_task[int(t)] = {scores.candidates[c]: round(float(x), 6) for c, x in zip(index, w[r]) if x > 0}
    return weights_by_task


def _ensemble_aurocs(scores: ScoreCube, rows: slice, real: np.ndarray, synth: np.ndarray, hardest: tuple,
                     out: dict) -> None:
    """Write into ``out`` (``real`` (T, K, 2), ``per_class`` (T, K, G), ``synthetic`` (T, K, V'))
    at the tasks ``rows`` the AUROCs :func:`~swsa_engine.core.score_cube.score_aurocs` gives
    candidates with scores ``real`` (T', K, Q) and ``synth`` (T', K, W), by
    :func:`~swsa_engine.core.synthetic_resampling.part_aurocs_finite`: one sort of each ensemble's
    real scores per labelling (one-vs-rest; normals against each class; the one-vs-closest is the
    class minimum, set by the caller) and one of its synthetic scores (every source and its
    hardest N) — the same doubled Mann-Whitney counts and the same one division, so the same values."""
    label, group = scores.real_label[rows], scores.real_group[rows]
    rest = np.where(scores.real_in_rest[rows] & (label >= 0), label, -1)  # 0 normal, 1 anomaly (one-vs-rest)
    by_class = np.where(label == 0, 0, np.where((label == 1) & (group >= 0), group + 1, -1))
    for k in range(real.shape[1]):
        out["real"][rows, k, 0] = part_aurocs_finite(real[:, k], rest, 1)[:, 0]
        out["per_class"][rows, k] = part_aurocs_finite(real[:, k], by_class, scores.group_names.shape[1])
        out["synthetic"][rows, k] = part_aurocs_finite(synth[:, k], scores.synthetic_part[rows], len(scores.sources),
                                                       hardest)


def _ensembles(scores: ScoreCube, specs: list, eligible: np.ndarray, pools: tuple, normalisation: str,
               selection: dict, hardest: tuple) -> tuple[ScoreCube, dict, list]:
    """The score cube with the ``specs``' ensembles appended, their AUROCs (as :func:`_ensemble_aurocs`)
    and each one's weights by task, computed a few tasks at a time (:data:`COMBINE_CHUNK`):
    normalise every member, combine, score; nothing of the size of the score cube but the result."""
    names, n_single, n_tasks = [spec.name for spec in specs], len(scores.candidates), len(scores.task_ids)
    extended = scores.with_candidates(names, np.broadcast_to(np.nan, (n_tasks, len(names)) + scores.real_ids.shape[1:]),
                                      np.broadcast_to(np.nan, (n_tasks, len(names)) + scores.synthetic_ids.shape[1:]))
    n_columns = len(scores.sources) * (1 + len(hardest))
    aurocs = {"real": np.full((n_tasks, len(names), 2), np.nan),
              "per_class": np.full((n_tasks, len(names), scores.group_names.shape[1]), np.nan),
              "synthetic": np.full((n_tasks, len(names), n_columns), np.nan)}
    weights = [{} for _ in specs]
    step = max(1, COMBINE_CHUNK // max(1, n_single * scores.real_ids.shape[1]))
    for start in range(0, n_tasks, step):
        rows = slice(start, start + step)
        chunk_pools = (pools[0][rows], pools[1][rows])
        normalised = _normalised(scores, rows, eligible[rows], chunk_pools, normalisation)
        for k, spec in enumerate(specs):
            out = extended.real_scores[rows, n_single + k], extended.synthetic_scores[rows, n_single + k]
            weights[k].update(_ensemble_scores(scores, rows, spec, eligible[rows], chunk_pools, normalised, selection,
                                               out))
        _ensemble_aurocs(scores, rows, extended.real_scores[rows, n_single:],
                         extended.synthetic_scores[rows, n_single:], hardest, aurocs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a task without any class: NaN, as score_aurocs gives
        aurocs["real"][..., 1] = np.nanmin(aurocs["per_class"], axis=2) if aurocs["per_class"].shape[2] else np.nan
    return extended, aurocs, weights


def _in_member_set_order(weights: dict, eligible: np.ndarray, spec: EnsembleSpec, task_ids: np.ndarray) -> dict:
    """``weights`` {task_id: ...} in the order tasks are grouped by member set (as one pass over all
    tasks lists them), so that the recorded config does not depend on the chunking."""
    in_spec = np.zeros(eligible.shape[1], dtype=bool)
    in_spec[list(spec.members)] = True
    return {int(task_ids[t]): weights[int(task_ids[t])]
            for members, rows in _member_sets(eligible & in_spec).items() if members for t in rows}


def _skips(scores: ScoreCube, spec: EnsembleSpec, eligible: np.ndarray, reason: np.ndarray) -> list:
    """[(task_id, ensemble name, reason)]: per task, the members left out grouped by reason, or no member left."""
    out = []
    for t, task_id in enumerate(scores.task_ids):
        left_out: dict[str, list] = {}
        for c in spec.members:
            if not eligible[t, c]:
                left_out.setdefault(reason[t, c], []).append(scores.candidates[c])
        for why, names in left_out.items():
            out.append((int(task_id), spec.name, f"{spec.name} leaves out {len(names)} member(s) because {why}: "
                                                 f"{', '.join(names)}"))
        if not eligible[t, list(spec.members)].any():
            out.append((int(task_id), spec.name, f"{spec.name} has no member left on the task ({EXCLUSION_RULE})"))
    return out


def ensemble_candidates(scores: ScoreCube, candidates: pd.DataFrame, *, hardest: tuple[int, ...] = (10, 5),
                        normalisation: str = "rank", selection: dict | None = None) -> EnsembleResult | None:
    """The ensembles of :func:`ensemble_specs` over ``scores`` (candidates table ``candidates``,
    the score cube's order), their AUROCs, scores, skips and config; None when there are none.
    ``normalisation``: ``"rank"`` or ``"zscore"``; ``selection``: keywords of
    :func:`~swsa_engine.core.ensembles.greedy_ensemble_weights` (steps, bags, fraction, seed)."""
    if list(candidates["name"]) != list(scores.candidates):
        raise ValueError("the candidates table and the score cube must list the same candidates in the same order")
    specs = ensemble_specs(candidates)
    if not specs:
        return None
    selection = dict(selection or {})
    single = single_candidates(candidates)
    pools = _pools(scores, single)
    eligible, reason = _eligibility(scores, candidates, single, pools)
    # an ensemble none of whose members is eligible on any task would be an all-NaN row: not built, said so
    not_built = {spec.name: f"not built: no member is eligible on any task ({EXCLUSION_RULE})"
                 for spec in specs if not eligible[:, list(spec.members)].any()}
    specs = [spec for spec in specs if spec.name not in not_built]
    if not specs:
        return EnsembleResult(candidates.iloc[:0], np.zeros((len(scores.task_ids), 0, 2)),
                              np.zeros((len(scores.task_ids), 0, scores.group_names.shape[1])),
                              np.zeros((len(scores.task_ids), 0, len(scores.sources) * (1 + len(hardest)))), scores, [],
                              {"rule": EXCLUSION_RULE, "ensembles": {}, "not_built": not_built})
    extended, aurocs, weights = _ensembles(scores, specs, eligible, pools, normalisation, selection, hardest)
    config, skips = {}, []
    for spec, by_task in zip(specs, weights):
        skips += _skips(scores, spec, eligible, reason)
        config[spec.name] = {"method": spec.method, "normalisation": normalisation,
                             "members": [scores.candidates[c] for c in spec.members],
                             "weights": _in_member_set_order(by_task, eligible, spec, scores.task_ids),
                             **({"selection": {"steps": 20, "bags": 10, "fraction": 0.5, "seed": 0, **selection},
                                 "validated_on": "mean synthetic AUROC over the base sources"}
                                if spec.method == "selected" else {}),
                             **({"buckets": "shuffled_buckets(seed=0), up to 5"} if spec.method in ("aom", "moa") else {})}
    names = [spec.name for spec in specs]
    rows = pd.DataFrame({"name": names, "feature": "", "detector": names, "n_params": 0, "feature_dim": 0,
                         "weights_kind": ENSEMBLE_FAMILY, "family": ENSEMBLE_FAMILY})
    rows = rows[[c for c in candidates.columns if c in rows.columns]]
    return EnsembleResult(rows, aurocs["real"], aurocs["per_class"], aurocs["synthetic"], extended, skips,
                          {"rule": EXCLUSION_RULE, "ensembles": config, "not_built": not_built})


def with_ensembles(cube: AurocCube, scores: ScoreCube, *, normalisation: str = "rank",
                   selection: dict | None = None) -> AurocCube:
    """``cube`` with the ensembles of :func:`ensemble_candidates` appended as candidates (family
    :data:`ENSEMBLE_FAMILY`): their AUROCs, their exclusion skips in ``skips``, their members,
    weights and the rule in ``config["ensembles"]``, and ``scores`` (the score cube with their
    scores) as ``cube.scores``. The cube unchanged (with ``scores``) when there is no ensemble; an
    ensemble with no eligible member on any task is not built and is listed in
    ``config["ensembles"]["not_built"]`` with the reason."""
    hardest = tuple(int(n) for n in cube.config.get("hardest", (10, 5)))
    result = ensemble_candidates(scores, cube.candidates, hardest=hardest, normalisation=normalisation, selection=selection)
    if result is None or len(result.candidates) == 0:
        out = cube.with_candidates(cube.candidates.iloc[:0], np.zeros(cube.real.shape[:1] + (0, 2)),
                                   np.zeros(cube.synthetic.shape[:1] + (0,) + cube.synthetic.shape[2:]),
                                   np.zeros(cube.per_class.shape[:1] + (0,) + cube.per_class.shape[2:]), scores=scores)
        if result is not None:  # every ensemble lacked eligible members: say so in the cube
            out.config = {**cube.config, "ensembles": result.config}
        return out
    if list(cube.sources) != scores.sources + [hard_source_name(s, n) for s in scores.sources for n in hardest]:
        raise ValueError(f"the cube's sources {cube.sources} are not the score cube's base sources with hardest {hardest}")
    skips = pd.DataFrame(result.skips, columns=SKIP_COLUMNS)
    out = cube.with_candidates(result.candidates, result.real, result.synthetic, result.per_class, scores=result.scores,
                               skips=skips)
    out.config = {**cube.config, "ensembles": result.config}
    return out
