"""One recommendation per task, chosen without labels: the ensemble unless the synthetic sets say otherwise.

The ``recommended`` strategy (:func:`swsa_engine.core.selection.recommended`, label
:data:`RECOMMENDED_LABEL`) chooses, per task, among three detectors — the SWSA single pick (the best
mean synthetic AUROC over the base sources, ``swsa_mean``), ``ensemble(mean)`` (every eligible
candidate's rank-normalised scores averaged) and ``ensemble(selected)`` (Caruana's bagged greedy
weights on the synthetic set) — by this rule (:func:`recommend`):

1. **Default: ``ensemble(mean)``.** Averaging normalised scores of many detectors reduces the
   variance of the result (Aggarwal & Sathe, "Theoretical foundations and algorithms for outlier
   ensembles", SIGKDD Explorations 17(1), 2015); it needs neither labels nor synthetic anomalies.
   A single pick made by an argmax over many candidates on a small synthetic set is optimistically
   biased (the winner's curse): its synthetic AUROC overstates what it will give.
2. **The single pick only when the synthetic sets say so with high probability**: over
   :data:`~swsa_engine.core.synthetic_resampling.DEFAULT_RESAMPLES` bootstrap resamples of the
   task's synthetic validation set (held-out normals and each source's anomalies resampled with
   replacement — the very draws of :mod:`swsa_engine.core.pick_confidence`,
   :func:`~swsa_engine.core.synthetic_resampling.resampled_aurocs`), the single pick's synthetic
   AUROC (mean over the base sources) is strictly higher than ``ensemble(mean)``'s in at least
   :data:`THRESHOLD` (95 %) of them. Tied single picks share: the probability is the
   pick-weighted mean of each tied candidate's share.
3. **``ensemble(selected)`` likewise**: only if it beats ``ensemble(mean)`` in ≥ 95 % of the same
   resamples. When both the single pick and ``ensemble(selected)`` qualify, the one with the higher
   full-sample mean synthetic AUROC; a tie goes to ``ensemble(selected)`` (a combination, lower variance).

The bootstrap measures how much the comparison moves when the synthetic set is redrawn; it keeps the
pick fixed, so it does not remove the pick's selection bias — the demanding 95 % bar is what guards
against it. No real label is read; the threshold was set from this reasoning, not from any result.

Fallbacks, each with its reason in :attr:`Recommendation.reason`: without per-image scores (no
bootstrap possible) ``ensemble(mean)`` when the cube has it, else the single pick; without
``ensemble(mean)`` (not built, or undefined on the task) the single pick; with neither, no pick (NaN).
Pure arrays: no I/O.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from swsa_engine.core.ensemble_pass import SELECTED
from swsa_engine.core.score_cube import ScoreCube
from swsa_engine.core.synthetic_resampling import (DEFAULT_RESAMPLES, DEFAULT_SEED, part_aurocs_finite,
                                                   resampled_aurocs)

__all__ = ["RECOMMENDED", "RECOMMENDED_LABEL", "ENSEMBLE_MEAN", "THRESHOLD", "CHOICES", "MATCH_TOLERANCE",
           "Recommendation", "recommend"]

RECOMMENDED = "recommended"
RECOMMENDED_LABEL = "Recommended (swsa)"
#: the default of the rule
ENSEMBLE_MEAN = "ensemble(mean)"
#: the share of resamples a challenger must win against ensemble(mean)
THRESHOLD = 0.95
#: what a task's recommendation can be ("" when there is none)
CHOICES = ("ensemble(mean)", "single", SELECTED)
#: the per-image scores must give the cube's synthetic AUROCs within this
MATCH_TOLERANCE = 1e-9


@dataclass
class Recommendation:
    """The rule's outcome for T tasks and C candidates: ``weights`` (T, C) (the single pick's ties
    share; NaN rows: no pick), ``choice`` (T,) one of :data:`CHOICES` or "", ``reason`` (T,) why,
    ``p_single`` and ``p_selected`` (T,) the share of resamples in which the single pick /
    ensemble(selected) beat ensemble(mean) (NaN where not computed), and the rule's settings."""

    weights: np.ndarray
    choice: np.ndarray
    reason: np.ndarray
    p_single: np.ndarray
    p_selected: np.ndarray
    threshold: float = THRESHOLD
    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED

    @property
    def fallback(self) -> np.ndarray:
        """(T,) bool: tasks decided without the bootstrap test."""
        return ~np.isfinite(self.p_single) & ~np.isfinite(self.p_selected)


