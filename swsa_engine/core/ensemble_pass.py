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
come from their scores by :func:`~swsa_engine.core.score_cube.score_aurocs`, as every single
candidate's would (hardest-N: the anomalies the ensemble scores lowest).

Exclusion rule (:data:`EXCLUSION_RULE`), per task, recorded as skips and in the config, never
silent: a member is left out of a task's ensembles when its weights are random
(``weights_kind == "random"``), when it has no scores on the task, when some of the task's real
images or synthetic queries lack a finite score (self-validation, protocol limits, unusable
images), or when its scores are constant on the real images or on the synthetic queries.
Pure arrays: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from swsa_engine.core.cube import SKIP_COLUMNS, AurocCube, hard_source_name
from swsa_engine.core.ensembles import combine_scores, greedy_ensemble_weights, normalise_scores, shuffled_buckets
from swsa_engine.core.score_cube import ScoreCube, score_aurocs

__all__ = ["ENSEMBLE_FAMILY", "SELECTED", "EXCLUSION_RULE", "EnsembleSpec", "EnsembleResult", "ensemble_specs",
           "eligible_members", "ensemble_candidates", "with_ensembles"]

#: the ``family`` (and ``weights_kind``) of ensemble candidates in a cube's candidates table
ENSEMBLE_FAMILY = "ensemble"
#: the Caruana-selected ensemble's name
SELECTED = "ensemble(selected)"
#: the recorded rule that leaves members out of a task's ensembles
EXCLUSION_RULE = ("a member is left out of a task's ensembles when its weights are random (weights_kind 'random'), "
                  "it has no scores on the task, some of the task's real test images or synthetic validation queries "
                  "lack a finite score, or its scores are constant on either")


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


