"""Does a pick hold on an anomaly type it never saw? Each synthetic source left out in turn, no labels.

The real anomalies of a dataset are of a kind no synthetic source reproduces exactly, so the question
behind every label-free rule — trust the single pick the synthetic sets favour, or the ensemble — is
how picks transfer to an *unseen* kind of anomaly. This module asks it of the synthetic sets
themselves: for each base source ``h``, the strategies see the tasks as if ``h`` had never been
generated (its AUROC columns and its "hardest N" variants gone; the per-image scores without its
anomalies), and ``h``'s synthetic AUROCs play the real ones. A strategy's transfer regret on ``h`` is
the best single candidate's AUROC on ``h`` minus its pick's, as Table 1's regret is on the real images.

Two things cannot be evaluated that way and are left out, never approximated:

* a strategy that reads ``h`` itself (``SWSA (h)``): no row for that ``h``;
* ``ensemble(selected)``: its weights were fitted on every source, ``h`` included. It is hidden (NaN)
  in every held-out view, so neither its own row nor the recommendation can choose it there — the
  recommendation then chooses between the single pick and ``ensemble(mean)``.

A candidate without an AUROC on ``h`` (NAGL on ``cutpaste``: the sweep records that skip, as NAGL
trains on CutPaste-like anomalies) is no yardstick for the best there; a strategy that spreads its pick
(the random pick, the largest backbone's detectors) is re-spread over the candidates defined on ``h``, and
one that picks only such candidates has that task left out (``tasks`` counts what was evaluated). Model centrality and EM/MV read only the unlabelled real test images, so they are unaffected by which
source is left out. No real label is read anywhere. Pure arrays: no I/O.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd

from swsa_engine.core.cube import AurocCube
from swsa_engine.core.ensemble_pass import SELECTED
from swsa_engine.core.selection import (SelectionContext, default_strategies, evaluate_weights, reads_synthetic,
                                        selection_context, strategy_weights)

__all__ = ["TRANSFER_COLUMNS", "ALL_HELD_OUT", "held_out_context", "transfer_table", "transfer_summary"]

TRANSFER_COLUMNS = ["dataset", "held_out_source", "strategy", "tasks", "mean_auroc", "mean_best", "mean_regret",
                    "pick_rate"]
#: ``held_out_source`` of the rows pooling every held-out source's (task, source) pairs
ALL_HELD_OUT = "all"


def held_out_context(ctx: SelectionContext, source: str) -> SelectionContext:
    """``ctx`` as if base source ``source`` had never been generated, with its synthetic AUROCs (T, C)
    as ``real`` and :data:`~swsa_engine.core.ensemble_pass.SELECTED` hidden (NaN) — see the module
    docstring. Needs at least two base sources."""
    if source not in ctx.base_sources:
        raise ValueError(f"{source!r} is not a base synthetic source; the tasks have: {', '.join(ctx.base_sources)}")
    if len(ctx.base_sources) < 2:
        raise ValueError(f"leaving a source out needs at least two base sources, the tasks have {list(ctx.base_sources)}")
    keep = [v for v, name in enumerate(ctx.sources) if name != source and not name.startswith(f"{source}@")]
    names = [str(n) for n in ctx.candidates["name"]]
    hidden = np.array([n == SELECTED for n in names])
    synthetic = ctx.synthetic[:, :, keep].copy()
    synthetic[:, hidden, :] = np.nan
    truth = ctx.source(source).copy()
    truth[:, hidden] = np.nan
    scores = None if ctx.scores is None else ctx.scores.without_source(source)
    return dataclasses.replace(ctx, synthetic=synthetic, sources=tuple(ctx.sources[v] for v in keep),
                               base_sources=tuple(s for s in ctx.base_sources if s != source), real=truth,
                               scores=scores)


def _reads(settings: dict, source: str) -> bool:
    """Whether a strategy row's settings name ``source`` (it cannot be evaluated with ``source`` left out)."""
    return settings.get("source") == source


def _records(dataset: str, source: str, labels: list[str], weights: list[np.ndarray], ctx: SelectionContext) -> list:
    """Per strategy: the per-task outcome of its weights on the held-out view ``ctx``."""
    out = []
    pool = ctx.single & np.isfinite(ctx.real).all(axis=0)  # a candidate h was never scored on is no yardstick
    defined = np.isfinite(ctx.real)
    for label, w in zip(labels, weights):
        kept = np.where(defined, np.nan_to_num(w), 0.0)
        mass = kept.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):  # no mass left: NaN row, the task is left out
            w = np.where(np.isnan(w).any(axis=1, keepdims=True) | (mass == 0), np.nan, kept / mass)
        outcome = evaluate_weights(w, ctx.real, pool)
        out.append({"dataset": dataset, "held_out_source": source, "strategy": label,
                    "auroc": outcome["auroc"], "best": outcome["best"], "hit": outcome["hit"]})
    return out


