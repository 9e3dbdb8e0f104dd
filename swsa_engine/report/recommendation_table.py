"""The recommendation per task, and why: ``recommendation.csv`` and its report section (issue 25).

For every task × setting: what the ``recommended`` strategy chose — ``ensemble(mean)``, the single
SWSA pick (which candidate; tied picks share) or ``ensemble(selected)`` (its members and weights on
the task) — and the numbers of its rule (:mod:`swsa_engine.core.recommendation`): the share of
bootstrap resamples of the task's synthetic validation set in which the single pick and
``ensemble(selected)`` beat ``ensemble(mean)``, the bar, the resamples and their seed, the mean
synthetic AUROCs that break a tie, and whether a fallback decided; then the real AUROC of what was
recommended, the best single candidate's and the regret.

The outcome is :func:`swsa_engine.core.selection.recommendation` on the very contexts Table 1's
"Recommended (swsa)" row is evaluated on (one dataset's tasks at a time,
:func:`~swsa_engine.core.selection.selection_context`), so this table explains the choices that row
scores. The rule reads no real label: its choice is the same in both settings, only the real
columns differ.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.ensemble_pass import SELECTED
from swsa_engine.core.recommendation import ENSEMBLE_MEAN, RECOMMENDED_LABEL, Recommendation
from swsa_engine.core.selection import (as_weights, create_strategy, evaluate_weights, recommendation,
                                        selection_context)
from swsa_engine.report.tables import markdown_table, md_cell

__all__ = ["RECOMMENDATION_COLUMNS", "recommendation_table", "recommendation_lines", "ensemble_normalisation_line"]

RECOMMENDATION_COLUMNS = [
    "task_id", "dataset", "normal_class", "setting", "recommendation", "runs", "members", "member_weights",
    "single_pick", "p_single_beats_mean", "p_selected_beats_mean", "threshold", "n_resamples", "seed",
    "synthetic_single", "synthetic_mean", "synthetic_selected", "decided_by", "real_auroc", "best_single_real_auroc",
    "regret", "reason",
]

#: how each normalisation is described in the report
NORMALISATION_WORDS = {"rank": "mid-ranks scaled to [0, 1] (rank)", "zscore": "z-scores, (score − mean) / std (zscore)"}


def _names(weights: np.ndarray, names: list[str]) -> str:
    """The candidates a weights row picks (tied picks share), " | "-joined; "" for a NaN row."""
    if np.isnan(weights).any():
        return ""
    return " | ".join(names[c] for c in np.flatnonzero(weights > 0))


def _ensemble_weights(config: dict, name: str, task_id: int) -> dict:
    """{member: weight} of ensemble ``name`` on ``task_id`` as the cube's config records it ({} if none)."""
    by_task = config.get("ensembles", {}).get("ensembles", {}).get(name, {}).get("weights", {})
    return by_task.get(str(task_id), by_task.get(task_id, {})) or {}


def _members(config: dict, choice: str, task_id: int) -> tuple[float, str]:
    """An ensemble choice's member count on the task and, for ``ensemble(selected)``, its members'
    weights ("name=w; ...", largest first); (NaN, "") for the single pick."""
    if choice not in (ENSEMBLE_MEAN, SELECTED):
        return np.nan, ""
    weights = _ensemble_weights(config, choice, task_id)
    shown = "; ".join(f"{m}={w:.3g}" for m, w in sorted(weights.items(), key=lambda kv: -kv[1])) if choice == SELECTED else ""
    return float(len(weights)), shown


def _dataset_records(cube: AurocCube, rows: np.ndarray) -> list[dict]:
    """The table's records of the tasks ``rows`` (one dataset), every setting."""
    ctx = selection_context(cube, rows, 0)
    outcome: Recommendation = recommendation(ctx)  # what the "recommended" strategy returns as weights
    names = [str(n) for n in ctx.candidates["name"]]
    single = as_weights(create_strategy("swsa_mean")(ctx), len(names))  # the rule's single challenger
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a candidate with no synthetic AUROC: NaN
        criterion = np.nanmean(ctx.synthetic_base, axis=2)
    # the single pick's mean synthetic AUROC (tied picks: their mean), as the rule compares it
    single_value = np.where(np.isnan(single).any(axis=1), np.nan, (np.nan_to_num(single) * np.nan_to_num(criterion)).sum(axis=1))
    column = {n: c for c, n in enumerate(names)}
    records = []
    for s, setting in enumerate(SETTINGS):
        evaluated = evaluate_weights(outcome.weights, cube.real[rows, :, s], ctx.single)
        for i, t in enumerate(rows):
            task_id = int(cube.tasks["task_id"].iloc[t])
            choice = str(outcome.choice[i])
            members, member_weights = _members(cube.config, choice, task_id)
            records.append({
                "task_id": task_id, "dataset": cube.tasks["dataset"].iloc[t],
                "normal_class": cube.tasks["normal_class"].iloc[t], "setting": setting, "recommendation": choice,
                "runs": _names(outcome.weights[i], names), "members": members, "member_weights": member_weights,
                "single_pick": _names(single[i], names), "p_single_beats_mean": outcome.p_single[i],
                "p_selected_beats_mean": outcome.p_selected[i], "threshold": outcome.threshold,
                "n_resamples": outcome.n_resamples, "seed": outcome.seed,
                "synthetic_single": single_value[i],
                "synthetic_mean": criterion[i, column[ENSEMBLE_MEAN]] if ENSEMBLE_MEAN in column else np.nan,
                "synthetic_selected": criterion[i, column[SELECTED]] if SELECTED in column else np.nan,
                "decided_by": "fallback" if outcome.fallback[i] else "bootstrap",
                "real_auroc": evaluated["auroc"][i], "best_single_real_auroc": evaluated["best"][i],
                "regret": evaluated["best"][i] - evaluated["auroc"][i], "reason": str(outcome.reason[i]),
            })
    return records


