"""How much to trust a pick, without labels: resample probability, source agreement and margin.

For every strategy that chooses from the synthetic validation set alone (:data:`SYNTHETIC_STRATEGIES`:
SWSA per source, the mean, the rank aggregation and the robust rank aggregation of the sources) and
every task, three label-free
measures of the pick's stability:

* **resample probability** — the share of :data:`DEFAULT_RESAMPLES` bootstrap resamples of the
  task's synthetic validation set in which the strategy picks the same candidate again. A resample
  draws, with replacement, as many held-out normals as the task has and, for every base source, as
  many of that source's anomalies as it has (:func:`resample_positions`, seeded with
  :data:`DEFAULT_SEED`); the same draws serve every candidate and every strategy. Each candidate's
  synthetic AUROCs are recomputed from its per-image scores on the resample
  (:func:`resampled_aurocs`, batched over tasks × candidates × resamples) and the strategy is
  re-run on them. A candidate's *resample frequency* is the mean of its pick weight over the
  resamples (tied candidates share a pick, :func:`~swsa_engine.core.selection.argmax_weights`), and
  the pick's resample probability is ``Σ_c w_c · frequency_c`` with ``w`` the pick's own weights:
  the chance that the original pick and a resample's pick, each drawn by the tie rule, coincide.
  Two identical candidates that tie for the pick thus get 0.5 each; a candidate that beats every
  other on every image gets 1.
* **source agreement** — the share of the *other* base sources (for SWSA on one source; every base
  source for the aggregates) whose own SWSA pick (same ``detectors`` restriction) is the same
  candidate, ties split alike. NaN with no other source.
* **margin** — the pick's validation AUROC minus the runner-up's: the source's synthetic AUROC for
  SWSA on one source, the mean over the base sources for the aggregates; the runner-up is the
  strategy's pick with the pick removed. 0 when the pick is a tie; it can be negative for the
  rank aggregation, whose runner-up by rank may have the higher mean AUROC.

:func:`confidence_table` puts them beside each pick with its real AUROC and regret per setting, and
:func:`distrust_table` asks whether low confidence goes with high regret (Spearman's rank
correlation over task × strategy picks, ``scipy.stats.spearmanr``). Pure arrays: no I/O.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.selection import (SelectionContext, as_weights, create_strategy, evaluate_weights, restrict,
                                        single_candidates)
from swsa_engine.core.synthetic_resampling import (DEFAULT_RESAMPLES, DEFAULT_SEED, part_aurocs_finite,
                                                   resample_positions, resampled_aurocs)
from swsa_engine.core.validation import as_real_array

__all__ = [
    "DEFAULT_RESAMPLES", "DEFAULT_SEED", "SYNTHETIC_STRATEGIES", "MATCH_TOLERANCE", "CONFIDENCE_COLUMNS",
    "DISTRUST_MEASURES", "PickConfidence", "resample_positions", "part_aurocs_finite", "resampled_aurocs",
    "pick_confidence", "confidence_table", "distrust_table",
]

#: the strategies that choose from the synthetic AUROCs alone, so their picks can be resampled
SYNTHETIC_STRATEGIES = ("swsa", "swsa_mean", "swsa_rank", "rra")
#: recomputed full-sample synthetic AUROCs must equal the cube's within this
MATCH_TOLERANCE = 1e-9
#: the columns of :func:`confidence_table`
CONFIDENCE_COLUMNS = ["task_id", "dataset", "normal_class", "setting", "strategy", "pick",
                      "pick_resample_probability", "pick_source_agreement", "pick_margin",
                      "pick_real_auroc", "best_real_auroc", "regret"]
#: the confidence measures :func:`distrust_table` correlates with the regret
DISTRUST_MEASURES = ("pick_resample_probability", "pick_source_agreement", "pick_margin")


@dataclass
class PickConfidence:
    """Label-free confidence of the picks of S strategies over T tasks and C candidates.

    labels : the S strategies' row labels; weights : (S, T, C) their picks (ties share);
    resample_frequency : (S, T, C) each candidate's mean pick weight over the resamples;
    source_frequency : (S, T, C) the share of the other sources whose own pick is the candidate;
    resample_probability, source_agreement, margin : (S, T) of the pick (see the module);
    skipped : label → reason for the strategies given that could not be resampled.
    """

    labels: list[str]
    weights: np.ndarray
    resample_frequency: np.ndarray
    source_frequency: np.ndarray
    resample_probability: np.ndarray
    source_agreement: np.ndarray
    margin: np.ndarray
    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    skipped: dict[str, str] = field(default_factory=dict)


def _validation_auroc(ctx: SelectionContext, name: str, settings: dict) -> np.ndarray:
    """(T, C) the AUROC a strategy's margin is measured in: the source's for SWSA on one source,
    the mean over the base sources otherwise."""
    if name == "swsa":
        return restrict(ctx, ctx.source(settings["source"]), settings.get("detectors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a candidate with no defined source: NaN
        return restrict(ctx, np.nanmean(ctx.synthetic_base, axis=2), settings.get("detectors"))


def _weights(ctx: SelectionContext, name: str, settings: dict) -> np.ndarray:
    return as_weights(create_strategy(name, **settings)(ctx), len(ctx.candidates))


def _margin(ctx: SelectionContext, name: str, settings: dict, weights: np.ndarray) -> np.ndarray:
    """(T,) the pick's validation AUROC minus the runner-up's (0 on a tied pick)."""
    criterion = _validation_auroc(ctx, name, settings)
    defined = ~np.isnan(weights).any(axis=1)
    tied = defined & ((weights > 0).sum(axis=1) > 1)
    pick = np.where(defined, np.nan_to_num(weights).argmax(axis=1), 0)
    without = ctx.synthetic.copy()
    without[np.arange(len(pick)), pick, :] = np.nan
    runner = _weights(replace(ctx, synthetic=without), name, settings)
    with np.errstate(invalid="ignore"):
        runner_value = np.nansum(runner * np.nan_to_num(criterion), axis=1)
    margin = criterion[np.arange(len(pick)), pick] - runner_value
    margin[np.isnan(runner).any(axis=1)] = np.nan
    margin[tied] = 0.0
    margin[~defined] = np.nan
    return margin


def _source_frequency(ctx: SelectionContext, name: str, settings: dict) -> np.ndarray:
    """(T, C) the share of the other base sources whose own SWSA pick is each candidate."""
    others = [s for s in ctx.base_sources if not (name == "swsa" and s == settings["source"])]
    picks = [_weights(ctx, "swsa", {"source": s, "detectors": settings.get("detectors")}) for s in others]
    if not picks:
        return np.full(ctx.synthetic.shape[:2], np.nan)
    stacked = np.stack(picks)
    defined = ~np.isnan(stacked).any(axis=2, keepdims=True)
    count = defined.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(defined, stacked, 0.0).sum(axis=0) / count, np.nan)


def _resample_frequency(ctx: SelectionContext, resampled: np.ndarray, name: str, settings: dict) -> np.ndarray:
    """(T, C) each candidate's mean pick weight over the resamples ((T, C, B, V) AUROCs)."""
    n_tasks, n_candidates, n_resamples, n_sources = resampled.shape
    flat = resampled.transpose(0, 2, 1, 3).reshape(n_tasks * n_resamples, n_candidates, n_sources)
    stacked = replace(ctx, synthetic=flat, real=np.full((len(flat), n_candidates), np.nan))
    weights = _weights(stacked, name, settings).reshape(n_tasks, n_resamples, n_candidates)
    defined = ~np.isnan(weights).any(axis=2, keepdims=True)
    count = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(defined, weights, 0.0).sum(axis=1) / count, np.nan)