def _checked_scores(scores: ScoreCube, names: list[str], base_sources: tuple, synthetic_base: np.ndarray,
                    index: np.ndarray) -> np.ndarray:
    """(T, K, W) synthetic scores of each task's candidates ``index`` (T, K), checked against the
    cube's AUROCs."""
    if list(scores.candidates) != list(names):
        raise ValueError("the per-image scores list other candidates than the cube; re-run `swsa score`")
    if tuple(scores.sources) != tuple(base_sources):
        raise ValueError(f"the per-image scores' sources {list(scores.sources)} differ from the cube's base sources "
                         f"{list(base_sources)}; re-run `swsa score`")
    rows = np.arange(len(index))[:, None]
    values = scores.synthetic_scores[rows, index]
    full = part_aurocs_finite(values, scores.synthetic_part, len(base_sources))
    cube = synthetic_base[rows, index]
    differ = np.isfinite(cube) & ~(np.abs(full - cube) <= MATCH_TOLERANCE)
    if differ.any():
        t, k, v = np.argwhere(differ)[0]
        raise ValueError(f"the per-image scores do not reproduce the cube's synthetic AUROCs (task row {t}, candidate "
                         f"{names[index[t, k]]!r}, source {base_sources[v]!r}: {full[t, k, v]} vs {cube[t, k, v]}); "
                         "re-run `swsa score`")
    return values


