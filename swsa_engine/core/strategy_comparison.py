"""The strategies comparison: every selection strategy × setting side by side, with bootstrap
intervals over tasks (``strategies.csv`` and its section of the report).

For each strategy (every row of :func:`~swsa_engine.core.selection.default_strategies`, or the
rows given) and each setting of :data:`~swsa_engine.core.cube.SETTINGS`, over the tasks where
the pick is defined:

* ``mean_real_auroc``: the mean real AUROC of the pick;
* ``mean_regret``: the mean of (best real AUROC among the candidates − real AUROC of the pick),
  per task; 0 for the oracle;
* ``pick_rate``: the share of tasks where the pick is a best candidate (ties with the best count);
* each with a percentile bootstrap interval (:data:`CI_LEVEL`, 95 %) over tasks:
  :data:`BOOTSTRAP_RESAMPLES` resamples of the tasks with replacement, drawn by
  :func:`bootstrap_indices` from ``numpy.random.default_rng(seed)`` (seed :data:`BOOTSTRAP_SEED`);
  every row uses the same seed, so strategies with the same tasks are resampled alike (paired);
* ``n_tasks``: the number of tasks evaluated.

A strategy that returns weights (the random pick) is scored by its expectation: the mean over
its weights of the real AUROC, regret and hit of each candidate — not by one random draw.

With several datasets there is one block of rows per dataset and one more, ``dataset = "all"``,
over the tasks of every dataset together. Pure arrays and DataFrames: no I/O.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.selection import DatasetPicks, dataset_picks, default_strategies, evaluate_weights, selection_table_of

__all__ = [
    "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "CI_LEVEL", "COMPARISON_COLUMNS", "ALL_DATASETS",
    "bootstrap_indices", "bootstrap_ci", "compare_weights", "strategies_table", "strategies_table_of",
    "selection_tables",
]

#: number of bootstrap resamples of the tasks behind each interval
BOOTSTRAP_RESAMPLES = 2000
#: the seed of ``numpy.random.default_rng`` that draws them
BOOTSTRAP_SEED = 0
#: the intervals' coverage (percentile interval: the 2.5th and 97.5th percentiles of the resampled means)
CI_LEVEL = 0.95
#: the ``dataset`` of the rows pooling every dataset's tasks (only when there are several datasets)
ALL_DATASETS = "all"
#: the columns of :func:`strategies_table`
COMPARISON_COLUMNS = [
    "dataset", "strategy", "setting", "n_tasks", "mean_real_auroc", "ci_low", "ci_high",
    "mean_regret", "regret_ci_low", "regret_ci_high", "pick_rate", "pick_rate_ci_low", "pick_rate_ci_high",
]
#: the three measures, in the order of :func:`compare_weights`' outputs, and their column names
_MEASURES = (("mean_real_auroc", "ci_low", "ci_high"), ("mean_regret", "regret_ci_low", "regret_ci_high"),
             ("pick_rate", "pick_rate_ci_low", "pick_rate_ci_high"))


def bootstrap_indices(n_tasks: int, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(n_resamples, n_tasks) task indices, each row a resample with replacement:
    ``numpy.random.default_rng(seed).integers(0, n_tasks, size=(n_resamples, n_tasks))``."""
    if n_resamples < 1:
        raise ValueError(f"the bootstrap needs at least one resample, got n_resamples={n_resamples}")
    return np.random.default_rng(seed).integers(0, n_tasks, size=(n_resamples, n_tasks))


