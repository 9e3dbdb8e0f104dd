"""The report's pick confidence (issue 20 item 7): the label-free confidence of every pick of the
strategies that choose from the synthetic validation set
(:mod:`swsa_engine.core.pick_confidence`), written as ``pick_confidence.csv``, as three columns of
``tasks.csv`` and as the report's "When to distrust a pick" section (does low confidence go with
high regret? Spearman's rho over task × strategy picks, with its p-value and n).

It needs the sweep's per-image scores (``cube.scores``, or the store's ``scores`` result read by
:func:`swsa_engine.run.cube_io.load_scores`); without them every output says
:data:`NO_SCORES` instead of a number."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from swsa_engine.core.cube import AurocCube
from swsa_engine.core.pick_confidence import (DEFAULT_RESAMPLES, DEFAULT_SEED, SYNTHETIC_STRATEGIES, PickConfidence,
                                              confidence_table, distrust_table, pick_confidence)
from swsa_engine.core.score_cube import ScoreCube
from swsa_engine.core.selection import default_strategies, selection_context
from swsa_engine.report.tables import fmt_cell, markdown_table
from swsa_engine.run.cube_io import SCORES_RESULT, load_scores, stored_results

__all__ = ["NO_SCORES", "CONFIDENCE_PICK_COLUMNS", "ReportConfidence", "report_confidence", "picks_with_confidence",
           "distrust_lines"]

#: what the report says where there are no per-image scores
NO_SCORES = "pick confidence needs per-image scores (re-run swsa score)"
#: the columns added to ``tasks.csv`` beside SWSA's pick
CONFIDENCE_PICK_COLUMNS = ["pick_resample_probability", "pick_source_agreement", "pick_margin"]


@dataclass
class ReportConfidence:
    """The report's pick confidence: ``confidence`` (None with ``reason`` when it could not be
    computed), its ``table`` (:func:`~swsa_engine.core.pick_confidence.confidence_table`), the
    ``distrust`` table and the strategy rows used."""

    confidence: PickConfidence | None
    table: pd.DataFrame | None
    distrust: pd.DataFrame | None
    strategies: list[tuple[str, str, dict]]
    reason: str = ""


def _scores(cube: AurocCube, store_path: str | os.PathLike | None) -> ScoreCube | None:
    """``cube.scores``, else the store's ``scores`` result when it has one, else None."""
    scores = cube.scores
    if scores is None and store_path is not None and SCORES_RESULT in stored_results(store_path):
        scores = load_scores(store_path)
    return scores