def _summarised(records: list[dict]) -> dict:
    """One table row from per-task outcomes (NaN tasks left out; all-NaN: 0 tasks, NaN means)."""
    auroc = np.concatenate([r["auroc"] for r in records])
    best = np.concatenate([r["best"] for r in records])
    hit = np.concatenate([r["hit"] for r in records])
    defined = ~np.isnan(auroc)
    n = int(defined.sum())
    mean = (lambda a: float(np.mean(a[defined]))) if n else (lambda a: np.nan)
    return {"tasks": n, "mean_auroc": mean(auroc), "mean_best": mean(best), "mean_regret": mean(best - auroc),
            "pick_rate": mean(hit)}


def _view_weights(view: SelectionContext, rows: list[tuple[str, str, dict]], unchanged: dict) -> list[np.ndarray]:
    """Each strategy row's weights on a held-out ``view``; those of strategies registered
    ``reads_synthetic=False`` computed on the first view only and kept in ``unchanged`` (by label)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks and missing picks show as fewer tasks, not warnings
        for row in rows:
            if row[0] in unchanged:
                out.append(unchanged[row[0]])
                continue
            weights = strategy_weights(view, [row])[0]
            if not reads_synthetic(row[1]):
                unchanged[row[0]] = weights
            out.append(weights)
    return out


def transfer_table(cube: AurocCube, strategies: list[tuple[str, str, dict]] | None = None) -> pd.DataFrame:
    """Transfer regret (columns :data:`TRANSFER_COLUMNS`) per dataset, held-out base source and strategy
    ((label, name, settings) rows, default :func:`~swsa_engine.core.selection.default_strategies`), then
    per dataset and strategy over every held-out source pooled (``held_out_source`` = :data:`ALL_HELD_OUT`).
    A strategy with no defined task on a held-out source (it needs what was hidden) has no row there.
    Empty when the cube has fewer than two base sources."""
    strategies = strategies or default_strategies(cube)
    base = list(cube.config.get("base_sources", [s for s in cube.sources if "@" not in s]))
    rows = []
    if len(base) < 2:
        return pd.DataFrame(columns=TRANSFER_COLUMNS)
    for dataset in sorted(cube.tasks["dataset"].unique()):
        ctx = selection_context(cube, np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset), 0)
        pooled: dict[str, list] = {}
        unchanged: dict[str, np.ndarray] = {}  # picks that no synthetic source moves (model centrality, EM/MV)
        for source in base:
            view = held_out_context(ctx, source)
            usable = [row for row in strategies if not _reads(row[2], source)]
            weights = _view_weights(view, usable, unchanged)
            for record in _records(dataset, source, [r[0] for r in usable], weights, view):
                pooled.setdefault(record["strategy"], []).append(record)
                rows.append({"dataset": dataset, "held_out_source": source, "strategy": record["strategy"],
                             **_summarised([record])})
        rows += [{"dataset": dataset, "held_out_source": ALL_HELD_OUT, "strategy": label,
                  **_summarised(pooled[label])} for label in dict.fromkeys(r[0] for r in strategies) if label in pooled]
    table = pd.DataFrame(rows, columns=TRANSFER_COLUMNS)
    return table[table["tasks"] > 0].reset_index(drop=True)


def transfer_summary(table: pd.DataFrame) -> pd.DataFrame:
    """(strategy × held-out source) mean transfer regret of one dataset's rows of :func:`transfer_table`,
    the pooled :data:`ALL_HELD_OUT` column last, rows in the order of the pooled rows (the strategies')."""
    wide = table.pivot_table(index="strategy", columns="held_out_source", values="mean_regret", sort=False)
    wide = wide.reindex(list(dict.fromkeys(table.loc[table["held_out_source"] == ALL_HELD_OUT, "strategy"])))
    order = [c for c in dict.fromkeys(table["held_out_source"]) if c != ALL_HELD_OUT] + [ALL_HELD_OUT]
    return wide.reindex(columns=[c for c in order if c in wide.columns])