def recommendation_table(cube: AurocCube) -> pd.DataFrame:
    """One row per task × setting (:data:`RECOMMENDATION_COLUMNS`), in the cube's task order: the
    recommendation's choice, what it runs, its rule's numbers, and its real AUROC and regret."""
    records = []
    for dataset in sorted(cube.tasks["dataset"].unique()):
        records += _dataset_records(cube, np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset))
    table = pd.DataFrame(records, columns=RECOMMENDATION_COLUMNS).astype({"members": "Int64"})
    order = {int(t): r for r, t in enumerate(cube.tasks["task_id"])}
    key = table["task_id"].map(order) * len(SETTINGS) + table["setting"].map({s: i for i, s in enumerate(SETTINGS)})
    return table.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)


def ensemble_normalisation_line(config: dict) -> str:
    """One sentence naming how the cube's ensemble members were normalised; "" without ensembles."""
    entries = config.get("ensembles", {}).get("ensembles", {})
    method = config.get("ensemble_normalisation") or next((e.get("normalisation") for e in entries.values()), None)
    if not entries or not method:
        return ""
    return (f"Ensemble members' scores were normalised without labels by {NORMALISATION_WORDS.get(method, method)}, "
            "over the images being scored, before combining (`swsa score --ensemble-normalisation`).")


def recommendation_lines(table: pd.DataFrame, config: dict, max_rows: int = 40) -> list[str]:
    """The report's section on ``recommendation.csv``: the rule in words, how often each choice was
    made, one row per task (when at most ``max_rows`` tasks) and the fallback reasons."""
    if not len(table):
        return []
    first = table[table["setting"] == SETTINGS[0]]
    counts = first["recommendation"].replace("", "no pick").value_counts()
    row = first.iloc[0]
    lines = ["## The recommendation per task — what it chose and why", "",
             f"Per task, `{RECOMMENDED_LABEL}` runs ensemble(mean) unless the single SWSA pick (the best mean synthetic "
             f"AUROC over the sources) or ensemble(selected) beats ensemble(mean) in at least {row['threshold']:.0%} of "
             f"{int(row['n_resamples'])} bootstrap resamples of the task's synthetic validation set (seed "
             f"{int(row['seed'])}); P(… > mean) are those shares. It reads no real label, so its choice is the same in "
             "both settings; the regret (best single candidate's real AUROC − the recommendation's) is per setting. "
             + ensemble_normalisation_line(config) + " All columns in `recommendation.csv`.", "",
             "Chosen: " + ", ".join(f"{name} on {int(n)} of {len(first)} tasks" for name, n in counts.items()) + ".", ""]
    if len(first) <= max_rows:
        regrets = table.pivot(index="task_id", columns="setting", values="regret")
        shown = first.assign(**{f"regret {s}": first["task_id"].map(regrets[s]) for s in SETTINGS if s in regrets})
        shown = shown[["dataset", "normal_class", "recommendation", "runs", "p_single_beats_mean", "p_selected_beats_mean",
                       "synthetic_single", "synthetic_mean", "synthetic_selected",
                       *[f"regret {s}" for s in SETTINGS if s in regrets]]]
        lines += [markdown_table(shown.rename(columns={
            "normal_class": "normal class", "p_single_beats_mean": "P(single > mean)",
            "p_selected_beats_mean": "P(selected > mean)", "synthetic_single": "synthetic AUROC single",
            "synthetic_mean": "… ensemble(mean)", "synthetic_selected": "… ensemble(selected)"})), ""]
    fallbacks = first.loc[first["decided_by"] == "fallback", "reason"].value_counts()
    if len(fallbacks):
        lines += ["Decided without the bootstrap test:", ""]
        lines += [f"- {md_cell(reason)} ({int(n)} task{'s' if n != 1 else ''})" for reason, n in fallbacks.items()] + [""]
    return lines