def report_confidence(cube: AurocCube, store_path: str | os.PathLike | None = None, *,
                      n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> ReportConfidence:
    """The confidence of every pick of :func:`~swsa_engine.core.selection.default_strategies`' rows
    in :data:`~swsa_engine.core.pick_confidence.SYNTHETIC_STRATEGIES`, from ``cube.scores`` (or the
    store's). Missing or mismatched scores give a ``reason`` and no numbers."""
    rows = [row for row in default_strategies(cube) if row[1] in SYNTHETIC_STRATEGIES]
    scores = _scores(cube, store_path)
    if scores is None:
        return ReportConfidence(None, None, None, rows, NO_SCORES)
    if list(scores.candidates) != cube.candidate_names or not np.array_equal(scores.task_ids, cube.tasks["task_id"]):
        return ReportConfidence(None, None, None, rows, "pick confidence: the per-image scores do not match the cube "
                                                        "(tasks or candidates differ); re-run swsa score")
    ctx = selection_context(cube, np.arange(len(cube.tasks)), 0)
    try:
        confidence = pick_confidence(ctx, scores.synthetic_scores, scores.synthetic_part, scores.sources, rows,
                                     n_resamples=n_resamples, seed=seed)
    except ValueError as error:  # scores from another run: reported instead of a number
        return ReportConfidence(None, None, None, rows, f"pick confidence: {error}")
    table = confidence_table(cube, confidence)
    return ReportConfidence(confidence, table, distrust_table(table), rows)


def picks_with_confidence(picks: pd.DataFrame, cube: AurocCube, result: ReportConfidence) -> pd.DataFrame:
    """``tasks.csv``'s rows with :data:`CONFIDENCE_PICK_COLUMNS` for their SWSA pick (the named
    candidate: its resample frequency and the share of the other sources picking it; the margin of
    SWSA on that source). NaN without scores, for a source not resampled, and where the named pick
    is not one the strategy makes (``per_task_picks`` may name an ensemble, which the strategies do
    not choose among): the numbers would describe another candidate's pick."""
    out = picks.copy()
    for column in CONFIDENCE_PICK_COLUMNS:
        out[column] = np.nan
    conf = result.confidence
    if conf is None or not len(picks):
        return out
    labels = {(name, settings.get("source")): label for label, name, settings in result.strategies
              if name == "swsa" and set(settings) == {"source"}}
    row_of_task = {int(t): r for r, t in enumerate(cube.tasks["task_id"])}
    column_of = {name: c for c, name in enumerate(cube.candidate_names)}
    values = np.full((len(out), 3), np.nan)
    for k, (task_id, source, pick) in enumerate(zip(out["task_id"], out["source"], out["swsa_pick"])):
        label = labels.get(("swsa", source))
        if label not in conf.labels or pick not in column_of:
            continue
        i, t, c = conf.labels.index(label), row_of_task[int(task_id)], column_of[pick]
        if not conf.weights[i, t, c] > 0:
            continue
        values[k] = conf.resample_frequency[i, t, c], conf.source_frequency[i, t, c], conf.margin[i, t]
    out[CONFIDENCE_PICK_COLUMNS] = values
    return out


def _verdict(rho: float, p: float) -> str:
    if not np.isfinite(rho):
        return "undefined"
    if p < 0.05:
        return "lower confidence went with higher regret" if rho < 0 else "lower confidence went with LOWER regret"
    return "no significant association"


def distrust_lines(result: ReportConfidence) -> list[str]:
    """The report's "When to distrust a pick" section, computed from the data (n stated)."""
    lines = ["## When to distrust a pick", ""]
    if result.confidence is None:
        return lines + [result.reason + ".", ""]
    conf, distrust = result.confidence, result.distrust
    lines += [
        f"Label-free confidence of each pick of {len(conf.labels)} strategies that choose from the synthetic "
        f"validation set ({', '.join(conf.labels)}): the **resample probability** (share of {conf.n_resamples} "
        f"bootstrap resamples of each task's held-out normals and each source's anomalies, seed {conf.seed}, in which "
        "the same candidate is picked again), the **source agreement** (share of the other synthetic sources whose "
        "own pick is the same candidate) and the **margin** (the pick's synthetic AUROC minus the runner-up's). "
        "All picks in `pick_confidence.csv`; `tasks.csv` has them beside SWSA's pick.",
        "",
        "Does low confidence go with high regret (best real AUROC − real AUROC of the pick)? Spearman's rank "
        "correlation over task × strategy picks (a negative rho: the less stable the pick, the larger the regret; "
        "picks of one task by several strategies are not independent, so read p as indicative):",
        "",
    ]
    shown = distrust.assign(
        finding=[_verdict(r, p) for r, p in zip(distrust["spearman_rho"], distrust["p_value"])],
        spearman_rho=[fmt_cell(v) for v in distrust["spearman_rho"]],
        p_value=["–" if not np.isfinite(p) else f"{p:.3g}" for p in distrust["p_value"]])
    lines += [markdown_table(shown[["setting", "measure", "n", "n_tasks", "n_strategies", "spearman_rho", "p_value",
                                    "finding", "note"]]), ""]
    if conf.skipped:
        lines += ["Not resampled: " + "; ".join(f"{k}: {v}" for k, v in conf.skipped.items()) + ".", ""]
    return lines