def _constant(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """(T, C) bool: the candidate's scores (T, C, N) are all equal over the task's ``pool`` (T, N)."""
    high = np.where(pool[:, None, :], values, -np.inf).max(axis=2)
    low = np.where(pool[:, None, :], values, np.inf).min(axis=2)
    return high <= low


def eligible_members(scores: ScoreCube, candidates: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``eligible`` (T, C) bool and ``reason`` (T, C) object ("" where eligible) under :data:`EXCLUSION_RULE`.

    The pools are the task's real test images and synthetic validation queries that some single
    candidate scored (an image no candidate could score is no one's fault)."""
    family = candidates["family"].astype(str).to_numpy() if "family" in candidates else np.full(len(candidates), "")
    single = family != ENSEMBLE_FAMILY
    real_ok, synth_ok = np.isfinite(scores.real_scores), np.isfinite(scores.synthetic_scores)
    real_pool = scores.real_pool & (real_ok & single[None, :, None]).any(axis=1)
    synth_pool = scores.synthetic_pool & (synth_ok & single[None, :, None]).any(axis=1)
    missing_real = (real_pool[:, None, :] & ~real_ok).sum(axis=2)
    missing_synth = (synth_pool[:, None, :] & ~synth_ok).sum(axis=2)
    scored = (real_pool[:, None, :] & real_ok).any(axis=2) | (synth_pool[:, None, :] & synth_ok).any(axis=2)
    constant = _constant(np.nan_to_num(scores.real_scores), real_pool) | _constant(np.nan_to_num(scores.synthetic_scores),
                                                                                  synth_pool)
    random = (candidates["weights_kind"].astype(str).to_numpy() == "random") if "weights_kind" in candidates else ~single
    reason = np.full(missing_real.shape, "", dtype=object)
    rules = [
        (constant, "its scores are constant on the task's real test images or synthetic validation queries"),
        (missing_real > 0, "{r} of the task's real test images have no finite score"),
        (missing_synth > 0, "{s} of the task's synthetic validation queries have no finite score (self-validation, "
                            "protocol limits or unusable images)"),
        (~scored, "it has no scores on the task (skipped there)"),
        (np.broadcast_to(random, reason.shape), "its weights are random (weights_kind 'random')"),
        (np.broadcast_to(~single, reason.shape), "it is an ensemble"),
    ]
    for hit, text in rules:  # the last rule that applies is the reason given
        for t, c in np.argwhere(hit):
            reason[t, c] = text.format(r=int(missing_real[t, c]), s=int(missing_synth[t, c]))
    return reason == "", reason


def _normalised(scores: ScoreCube, eligible: np.ndarray, pools: tuple, normalisation: str) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate's real (T, C, Q) and synthetic (T, C, W) scores normalised over its task's
    pools, once for all ensembles (a member's normalised scores do not depend on the other
    members); NaN off the pools, and meaningless (never read) where a candidate is not eligible."""
    real_pool, parts = pools
    synth_pool = parts >= 0
    real_out = np.empty(scores.real_scores.shape)
    synth_out = np.empty(scores.synthetic_scores.shape)
    # one candidate at a time: the ranking's temporaries stay a C-th of the whole (peak memory)
    for c in range(real_out.shape[1]):
        ok = eligible[:, c, None]
        real_out[:, c] = normalise_scores(np.where(real_pool & ok, scores.real_scores[:, c], 0.0)[:, None], real_pool,
                                          normalisation)[:, 0]
        synth_out[:, c] = normalise_scores(np.where(synth_pool & ok, scores.synthetic_scores[:, c], 0.0)[:, None],
                                           synth_pool, normalisation)[:, 0]
    return real_out, synth_out


def _combine(real_norm: np.ndarray, synth_norm: np.ndarray, real_pool: np.ndarray, parts: np.ndarray, n_sources: int,
             method: str, selection: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One member set's ensemble over tasks: members' normalised ``real_norm`` (T', M, Q) and
    ``synth_norm`` (T', M, W) scores → ensemble scores (T', Q), (T', W) (NaN off the pools) and the
    selected weights (T', M) or None."""
    synth_pool = parts >= 0
    weights = None
    if method == "selected":
        weights = greedy_ensemble_weights(synth_norm, parts, n_sources, **selection)
        method = "mean"
    buckets = shuffled_buckets(real_norm.shape[1], min(5, real_norm.shape[1])) if method in ("aom", "moa") else None
    combined = [combine_scores(np.nan_to_num(values), method, weights=weights, buckets=buckets)
                for values in (real_norm, synth_norm)]
    return np.where(real_pool, combined[0], np.nan), np.where(synth_pool, combined[1], np.nan), weights


def _member_sets(eligible: np.ndarray) -> dict[tuple, np.ndarray]:
    """Tasks grouped by their member set: member indices (tuple) → task rows."""
    sets: dict[tuple, list] = {}
    for t, row in enumerate(eligible):
        sets.setdefault(tuple(np.flatnonzero(row).tolist()), []).append(t)
    return {members: np.asarray(rows) for members, rows in sets.items()}


def _ensemble_scores(scores: ScoreCube, spec: EnsembleSpec, eligible: np.ndarray, pools: tuple, normalised: tuple,
                     selection: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(T, Q) and (T, W) scores of one ensemble (NaN for a task with no member left) and its
    per-task members and weights {task_id: {candidate: weight}}; ``normalised`` from :func:`_normalised`."""
    real_pool, parts = pools
    real_out = np.full(scores.real_ids.shape, np.nan)
    synth_out = np.full(scores.synthetic_ids.shape, np.nan)
    weights_by_task = {}
    in_spec = np.zeros(eligible.shape[1], dtype=bool)
    in_spec[list(spec.members)] = True
    for members, rows in _member_sets(eligible & in_spec).items():
        if not members:
            continue
        index = np.asarray(members)
        real, synth, weights = _combine(normalised[0][rows][:, index], normalised[1][rows][:, index],
                                        real_pool[rows], parts[rows], len(scores.sources), spec.method, selection)
        real_out[rows], synth_out[rows] = real, synth
        w = np.full((len(rows), len(index)), 1.0 / len(index)) if weights is None else weights
        for r, t in enumerate(rows):
            weights_by_task[int(scores.task_ids[t])] = {scores.candidates[c]: round(float(x), 6)
                                                        for c, x in zip(index, w[r]) if x > 0}
    return real_out, synth_out, weights_by_task


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
    eligible, reason = eligible_members(scores, candidates)
    # an ensemble none of whose members is eligible on any task would be an all-NaN row: not built, said so
    not_built = {spec.name: f"not built: no member is eligible on any task ({EXCLUSION_RULE})"
                 for spec in specs if not eligible[:, list(spec.members)].any()}
    specs = [spec for spec in specs if spec.name not in not_built]
    if not specs:
        return EnsembleResult(candidates.iloc[:0], np.zeros((len(scores.task_ids), 0, 2)),
                              np.zeros((len(scores.task_ids), 0, scores.group_names.shape[1])),
                              np.zeros((len(scores.task_ids), 0, len(scores.sources) * (1 + len(hardest)))), scores, [],
                              {"rule": EXCLUSION_RULE, "ensembles": {}, "not_built": not_built})
    single = np.asarray([s for s in range(len(candidates)) if candidates["family"].iloc[s] != ENSEMBLE_FAMILY])
    real_pool = scores.real_pool & np.isfinite(scores.real_scores[:, single]).any(axis=1)
    parts = np.where(np.isfinite(scores.synthetic_scores[:, single]).any(axis=1), scores.synthetic_part, -1)
    real, synth, config, skips = [], [], {}, []
    normalised = _normalised(scores, eligible, (real_pool, parts), normalisation)
    for spec in specs:
        r, s, weights = _ensemble_scores(scores, spec, eligible, (real_pool, parts), normalised, selection)
        real.append(r)
        synth.append(s)
        skips += _skips(scores, spec, eligible, reason)
        config[spec.name] = {"method": spec.method, "normalisation": normalisation,
                             "members": [scores.candidates[c] for c in spec.members], "weights": weights,
                             **({"selection": {"steps": 20, "bags": 10, "fraction": 0.5, "seed": 0, **selection},
                                 "validated_on": "mean synthetic AUROC over the base sources"}
                                if spec.method == "selected" else {}),
                             **({"buckets": "shuffled_buckets(seed=0), up to 5"} if spec.method in ("aom", "moa") else {})}
    names = [spec.name for spec in specs]
    extended = scores.with_candidates(names, np.stack(real, axis=1), np.stack(synth, axis=1))
    aurocs = score_aurocs(extended, hardest, candidates=np.arange(len(scores.candidates), len(extended.candidates)))
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
