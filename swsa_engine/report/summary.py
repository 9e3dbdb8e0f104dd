"""The report: Markdown, CSV and JSON tables in the shape of the paper's Tables 1 and 2, per-task
picks, the strategies comparison (with its regret figure), recorded skips, and the Figure-3
scatter of real vs synthetic AUROC per candidate (figures are drawn through the registry of
:mod:`swsa_engine.report.figures`; the shared table helpers live in
:mod:`swsa_engine.report.tables` and are importable from here too)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from swsa_engine.core.cube import AurocCube
from swsa_engine.core.metric_cube import DEFAULT_METRIC, metric_cube, metric_strategies
from swsa_engine.core.protocol import protocol_line
from swsa_engine.core.selection import per_task_picks, ranking_table
from swsa_engine.core.source_transfer import transfer_table
from swsa_engine.core.strategy_comparison import selection_tables
from swsa_engine.report.atomic import publish, staging_dir
from swsa_engine.report.clip_tables import clip_report_lines
from swsa_engine.report.confidence import CONFIDENCE_PICK_COLUMNS, distrust_lines, picks_with_confidence, report_confidence
from swsa_engine.report.distribution import tv_table
from swsa_engine.report.figures import create_figure
from swsa_engine.report.figures.figure3 import figure3
from swsa_engine.report.metric_tables import metric_display, metric_lines, metric_report_lines, metric_text
from swsa_engine.report.recommendation_table import recommendation_lines, recommendation_table
from swsa_engine.report.transfer_tables import transfer_lines
from swsa_engine.report.tables import (RANDOM_CANDIDATES_NOTE, STRATEGIES_NOTE, TABLE2_FORMATS, ReportTables,
                                       all_skips, detector_families, markdown_table, random_candidates,
                                       strategies_display, table1_display, table2_display, table2_note, write_csv)

__all__ = ["write_report", "markdown_table", "table1_display", "detector_families", "figure3", "RANDOM_CANDIDATES_NOTE"]


def write_report(
    cube: AurocCube,
    out_dir: str | os.PathLike,
    *,
    store_skips: pd.DataFrame | None = None,
    title: str = "SWSA report",
    notes: list[str] | None = None,
    store_path: str | os.PathLike | None = None,
    table3_tasks: int = 0,
    figure4: bool = False,
    candidate: str | None = None,
    metric: str = DEFAULT_METRIC,
) -> dict[str, Path]:
    """Write ``report.md``, ``table1.csv/.md``, ``table2.csv/.md``, ``tasks.csv``, ``summary.json``,
    ``strategies.csv`` (:func:`~swsa_engine.core.strategy_comparison.strategies_table`),
    ``pick_confidence.csv`` (:mod:`swsa_engine.report.confidence`; with the cube's per-image scores,
    ``cube.scores`` or the store's), ``recommendation.csv`` (:mod:`swsa_engine.report.recommendation_table`), ``transfer.csv``
    (:func:`~swsa_engine.core.source_transfer.transfer_table`, :mod:`swsa_engine.report.transfer_tables`),
    ``figure3.png`` and ``strategies.png`` into ``out_dir``; returns their paths.

    With ``store_path``: ``table3_tasks > 0`` adds Table 3 (total variation, that many tasks per
    dataset) and ``figure4=True`` the t-SNE figure, both for ``candidate`` (default ViT-B/16).
    ``metric`` (:data:`~swsa_engine.core.metric_cube.METRICS`): what Table 1 and the strategies comparison select
    by and measure (:func:`~swsa_engine.core.metric_cube.metric_cube`); ``metrics.csv`` and ``thresholds.csv``
    (:mod:`swsa_engine.report.metric_tables`) hold every candidate's metrics and the threshold comparison.
    """
    out = staging_dir(out_dir)  # written whole, then renamed into out_dir (report.atomic)
    paths = {
        "table1_csv": out / "table1.csv", "table2_csv": out / "table2.csv", "tasks_csv": out / "tasks.csv",
        "figure3": out / "figure3.png", "summary": out / "summary.json", "report": out / "report.md",
        "skips_csv": out / "skips.csv", "strategies_csv": out / "strategies.csv",
        "strategies_figure": out / "strategies.png",
    }
    confidence = report_confidence(cube, store_path)
    tables = _write_cube_tables(cube, store_skips, paths, confidence, metric)
    if store_path is not None:
        tables.table3 = _write_store_figures(cube, store_path, out, paths, table3_tasks=table3_tasks,
                                             figure4=figure4, candidate=candidate)
    randoms = random_candidates(cube)
    recommended = recommendation_table(cube)  # per task: the recommendation's choice and its rule's numbers
    paths["recommendation_csv"] = out / "recommendation.csv"
    write_csv(recommended, paths["recommendation_csv"])
    lines = _intro_lines(cube, title, notes, randoms) + metric_lines(metric) + _table_lines(tables, metric)
    lines += recommendation_lines(recommended, cube.config)
    transfer = transfer_table(cube)  # leave one synthetic source out: the synthetic evidence behind the rule
    paths["transfer_csv"] = out / "transfer.csv"
    write_csv(transfer, paths["transfer_csv"])
    lines += transfer_lines(transfer)
    if "figure4" in paths:
        lines += ["## Figure 4 — t-SNE of one task per dataset", "", "![figure 4](figure4.png)", ""]
    if store_path is not None:  # prompt selection and BLISS blocks, when those cubes exist
        lines += clip_report_lines(store_path, out, paths)
    lines += metric_report_lines(cube, out, paths)
    lines += _picks_lines(cube, tables.picks) + distrust_lines(confidence) + _skips_lines(tables.skips)
    paths["report"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_summary(cube, tables, randoms, paths["summary"], metric)
    (out / "table1.md").write_text(markdown_table(metric_display(table1_display(tables.table1), metric)) + "\n",
                                    encoding="utf-8")
    (out / "table2.md").write_text(markdown_table(tables.table2, TABLE2_FORMATS) + "\n", encoding="utf-8")
    return publish(out, Path(out_dir), paths)


def _write_cube_tables(cube: AurocCube, store_skips: pd.DataFrame | None, paths: dict[str, Path],
                       confidence, metric: str = DEFAULT_METRIC) -> ReportTables:
    """Compute Tables 1 and 2, the per-task picks (with the ``confidence`` of SWSA's pick) and the
    skips from ``cube`` (and the store's ``store_skips``; Table 1 and the strategies by ``metric``), and write
    them and Figure 3 to ``paths``."""
    picks = picks_with_confidence(per_task_picks(cube), cube, confidence)
    ranked, strategies = metric_cube(cube, metric), metric_strategies(cube, metric)
    table1, comparison = selection_tables(ranked, strategies)  # one run of the strategies for both tables
    tables = ReportTables(table1, ranking_table(cube), picks, all_skips(cube, store_skips),
                          strategies=comparison, confidence=confidence.table, distrust=confidence.distrust)
    if confidence.table is not None:
        paths["pick_confidence_csv"] = paths["tasks_csv"].with_name("pick_confidence.csv")
        write_csv(confidence.table, paths["pick_confidence_csv"])
    write_csv(tables.strategies, paths["strategies_csv"])
    create_figure("strategies", cube=ranked, path=paths["strategies_figure"], table=tables.strategies)
    write_csv(tables.table1, paths["table1_csv"])
    write_csv(tables.table2, paths["table2_csv"])
    write_csv(tables.picks, paths["tasks_csv"])
    create_figure("figure3", cube=cube, path=paths["figure3"])
    write_csv(tables.skips, paths["skips_csv"])
    return tables


def _write_store_figures(cube: AurocCube, store_path: str | os.PathLike, out: Path, paths: dict[str, Path], *,
                         table3_tasks: int, figure4: bool, candidate: str | None) -> pd.DataFrame | None:
    """Write Table 3 (when ``table3_tasks > 0``) and Figure 4 (when ``figure4``), which read the
    store's embeddings, adding their paths to ``paths``; returns Table 3 or None."""
    table3 = None
    if table3_tasks > 0:
        table3 = tv_table(store_path, cube, candidate=candidate, tasks_per_dataset=table3_tasks)
        paths["table3_csv"] = out / "table3.csv"
        write_csv(table3, paths["table3_csv"])
    if figure4:
        paths["figure4"] = create_figure("figure4", cube=cube, path=out / "figure4.png", store_path=store_path,
                                         candidate=candidate)
    return table3


def _intro_lines(cube: AurocCube, title: str, notes: list[str] | None, randoms: list[str]) -> list[str]:
    """The report's title, its warning about random candidates, the notes and one sentence on
    what was scored."""
    lines = [f"# {title}", ""]
    if randoms:
        lines += [
            f"> **Randomly initialised candidates:** {', '.join(randoms)}. {RANDOM_CANDIDATES_NOTE}", "",
        ]
    for note in notes or []:
        lines += [note, ""]
    lines += [
        f"{len(cube.tasks)} tasks over {cube.tasks['dataset'].nunique()} dataset(s); {len(cube.candidates)} candidates: "
        f"{', '.join(cube.candidate_names)}; synthetic validation sources: {', '.join(cube.sources)}. "
        + (f"Detectors: {', '.join(cube.config['detectors'])}." if cube.config.get("detectors")
         else f"kNN score with k = {cube.config.get('k')}."),
        "",
        protocol_line(cube.config) + (f" {int(cube.self_validated.sum())} synthetic cells were left out as "
                                      "self-validation (see the skips)." if cube.self_validated.any() else ""),
        "",
    ]
    return lines


def _table_lines(tables: ReportTables, metric: str = DEFAULT_METRIC) -> list[str]:
    """Tables 1 and 2, Figure 3, and Table 3 when it was computed, as Markdown sections."""
    table2 = tables.table2
    lines = [
        "## Table 1 — model selection",
        "",
        metric_text("Pick rate = tasks where the strategy picks a candidate with the best real AUROC (ties count), "
                    "AUROC of pick = mean real AUROC of the picked candidate, best possible = mean of the best real "
                    "AUROC.", metric),
        "",
        markdown_table(metric_display(table1_display(tables.table1), metric)),
        "",
        "## Table 2 — ranking agreement (Kendall's tau)",
        "",
        "Kendall's tau-b between the candidates' synthetic and real AUROCs (each averaged over the tasks). "
        + table2_note(table2) + " `mean_task_tau` averages the per-task taus.",
        "",
        markdown_table(table2_display(table2), TABLE2_FORMATS),
        "",
        *_strategies_lines(tables.strategies, metric),
        "## Figure 3 — real vs synthetic AUROC per candidate",
        "",
        "![figure 3](figure3.png)",
        "",
    ]
    if tables.table3 is not None:
        lines += [
            "## Table 3 — total variation between real and synthetic validation sets",
            "",
            "TV = Σ|p_i − q_i| of the k-means cluster histograms (k = √(|D1|+|D2|), mean of 10 runs) with "
            "D1 = support ∪ real one-vs-closest anomalies and D2 = support ∪ synthetic anomalies; 0 = same, 2 = disjoint.",
            "",
            markdown_table(tables.table3),
            "",
        ]
    return lines


def _strategies_lines(strategies: pd.DataFrame | None, metric: str = DEFAULT_METRIC) -> list[str]:
    """The strategies comparison section (``strategies.csv``) and its figure."""
    if strategies is None:
        return []
    return [metric_text("## Strategies compared — real AUROC of the pick, regret, pick rate", metric), "",
            metric_text(STRATEGIES_NOTE, metric) + " All numbers in `strategies.csv`.", "",
            markdown_table(metric_display(strategies_display(strategies), metric)), "",
            "![strategies: mean regret per strategy](strategies.png)", ""]


def _picks_lines(cube: AurocCube, picks: pd.DataFrame) -> list[str]:
    """The per-task picks section: what ``tasks.csv`` holds, and its rows when there are at
    most 40 tasks."""
    lines = [
        "## Per-task picks",
        "",
        f"`tasks.csv` has {len(picks)} rows: per task and setting, SWSA's pick on `{picks['source'].iloc[0] if len(picks) else ''}`, "
        "the oracle's pick and their real AUROCs, and the pick's label-free confidence (`pick_resample_probability`, "
        "`pick_source_agreement`, `pick_margin`; see \"When to distrust a pick\").",
        "",
    ]
    if 0 < len(cube.tasks) <= 40:
        shown = picks[["normal_class", "setting", "swsa_pick", *CONFIDENCE_PICK_COLUMNS, "swsa_pick_real_auroc",
                       "oracle_pick", "oracle_real_auroc", "hit"]]
        lines += [markdown_table(shown.rename(columns={"normal_class": "normal class", "swsa_pick": "SWSA pick",
                                                        "pick_resample_probability": "resample probability",
                                                        "pick_source_agreement": "source agreement",
                                                        "pick_margin": "margin",
                                                        "swsa_pick_real_auroc": "its real AUROC", "oracle_pick": "oracle pick",
                                                        "oracle_real_auroc": "best real AUROC"})), ""]
    return lines


def _skips_lines(skips: pd.DataFrame) -> list[str]:
    """The recorded-skips section: the first 50 skips and how many more ``skips.csv`` holds."""
    lines = [
        "## Recorded skips",
        "",
    ]
    if len(skips):
        lines += [f"{len(skips)} skips (all in `skips.csv`):", "", markdown_table(skips.head(50))]
        if len(skips) > 50:
            lines.append(f"\n… and {len(skips) - 50} more in skips.csv")
    else:
        lines.append("None: every image was read and every task was scored.")
    return lines


def _write_summary(cube: AurocCube, tables: ReportTables, randoms: list[str], path: Path,
                   metric: str = DEFAULT_METRIC) -> None:
    """``summary.json``: the run's shape and config, and Tables 1 to 3 as lists of records."""
    summary = {
        "tasks": len(cube.tasks), "candidates": cube.candidate_names, "sources": cube.sources, "config": cube.config,
        "random_candidates": randoms, "skips": int(len(tables.skips)), "selection_metric": metric,
        "table3": None if tables.table3 is None else tables.table3.to_dict(orient="records"),
        "table1": tables.table1.to_dict(orient="records"), "table2": tables.table2.to_dict(orient="records"),
        "strategies": None if tables.strategies is None else tables.strategies.to_dict(orient="records"),
        "pick_confidence_distrust": None if tables.distrust is None else tables.distrust.to_dict(orient="records"),
    }
    path.write_text(json.dumps(summary, indent=2, default=_json_default), encoding="utf-8")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)
