"""The transfer check in the report: ``transfer.csv``, its Markdown section and its HTML section.

:func:`swsa_engine.core.source_transfer.transfer_table` leaves each synthetic source out in turn and
scores every strategy's pick on it (no labels). This module writes nothing of its own beyond that
table: per dataset, a strategy × held-out source grid of mean transfer regret, and one sentence that
names, among the rows a user chooses between (the recommendation, the SWSA pick, ensemble(mean) and
model centrality), the one with the lowest pooled transfer regret — computed from the table.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from swsa_engine.core.recommendation import ENSEMBLE_MEAN, RECOMMENDED_LABEL
from swsa_engine.core.source_transfer import ALL_HELD_OUT, transfer_summary
from swsa_engine.report.html_format import fmt_number, html_table
from swsa_engine.report.tables import markdown_table

__all__ = ["TRANSFER_NOTE", "COMPARED_ROWS", "transfer_verdict", "transfer_lines", "transfer_html"]

TRANSFER_NOTE = (
    "Leave one synthetic source out: for each source, every strategy chooses as if that source had never been "
    "generated, and its pick is scored on that source's anomalies (regret = best single candidate's synthetic AUROC "
    "there − the pick's). It asks of the synthetic sets alone whether picks hold on a kind of anomaly they did not "
    "see — the question behind trusting a single pick over an ensemble — and reads no real label. A strategy that "
    "reads the left-out source has no value there; ensemble(selected), whose weights saw every source, is hidden "
    "from every held-out view (so the recommendation chooses between the single pick and ensemble(mean) there). "
    "`all` pools every (task, left-out source) pair. Real anomalies may differ from every synthetic kind: this is "
    "evidence about the synthetic sets, not a measurement on the real images.")

#: the rows a user chooses between, as the verdict names them
COMPARED_ROWS = (RECOMMENDED_LABEL, "SWSA (mean of sources)", ENSEMBLE_MEAN, "Model centrality (Ma et al. 2021)")


def transfer_verdict(table: pd.DataFrame, dataset: str) -> str:
    """One sentence for ``dataset``: the pooled transfer regret of each of :data:`COMPARED_ROWS` present
    in ``table`` (:func:`~swsa_engine.core.source_transfer.transfer_table`) and which is lowest ("" when none)."""
    pooled = table[(table["dataset"] == dataset) & (table["held_out_source"] == ALL_HELD_OUT)]
    pooled = pooled.set_index("strategy").reindex([r for r in COMPARED_ROWS if r in set(pooled["strategy"])])
    pooled = pooled[np.isfinite(pooled["mean_regret"].to_numpy(dtype=float))]
    if not len(pooled):
        return ""
    said = ", ".join(f"{name} {row.mean_regret:.4f} ({int(row.tasks)} pairs)" for name, row in pooled.iterrows())
    best = pooled["mean_regret"].astype(float)
    lowest = [name for name, value in best.items() if value == best.min()]
    return (f"{dataset}: mean transfer regret {said}; lowest: {' and '.join(lowest)} — on the synthetic sets, "
            f"that is the choice that held best on an unseen kind of anomaly.")


def _grid(table: pd.DataFrame, dataset: str) -> pd.DataFrame:
    grid = transfer_summary(table[table["dataset"] == dataset])
    grid.columns = [f"regret ({c})" if c != ALL_HELD_OUT else "regret (all)" for c in grid.columns]
    return grid.reset_index()


def transfer_lines(table: pd.DataFrame) -> list[str]:
    """The Markdown section on ``transfer.csv`` ([] when the table is empty: fewer than two base sources)."""
    if not len(table):
        return []
    lines = ["## Does the pick hold on an unseen kind of anomaly? (leave one synthetic source out)", "",
             TRANSFER_NOTE + " All rows, with pick rates, in `transfer.csv`.", ""]
    for dataset in dict.fromkeys(table["dataset"]):
        grid = _grid(table, dataset)
        lines += [f"### {dataset}", "", transfer_verdict(table, dataset), "",
                  markdown_table(grid, {c: ".4f" for c in grid.columns if c != "strategy"}), ""]
    return lines


def transfer_html(table: pd.DataFrame | None) -> list[str]:
    """The HTML section on ``transfer.csv`` ([] when there is none)."""
    if table is None or not len(table):
        return []
    parts = ["<h3>Does the pick hold on an unseen kind of anomaly? (leave one synthetic source out)</h3>",
             f"<p class=cap>{html.escape(TRANSFER_NOTE.replace('`', ''))}</p>"]
    for i, dataset in enumerate(dict.fromkeys(table["dataset"])):
        grid = _grid(table, dataset)
        parts += [f"<h4>{html.escape(str(dataset))}</h4>",
                  f"<p class=note>{html.escape(transfer_verdict(table, dataset))}</p>",
                  html_table(grid, f"transfer-{i}", {c: lambda v: fmt_number(v, 4) for c in grid.columns[1:]})]
    return parts