def _base_context(ctx: SelectionContext, sources: list[str], full: np.ndarray) -> SelectionContext:
    """``ctx`` with its synthetic AUROCs replaced by the base sources' ``full`` (T, C, V), checked
    against the cube's: equal where both are defined; NaN where the cube left a cell out."""
    if tuple(sources) != tuple(ctx.base_sources):
        raise ValueError(f"the per-image scores' sources {list(sources)} differ from the cube's base sources "
                         f"{list(ctx.base_sources)}; re-run `swsa score`")
    cube_base = ctx.synthetic_base
    if cube_base.shape != full.shape:
        raise ValueError(f"the per-image scores give {full.shape} (tasks, candidates, sources) AUROCs, the cube "
                         f"{cube_base.shape}; re-run `swsa score`")
    differ = np.isfinite(cube_base) & ~(np.abs(full - cube_base) <= MATCH_TOLERANCE)
    if differ.any():
        t, c, v = np.argwhere(differ)[0]
        raise ValueError(f"the per-image scores do not reproduce the cube's synthetic AUROCs ({int(differ.sum())} "
                         f"cells differ; first: task row {t}, candidate {c}, source {sources[v]!r}: {full[t, c, v]} vs "
                         f"{cube_base[t, c, v]}); they are from another run: re-run `swsa score`")
    return replace(ctx, synthetic=cube_base.copy(), sources=tuple(sources), base_sources=tuple(sources))