def _beat_shares(scores: ScoreCube, names, base_sources, synthetic_base, index, n_resamples, seed) -> np.ndarray:
    """(T, K) the share of resamples in which each of a task's candidates ``index`` (T, K) beats its
    ``index[:, 0]`` (ensemble(mean)) on the mean synthetic AUROC over the base sources (a cell the
    cube left out stays out). Each task resamples only the few candidates its rule compares."""
    values = _checked_scores(scores, names, base_sources, synthetic_base, index)
    resampled = resampled_aurocs(values, scores.synthetic_part, len(base_sources), n_resamples, seed)  # (T, K, B, V)
    left_out = np.isnan(synthetic_base[np.arange(len(index))[:, None], index])
    resampled[np.broadcast_to(left_out[:, :, None, :], resampled.shape)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a candidate without any defined source: NaN
        mean = np.nanmean(resampled, axis=3)  # (T, K, B)
    return (mean > mean[:, :1]).mean(axis=2)


def _compared(single_weights: np.ndarray, mean_c: int, sel_c: int | None) -> np.ndarray:
    """(T, K): per task, ensemble(mean), ensemble(selected) (when built) and the single pick(s) —
    padded with ensemble(mean), whose share against itself is 0 and whose weight is 0."""
    picks = [np.flatnonzero(row > 0) for row in np.nan_to_num(single_weights)]
    width = max((len(p) for p in picks), default=0)
    head = [mean_c] + ([sel_c] if sel_c is not None else [])
    return np.asarray([head + list(p) + [mean_c] * (width - len(p)) for p in picks], dtype=np.int64).reshape(
        len(picks), len(head) + width)


def _one_hot(n_candidates: int, column: int) -> np.ndarray:
    row = np.zeros(n_candidates)
    row[column] = 1.0
    return row


def recommend(synthetic_base: np.ndarray, single_weights: np.ndarray, names: list[str], base_sources: tuple,
              scores: ScoreCube | None, *, threshold: float = THRESHOLD, n_resamples: int = DEFAULT_RESAMPLES,
              seed: int = DEFAULT_SEED) -> Recommendation:
    """The rule of the module docstring. ``synthetic_base`` (T, C, V) the cube's synthetic AUROCs of
    the base sources ``base_sources``; ``single_weights`` (T, C) the SWSA mean-of-sources pick (NaN
    rows: none); ``names`` the C candidate names; ``scores`` the tasks' per-image scores or None."""
    if not 0 < float(threshold) <= 1:
        raise ValueError(f"the recommendation's threshold must be in (0, 1], got {threshold}")
    n_tasks, n_candidates = single_weights.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        criterion = np.nanmean(synthetic_base, axis=2) if synthetic_base.shape[2] else np.full((n_tasks, n_candidates), np.nan)
    mean_c = names.index(ENSEMBLE_MEAN) if ENSEMBLE_MEAN in names else None
    sel_c = names.index(SELECTED) if SELECTED in names else None
    single_ok = ~np.isnan(single_weights).any(axis=1)
    p_single, p_selected = np.full(n_tasks, np.nan), np.full(n_tasks, np.nan)
    if scores is not None and mean_c is not None:
        index = _compared(single_weights, mean_c, sel_c)
        shares = _beat_shares(scores, names, tuple(base_sources), synthetic_base, index, n_resamples, seed)
        first_pick = 1 if sel_c is None else 2
        picked_weight = np.take_along_axis(np.nan_to_num(single_weights), index[:, first_pick:], axis=1)
        picked_weight[index[:, first_pick:] == mean_c] = 0.0  # padding (a pick of ensemble(mean) is no single pick)
        p_single = np.where(single_ok, (picked_weight * shares[:, first_pick:]).sum(axis=1), np.nan)
        if sel_c is not None:
            p_selected = shares[:, 1]
        no_mean = np.isnan(criterion[:, mean_c])  # nothing to beat: decided by the fallback, no share
        p_single[no_mean], p_selected[no_mean] = np.nan, np.nan
    weights = np.full((n_tasks, n_candidates), np.nan)
    choice, reason = np.full(n_tasks, "", dtype=object), np.full(n_tasks, "", dtype=object)
    single_value = np.nansum(np.nan_to_num(single_weights) * np.nan_to_num(criterion), axis=1)
    for t in range(n_tasks):
        mean_ok = mean_c is not None and np.isfinite(criterion[t, mean_c])
        if not mean_ok:
            why = ("the cube has no ensemble(mean)" if mean_c is None else
                   "ensemble(mean) has no synthetic AUROC on this task (no eligible member)")
            choice[t], reason[t] = ("single", f"fallback: {why}; the SWSA mean-of-sources pick") if single_ok[t] else \
                ("", f"no pick: {why} and no single candidate has a synthetic AUROC")
        elif scores is None:
            choice[t], reason[t] = ENSEMBLE_MEAN, ("fallback: the cube holds no per-image scores, so the bootstrap test "
                                                   "cannot run; the default ensemble(mean)")
        else:
            choice[t], reason[t] = _decide(p_single[t], p_selected[t], single_value[t],
                                           criterion[t, sel_c] if sel_c is not None else np.nan, threshold, n_resamples)
        if choice[t] == "single":
            weights[t] = single_weights[t]
        elif choice[t]:
            weights[t] = _one_hot(n_candidates, mean_c if choice[t] == ENSEMBLE_MEAN else sel_c)
    return Recommendation(weights, choice, reason, p_single, p_selected, float(threshold), int(n_resamples), int(seed))


def _decide(p_single: float, p_selected: float, single_value: float, selected_value: float,
            threshold: float, n_resamples: int) -> tuple[str, str]:
    """A task's choice by the bootstrap shares (steps 1-3 of the module docstring) and its reason."""
    said = (f"the single pick beats ensemble(mean) in {_share(p_single)}, ensemble(selected) in {_share(p_selected)} "
            f"of {n_resamples} resamples of the synthetic set (bar: {threshold:.0%})")
    single = np.isfinite(p_single) and p_single >= threshold
    selected = np.isfinite(p_selected) and p_selected >= threshold
    if single and selected:
        winner = SELECTED if not single_value > selected_value else "single"
        return winner, f"{winner}: {said}; both pass, {winner} has the higher mean synthetic AUROC (a tie: ensemble(selected))"
    if single or selected:
        winner = "single" if single else SELECTED
        return winner, f"{winner}: {said}"
    return ENSEMBLE_MEAN, f"ensemble(mean) (the default): {said}"


def _share(p: float) -> str:
    return f"{p:.1%}" if np.isfinite(p) else "n/a"
