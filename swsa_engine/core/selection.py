"""Selection strategies and their evaluation over an AUROC cube: Table 1, its default rows and the
per-task picks; every public name of the selection modules is importable from here.

A strategy is one small function: it gets a :class:`SelectionContext` (the synthetic AUROCs of
every task and candidate, the candidates' metadata) and returns, per task, either the index of
the candidate it picks ``(T,)`` or a probability distribution over candidates ``(T, C)`` (a
random strategy is its expectation, so results are exact and need no seed). Register one with
``@register_strategy("name")``; the factory takes the strategy's settings as keywords::

    @register_strategy("median_synthetic")
    def median_synthetic(**_):
        return lambda ctx: np.nanmedian(ctx.synthetic_base, axis=2).argmax(axis=1)

Only strategies marked ``uses_labels`` (the oracle) may read ``ctx.real``; the others are given NaN
there and run once per dataset for both settings (:func:`setting_weights`). A strategy registered
with ``default_label="..."`` (and no required settings) is one of :func:`default_strategies`'
rows, so Table 1 and the strategies comparison show it with no further change.

The modules behind it: :mod:`~swsa_engine.core.selection_registry` (the registry, the context, how
picks are scored), :mod:`~swsa_engine.core.strategies_builtin` (SWSA, largest, random, fixed,
oracle, the recommendation) and :mod:`~swsa_engine.core.strategies_baselines` (model centrality,
EM/MV, robust rank aggregation, trimmed Borda).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.detectors import DEFAULT_DETECTOR
from swsa_engine.core.em_mv import em_mv_criteria
from swsa_engine.core.ranking import VERDICTS, ranking_table
from swsa_engine.core.selection_registry import (
    DEFAULT_LABELS, FIRST_STRATEGIES, STRATEGIES, SelectionContext, argmax_weights, as_weights, base_sources,
    create_strategy, evaluate_weights, list_strategies, register_strategy, restrict, selection_context, setting_reals,
    setting_weights, single_candidates, strategy_weights, uses_labels, reads_synthetic,
)
from swsa_engine.core.strategies_baselines import (
    CRITERION_STRATEGIES, NO_SCORES, MissingScoresWarning, centrality, criterion_strategy, model_centrality,
    robust_rank_aggregation_pick, trimmed_borda_pick,
)
from swsa_engine.core.strategies_builtin import (
    RecommendationFallbackWarning, fixed_candidate, largest_model, oracle, random_pick, recommendation, recommended,
    swsa, swsa_mean, swsa_rank,
)

__all__ = [
    # registry, context and evaluation (selection_registry)
    "STRATEGIES", "DEFAULT_LABELS", "FIRST_STRATEGIES", "SelectionContext", "register_strategy", "create_strategy",
    "list_strategies", "uses_labels", "reads_synthetic", "argmax_weights", "single_candidates", "restrict", "as_weights",
    "evaluate_weights", "base_sources", "selection_context", "setting_reals", "strategy_weights", "setting_weights",
    # built-in strategies (strategies_builtin)
    "swsa", "largest_model", "random_pick", "fixed_candidate", "oracle", "swsa_mean", "swsa_rank", "recommendation",
    "RecommendationFallbackWarning", "recommended",
    # label-free baselines (strategies_baselines)
    "MissingScoresWarning", "NO_SCORES", "centrality", "model_centrality", "CRITERION_STRATEGIES",
    "criterion_strategy", "robust_rank_aggregation_pick", "trimmed_borda_pick",
    # Table 2 (ranking), re-exported
    "VERDICTS", "ranking_table",
    # the tables over a cube (here)
    "DatasetPicks", "dataset_picks", "default_strategies", "detector_strategies", "selection_table",
    "selection_table_of", "per_task_picks",
]


def default_strategies(cube: AurocCube) -> list[tuple[str, str, dict]]:
    """Table 1's rows (and the strategies comparison's): (label, strategy name, settings) — first
    the strategies registered with ``first=True`` (the recommendation), then the largest model, the random pick, SWSA per base source and aggregated, every strategy
    registered with a ``default_label``, the oracle, and :func:`detector_strategies`."""
    detector_rows = detector_strategies(cube)
    # with a detector grid, "largest" shares its pick among every detector on the largest backbone
    largest = "Largest backbone, all detectors averaged" if detector_rows else "Largest model"
    rows = [(largest, "largest", {}), ("Random (expected)", "random", {})]
    base = base_sources(cube)
    rows += [(f"SWSA ({source})", "swsa", {"source": source}) for source in base]
    if len(base) > 1:
        rows += [("SWSA (mean of sources)", "swsa_mean", {}), ("SWSA (rank aggregation)", "swsa_rank", {})]
    rows = [(DEFAULT_LABELS[name], name, {}) for name in FIRST_STRATEGIES] + rows
    listed = {name for _, name, _ in rows} | {"oracle"}
    rows += [(label, name, {}) for name, label in DEFAULT_LABELS.items() if name not in listed]
    criteria = em_mv_criteria(cube.config, cube.tasks["task_id"], cube.candidate_names)  # em, mv: when computed
    rows += [(CRITERION_STRATEGIES[name][0], name, {}) for name in criteria]
    rows += [(name, "fixed", {"candidate": name}) for name in
             cube.candidates.loc[~single_candidates(cube.candidates), "name"] if str(name).startswith("ensemble(")]
    rows.append(("Best model (oracle)", "oracle", {}))
    rows += detector_rows
    return rows


def detector_strategies(cube: AurocCube) -> list[tuple[str, str, dict]]:
    """Table 1's detector-selection rows, when the cube's candidates span several detectors: SWSA
    over the paper's backbone-only grid (the default detector, kNN k = 3), the default detector
    on the largest model, and the best backbone-only candidate (oracle). The full-grid rows are
    the usual ones ("SWSA (source)", "Largest backbone, all detectors averaged", "Best model (oracle)")."""
    if "detector" not in cube.candidates:
        return []
    labels = set(cube.candidates.loc[single_candidates(cube.candidates), "detector"]) - {"imported"}
    default = DEFAULT_DETECTOR.label
    if len(labels) < 2 or default not in labels:
        return []
    base = base_sources(cube)
    only = {"detectors": [default]}
    rows = [(f"SWSA ({source}), backbone-only grid", "swsa", {"source": source, **only}) for source in base]
    rows += [(f"Largest backbone with detector {default}", "largest", only),
             ("Best backbone-only candidate (oracle)", "oracle", only)]
    return rows


@dataclass(frozen=True)
class DatasetPicks:
    """The strategies' picks on one dataset's T tasks in every setting.

    dataset : the dataset's name
    rows : (T,) the tasks' rows in the cube
    reals : per setting of :data:`~swsa_engine.core.cube.SETTINGS`, the (T, C) real AUROCs
    weights : ``[setting][strategy]`` (T, C) weights (:func:`setting_weights`: a label-free
        strategy's array is shared by the settings)
    single : (C,) bool, the single candidates (the pool the best is taken over)
    """

    dataset: str
    rows: np.ndarray
    reals: list[np.ndarray]
    weights: list[list[np.ndarray]]
    single: np.ndarray


def dataset_picks(cube: AurocCube, strategies: list[tuple[str, str, dict]]) -> list[DatasetPicks]:
    """Every strategy's picks per dataset (sorted by name) and setting: each label-free strategy
    runs once per dataset, the label-using ones once per dataset and setting."""
    out = []
    for dataset in sorted(cube.tasks["dataset"].unique()):
        rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset)
        ctx = selection_context(cube, rows, 0)
        reals = setting_reals(cube, rows)
        out.append(DatasetPicks(dataset, rows, reals, setting_weights(ctx, reals, strategies), ctx.single))
    return out


def selection_table_of(picks: list[DatasetPicks], labels: list[str]) -> pd.DataFrame:
    """Table 1 (the columns of :func:`selection_table`) from :func:`dataset_picks`' ``picks``;
    ``labels``: the strategies' row labels, in their order."""
    records = []
    for block in picks:
        for s, setting in enumerate(SETTINGS):
            for label, weights in zip(labels, block.weights[s]):
                outcome = evaluate_weights(weights, block.reals[s], block.single)
                defined = ~np.isnan(outcome["hit"])
                n = int(defined.sum())
                records.append({
                    "dataset": block.dataset, "setting": setting, "strategy": label,
                    "picks": float(np.sum(outcome["hit"][defined])), "tasks": n,
                    "pick_rate": float(np.mean(outcome["hit"][defined])) if n else np.nan,
                    "auroc": float(np.mean(outcome["auroc"][defined])) if n else np.nan,
                    "best": float(np.mean(outcome["best"][defined])) if n else np.nan,
                })
    return pd.DataFrame(records)


def selection_table(cube: AurocCube, strategies: list[tuple[str, str, dict]] | None = None) -> pd.DataFrame:
    """The paper's Table 1 over every dataset × setting × strategy.

    Columns: dataset, setting, strategy, picks (expected number of tasks where the pick is a
    best candidate), tasks (tasks evaluated), pick_rate, auroc (mean real AUROC of the pick),
    best (mean best possible real AUROC).
    """
    strategies = strategies or default_strategies(cube)
    return selection_table_of(dataset_picks(cube, strategies), [label for label, _, _ in strategies])


def per_task_picks(cube: AurocCube, source: str | None = None) -> pd.DataFrame:
    """One row per task and setting: SWSA's pick on ``source``, the oracle's pick and their real AUROCs
    — among the single candidates, as the strategies choose (an ensemble is a row of its own)."""
    base = base_sources(cube)
    source = source or (base[0] if base else None)
    names = np.array(cube.candidate_names)
    closest = cube.closest_class()
    single = single_candidates(cube.candidates)[None, :]
    records = []
    for s, setting in enumerate(SETTINGS):
        real = np.where(single, cube.real[:, :, s], np.nan)
        synth = (np.where(single, cube.synthetic[:, :, cube.sources.index(source)], np.nan) if source
                 else np.full(real.shape, np.nan))
        safe = lambda a: np.where(np.isnan(a), -np.inf, a)  # noqa: E731
        pick = safe(synth).argmax(axis=1)
        best = safe(real).argmax(axis=1)
        for t in range(len(cube.tasks)):
            records.append({
                "task_id": int(cube.tasks["task_id"].iloc[t]), "dataset": cube.tasks["dataset"].iloc[t],
                "normal_class": cube.tasks["normal_class"].iloc[t], "setting": setting, "source": source,
                "swsa_pick": names[pick[t]], "swsa_pick_synthetic_auroc": synth[t, pick[t]],
                "swsa_pick_real_auroc": real[t, pick[t]], "oracle_pick": names[best[t]],
                "oracle_real_auroc": real[t, best[t]], "hit": bool(real[t, pick[t]] == real[t, best[t]]),
                "closest_class_of_pick": closest[t, pick[t]] if setting == "one-vs-closest" else "",
            })
    return pd.DataFrame(records)