def bootstrap_ci(values: np.ndarray, indices: np.ndarray, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean of each row of ``values`` (M, n), over the
    resamples ``indices`` (B, n): the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
    (``numpy.quantile``, linear interpolation) of the B resampled means. Returns (low, high), (M,) each."""
    if not 0 < level < 1:
        raise ValueError(f"the interval's level must be between 0 and 1, got {level}")
    values = np.asarray(values, dtype=np.float64)
    means = values[:, indices].mean(axis=2)  # (M, B)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return low, high


def compare_weights(weights: np.ndarray, real: np.ndarray, *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL, pool: np.ndarray | None = None) -> pd.DataFrame:
    """The comparison's numbers for K strategies on the same tasks.

    Parameters
    ----------
    weights : (K, T, C) each strategy's pick per task as weights over the C candidates (one 1
        for a single pick; ties or a random pick spread it); NaN where a strategy has no pick
    real : (T, C) the candidates' real AUROC; a task with a NaN candidate is left out
    pool : (C,) bool, the candidates the best (and so the regret) is taken over (default all;
        the strategies table passes the single candidates, so an ensemble's regret can be negative)

    Returns
    -------
    DataFrame with K rows: ``n_tasks`` and the mean and interval of the real AUROC of the pick,
    the regret and the pick rate (the columns of :data:`COMPARISON_COLUMNS` from ``n_tasks`` on);
    NaN where a strategy has no defined task.
    """
    weights = np.asarray(weights, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    if weights.ndim != 3 or weights.shape[1:] != real.shape:
        raise ValueError(f"weights must be (K, T, C) with (T, C) = real's shape {real.shape}, got {weights.shape}")
    records = []
    for one in weights:
        outcome = evaluate_weights(one, real, pool)
        defined = ~np.isnan(outcome["hit"])
        values = np.stack([outcome["auroc"], outcome["best"] - outcome["auroc"], outcome["hit"]])[:, defined]
        n = int(defined.sum())
        record = {"n_tasks": n}
        if n:
            low, high = bootstrap_ci(values, bootstrap_indices(n, n_resamples, seed), level)
        means = values.mean(axis=1) if n else np.full(3, np.nan)
        for m, (mean_col, low_col, high_col) in enumerate(_MEASURES):
            record[mean_col] = float(means[m])
            record[low_col] = float(low[m]) if n else np.nan
            record[high_col] = float(high[m]) if n else np.nan
        records.append(record)
    return pd.DataFrame(records, columns=COMPARISON_COLUMNS[3:])


def strategies_table(cube: AurocCube, strategies: list[tuple[str, str, dict]] | None = None, *,
                     n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = CI_LEVEL) -> pd.DataFrame:
    """The strategies comparison of ``cube`` (columns :data:`COMPARISON_COLUMNS`): per dataset
    (and :data:`ALL_DATASETS` when there are several), strategy and setting. ``strategies``:
    (label, strategy name, settings) rows, default :func:`default_strategies`."""
    strategies = strategies or default_strategies(cube)
    return strategies_table_of(dataset_picks(cube, strategies), [label for label, _, _ in strategies],
                               n_resamples=n_resamples, seed=seed, level=level)


def selection_tables(cube: AurocCube, strategies: list[tuple[str, str, dict]] | None = None, *,
                     n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = CI_LEVEL) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 1 (:func:`~swsa_engine.core.selection.selection_table`) and the strategies comparison
    (:func:`strategies_table`) of ``cube``, from one run of the strategies: equal to calling both,
    at the cost of one."""
    strategies = strategies or default_strategies(cube)
    picks, labels = dataset_picks(cube, strategies), [label for label, _, _ in strategies]
    return (selection_table_of(picks, labels),
            strategies_table_of(picks, labels, n_resamples=n_resamples, seed=seed, level=level))


def strategies_table_of(picks: list[DatasetPicks], labels: list[str], *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL) -> pd.DataFrame:
    """The strategies comparison (columns :data:`COMPARISON_COLUMNS`) from
    :func:`~swsa_engine.core.selection.dataset_picks`' ``picks`` (datasets sorted by name);
    ``labels``: the strategies' row labels, in their order."""
    datasets = [block.dataset for block in picks]
    pool = picks[0].single if picks else None  # the single candidates: the same for every dataset
    parts = []
    for s, setting in enumerate(SETTINGS):
        blocks = [(block.dataset, np.stack(block.weights[s]), block.reals[s]) for block in picks]
        if len(blocks) > 1:
            blocks.append((ALL_DATASETS, np.concatenate([b[1] for b in blocks], axis=1),
                           np.concatenate([b[2] for b in blocks], axis=0)))
        for dataset, weights, real in blocks:
            numbers = compare_weights(weights, real, n_resamples=n_resamples, seed=seed, level=level, pool=pool)
            numbers.insert(0, "dataset", dataset)
            numbers.insert(1, "strategy", labels)
            numbers.insert(2, "setting", setting)
            parts.append(numbers)
    table = pd.concat(parts, ignore_index=True)[COMPARISON_COLUMNS]
    order = {d: i for i, d in enumerate([*datasets, ALL_DATASETS])}
    table = table.sort_values(["dataset", "setting"], key=lambda c: c.map(order) if c.name == "dataset" else
                              c.map({x: i for i, x in enumerate(SETTINGS)}), kind="stable")
    return table.reset_index(drop=True)