def pick_confidence(ctx: SelectionContext, synthetic_scores, synthetic_part, sources: list[str],
                    strategies: list[tuple[str, str, dict]], *, n_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = DEFAULT_SEED) -> PickConfidence:
    """The label-free confidence of every pick of ``strategies`` (rows (label, name, settings) as
    :func:`~swsa_engine.core.selection.default_strategies` gives; those not in
    :data:`SYNTHETIC_STRATEGIES` are left out, those on a source without per-image scores are
    recorded in ``skipped``). ``ctx``: the cube's selection context of the T tasks;
    ``synthetic_scores`` (T, C, W) and ``synthetic_part`` (T, W) the per-image synthetic scores of
    the ``sources`` (the cube's base sources, in order), as the ScoreCube holds them."""
    n_sources = len(sources)
    if n_sources == 0:
        raise ValueError("pick confidence needs at least one synthetic source; the per-image scores have none")
    scores = as_real_array(synthetic_scores, "synthetic_scores", ndim=3, shape_doc="(T, C, W)")
    if scores.shape[:2] != ctx.synthetic.shape[:2]:
        raise ValueError(f"synthetic_scores has {scores.shape[:2]} (tasks, candidates), the cube "
                         f"{ctx.synthetic.shape[:2]}; re-run `swsa score`")
    base = _base_context(ctx, sources, part_aurocs_finite(scores, synthetic_part, n_sources))
    resampled = resampled_aurocs(scores, synthetic_part, n_sources, n_resamples, seed)
    resampled[np.broadcast_to(np.isnan(base.synthetic)[:, :, None, :], resampled.shape)] = np.nan
    labels, skipped, per_strategy = [], {}, []
    for label, name, settings in strategies:
        if name not in SYNTHETIC_STRATEGIES:
            continue
        if name == "swsa" and settings.get("source") not in sources:
            skipped[label] = (f"source {settings.get('source')!r} has no per-image scores (only the base sources "
                              f"{', '.join(sources)} are kept)")
            continue
        weights = _weights(base, name, settings)
        frequency = _resample_frequency(base, resampled, name, settings)
        by_source = _source_frequency(base, name, settings)
        labels.append(label)
        per_strategy.append((weights, frequency, by_source, _margin(base, name, settings, weights)))
    n_tasks, n_candidates = base.synthetic.shape[:2]
    weights, frequency, by_source, margin = (
        [np.stack(arrays) for arrays in zip(*per_strategy)] if per_strategy else
        [np.zeros((0, n_tasks, n_candidates))] * 3 + [np.zeros((0, n_tasks))])
    with np.errstate(invalid="ignore"):
        return PickConfidence(labels, weights, frequency, by_source, (weights * frequency).sum(axis=2),
                              (weights * by_source).sum(axis=2), margin, n_resamples, seed, skipped)


def _pick_names(weights: np.ndarray, names: np.ndarray) -> list[str]:
    """Each task's pick as a name ("a | b" for a tie, "" when undefined)."""
    return ["" if np.isnan(row).any() else " | ".join(names[row > 0]) for row in weights]


def confidence_table(cube: AurocCube, confidence: PickConfidence) -> pd.DataFrame:
    """One row per task × setting × strategy of ``confidence`` (:data:`CONFIDENCE_COLUMNS`): the
    pick, its three confidence measures, its real AUROC, the best real AUROC and the regret
    (best single candidate − pick; NaN where a real AUROC is undefined, as in the strategies table)."""
    names = np.array(cube.candidate_names)
    pool = single_candidates(cube.candidates)
    records = []
    for s, setting in enumerate(SETTINGS):
        real = cube.real[:, :, s]
        for i, label in enumerate(confidence.labels):
            outcome = evaluate_weights(confidence.weights[i], real, pool)
            picks = _pick_names(confidence.weights[i], names)
            records.append(pd.DataFrame({
                "task_id": cube.tasks["task_id"].to_numpy(), "dataset": cube.tasks["dataset"].to_numpy(),
                "normal_class": cube.tasks["normal_class"].to_numpy(), "setting": setting, "strategy": label,
                "pick": picks, "pick_resample_probability": confidence.resample_probability[i],
                "pick_source_agreement": confidence.source_agreement[i], "pick_margin": confidence.margin[i],
                "pick_real_auroc": outcome["auroc"], "best_real_auroc": outcome["best"],
                "regret": outcome["best"] - outcome["auroc"],
            }))
    return pd.concat(records, ignore_index=True) if records else pd.DataFrame(columns=CONFIDENCE_COLUMNS)


def distrust_table(table: pd.DataFrame, measures: tuple[str, ...] = DISTRUST_MEASURES) -> pd.DataFrame:
    """Does low confidence go with high regret? Per setting and confidence measure: Spearman's rho
    between the measure and the regret over the task × strategy picks of :func:`confidence_table`
    where both are defined (``n`` of them; ``n_tasks`` distinct tasks, ``n_strategies``
    strategies), with ``scipy.stats.spearmanr``'s two-sided p-value. A negative rho means low
    confidence went with high regret. NaN (``note`` says why) below 3 picks or for constant input."""
    records = []
    for setting in SETTINGS:
        rows = table[table["setting"] == setting]
        for measure in measures:
            both = rows[np.isfinite(rows[measure].astype(float)) & np.isfinite(rows["regret"].astype(float))]
            rho, p, note = np.nan, np.nan, ""
            if len(both) < 3:
                note = "fewer than 3 picks with both values"
            elif both[measure].nunique() < 2 or both["regret"].nunique() < 2:
                note = "constant " + (measure if both[measure].nunique() < 2 else "regret")
            else:
                rho, p = spearmanr(both[measure].astype(float), both["regret"].astype(float))
            records.append({"setting": setting, "measure": measure, "n": int(len(both)),
                            "n_tasks": int(both["task_id"].nunique()), "n_strategies": int(both["strategy"].nunique()),
                            "spearman_rho": float(rho), "p_value": float(p), "note": note})
    return pd.DataFrame(records)
