"""One self-contained HTML report that a person explores in a browser.

:func:`write_html_report` writes a single ``.html`` file with its styles, script, figures and
image thumbnails inside it (data URIs); it opens from disk with no network. It shows

* the overview: Table 1 (model selection), Table 2 (Kendall's tau), Table 3 (total variation)
  when computed — sortable by clicking a header and filterable by dataset, setting, source and
  strategy — and Figure 3 (real vs synthetic AUROC per candidate) per dataset and setting,
  drawn as inline SVG from the same numbers, plus the Figure 3/4 PNGs when present;
* one section per task, built on demand from the task's embedded JSON when it is opened
  (searchable by class name): seed images, the synthetic anomalies per generator (diffusion:
  style images as a row, content images as a column, each pair's result in the grid, as in the
  SWSA paper's Figure 2; CutPaste: each result beside its parent image), a sample of the real
  normal and anomalous validation images, every candidate's synthetic and real AUROC with
  SWSA's and the oracle's pick, the t-SNE figure when the task is in it, and recorded skips.

Every number shown is formatted in Python from the same DataFrames that ``write_report``
writes to CSV (read back from ``report_dir`` when given), so the HTML and the CSV agree.
Images without a readable file (e.g. the paper-shaped bench store, whose paths are empty) are
shown as "no image file" placeholders, never as broken images.

The page is put together here; the values are formatted by :mod:`.html_format`, the task
payloads built by :mod:`.html_payload` (the store read through :mod:`swsa_engine.run.report_inputs`),
the thumbnails made by :mod:`.html_thumbs`, and the style sheet and script are in :mod:`.html_assets`.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.metric_cube import DEFAULT_METRIC
from swsa_engine.core.protocol import protocol_line
from swsa_engine.core.selection import per_task_picks, ranking_table
from swsa_engine.core.source_transfer import transfer_table
from swsa_engine.report.confidence import picks_with_confidence, report_confidence
from swsa_engine.report.distribution import sample_tasks
from swsa_engine.report.figures.figure3 import figure3_data
from swsa_engine.report.html_assets import CSS, JS
from swsa_engine.report.html_format import COLUMN_FORMATS, fmt_number, html_table, json_script
from swsa_engine.report.html_payload import task_payloads
from swsa_engine.report.html_thumbs import file_uri, thumbnail
from swsa_engine.report.metric_tables import metric_display, metric_html, metric_note, metric_tables_for, metric_text
from swsa_engine.report.recommendation_table import ensemble_normalisation_line, recommendation_table
from swsa_engine.report.transfer_tables import transfer_html
from swsa_engine.report.tables import (RANDOM_CANDIDATES_NOTE, STRATEGIES_NOTE, ReportTables, all_skips,
                                       random_candidates, read_csv, table1_display, table2_note)

__all__ = ["write_html_report", "FILTER_COLUMNS", "fmt_number", "html_table", "thumbnail", "COLUMN_FORMATS"]

#: Filterable columns of the overview tables.
FILTER_COLUMNS = ("dataset", "setting", "source", "strategy")


# --------------------------------------------------------------------------- data


def _read_csv(directory: Path | None, name: str) -> pd.DataFrame | None:
    if directory is None:
        return None
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        return read_csv(path, keep_default_na=True)  # text cells as before write_csv's formula guard
    except pd.errors.EmptyDataError:
        return None


# --------------------------------------------------------------------------- the report


def write_html_report(
    cube: AurocCube,
    store_path: str | os.PathLike | None,
    path: str | os.PathLike,
    *,
    report_dir: str | os.PathLike | None = None,
    store_skips: pd.DataFrame | None = None,
    title: str = "SWSA report",
    notes: list[str] | None = None,
    thumb_size: int = 64,
    max_per_generator: int = 30,
    n_real: int = 8,
    metric: str = DEFAULT_METRIC,
) -> Path:
    """Write the self-contained HTML report of ``cube`` to ``path``; returns the path.

    ``report_dir``: a folder written by :func:`swsa_engine.report.summary.write_report`; its CSV tables
    (table1/2/3, tasks, skips) and PNG figures (figure3, figure4) are shown as they are, so the
    HTML's numbers equal the CSV's. Without it, Tables 1 and 2 and the per-task picks are
    computed from ``cube`` with the same functions. ``store_path`` gives the images (thumbnails
    of ``thumb_size`` px) and the tasks' members; ``max_per_generator`` synthetic images per
    generator and ``n_real`` real normal / anomalous images are shown per task. ``metric``: what Table 1
    and the strategies comparison select by and measure (as ``write_report``'s).
    """
    report_dir = Path(report_dir) if report_dir is not None else None
    tables = _report_tables(cube, report_dir, store_skips, metric)
    figures = _ReportFigures.read(cube, report_dir)
    recommendation = _read_csv(report_dir, "recommendation.csv")  # as the Markdown report wrote it, else computed
    recommendation = recommendation_table(cube) if recommendation is None else recommendation
    transfer = _read_csv(report_dir, "transfer.csv")
    transfer = transfer_table(cube) if transfer is None else transfer
    index, sections = [], []
    for task_id, entry, payload in task_payloads(
        cube, store_path, tables.picks, tables.skips, thumb_size=thumb_size, max_per_generator=max_per_generator,
        n_real=n_real, tsne_tasks=figures.tsne_tasks, confidence=tables.confidence,
        recommendation=recommendation,
    ):
        index.append(entry)
        sections.append(json_script(f"task-{task_id}", payload))
    randoms = random_candidates(cube)
    meta = {
        "title": title, "candidates": cube.candidate_names, "sources": list(cube.sources), "settings": list(SETTINGS),
        "random_candidates": randoms, "k": cube.config.get("k"), "n_tasks": len(cube.tasks),
        "thumb_size": thumb_size, "max_per_generator": max_per_generator,
    }
    parts = [
        *_page_head(title), *_intro_html(cube, notes, randoms), *_tables_html(tables, metric),
        *metric_html(cube, _read_csv(report_dir, "metrics.csv"), _read_csv(report_dir, "thresholds.csv")),
        *transfer_html(transfer),
        *_figures_html(figures),
        *_tasks_html(thumb_size, max_per_generator, n_real),
        json_script("meta", meta), json_script("task-index", index), json_script("fig3-data", figure3_data(cube)),
        *sections,
        f"<script>{JS}</script></body></html>",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _report_tables(cube: AurocCube, report_dir: Path | None, store_skips: pd.DataFrame | None,
                   metric: str = DEFAULT_METRIC) -> ReportTables:
    """The tables as ``write_report`` wrote them to ``report_dir``; each one missing there is
    computed from ``cube`` (and ``store_skips``), except Table 3, which stays None."""
    table1, strategies = _read_csv(report_dir, "table1.csv"), _read_csv(report_dir, "strategies.csv")
    if table1 is None or strategies is None:  # by the selection metric, as write_report computes them
        computed = metric_tables_for(cube, metric)
        table1 = computed[0] if table1 is None else table1
        strategies = computed[1] if strategies is None else strategies
    table2 = _read_csv(report_dir, "table2.csv")
    table2 = ranking_table(cube) if table2 is None else table2
    table3 = _read_csv(report_dir, "table3.csv")
    picks = _read_csv(report_dir, "tasks.csv")
    confidence = _read_csv(report_dir, "pick_confidence.csv")
    if picks is None:  # computed here, with the pick confidence when the cube carries its per-image scores
        computed = report_confidence(cube)
        picks = picks_with_confidence(per_task_picks(cube), cube, computed)
        confidence = computed.table if confidence is None else confidence
    skips = _read_csv(report_dir, "skips.csv")
    if skips is None:
        skips = all_skips(cube, store_skips)
    skips = skips.fillna({"candidate": "", "reason": "", "stage": ""})
    return ReportTables(table1, table2, picks, skips, table3, strategies, confidence=confidence)


@dataclass
class _ReportFigures:
    """``report_dir``'s Figure 3 and Figure 4 PNGs as data URIs (None where absent) and the ids
    of the tasks Figure 4 shows."""

    figure3_png: str | None
    figure4_png: str | None
    tsne_tasks: set[int]
    strategies_png: str | None = None

    @classmethod
    def read(cls, cube: AurocCube, report_dir: Path | None) -> _ReportFigures:
        figure3_png = file_uri(report_dir / "figure3.png") if report_dir else None
        figure4_png = file_uri(report_dir / "figure4.png") if report_dir else None
        tsne_tasks: set[int] = set()
        if figure4_png:
            tsne_tasks = {int(cube.tasks["task_id"].iloc[r]) for r in sample_tasks(cube, 1, 0)}
        strategies_png = file_uri(report_dir / "strategies.png") if report_dir else None
        return cls(figure3_png, figure4_png, tsne_tasks, strategies_png)


def _page_head(title: str) -> list[str]:
    """From the doctype to the opening of the overview section."""
    return [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">', f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>",
        f'<header><h1>{html.escape(title)}</h1><nav><a href="#overview">Overview</a> · <a href="#tasks">Tasks</a></nav></header>',
        '<main><section id="overview"><h2>Overview</h2>',
    ]


def _intro_html(cube: AurocCube, notes: list[str] | None, randoms: list[str]) -> list[str]:
    """The warning about random candidates, the notes, one sentence on what was scored and the
    (script-filled) filter bar."""
    parts = []
    if randoms:
        parts.append(f'<p class="warn"><b>Randomly initialised candidates:</b> {html.escape(", ".join(randoms))}. '
                     f"{html.escape(RANDOM_CANDIDATES_NOTE)}</p>")
    for note in notes or []:
        parts.append(f"<p class=note>{html.escape(note)}</p>")
    parts.append(
        f"<p>{len(cube.tasks)} tasks over {cube.tasks['dataset'].nunique()} dataset(s); {len(cube.candidates)} candidates: "
        f"{html.escape(', '.join(cube.candidate_names))}; synthetic validation sources: {html.escape(', '.join(cube.sources))}; "
        f"kNN score with k = {html.escape(str(cube.config.get('k')))}.</p>"
    )
    parts.append(f"<p class=note>{html.escape(protocol_line(cube.config))}</p>")
    if ensemble_normalisation_line(cube.config):
        parts.append(f"<p class=note>{html.escape(ensemble_normalisation_line(cube.config).replace('`', ''))}</p>")
    parts.append('<div id="filters" class="filters"></div>')
    return parts


def _tables_html(tables: ReportTables, metric: str = DEFAULT_METRIC) -> list[str]:
    """Tables 1 and 2, and Table 3 when it was computed, with their captions (Table 1 and the strategies by
    ``metric``)."""
    shown1 = metric_display(table1_display(tables.table1), metric)
    shown1.insert(4, "pick_rate", tables.table1["pick_rate"].to_numpy())
    parts = [
        "<h3>Table 1 — model selection</h3>",
        *([f"<p class=note>{html.escape(metric_note(metric).replace('`', '').replace('**', ''))}</p>"]
          if metric_note(metric) else []),
        metric_text("<p class=cap>Pick rate = tasks where the strategy picks a candidate with the best real AUROC (ties "
                    "count); AUROC of pick = mean real AUROC of the picked candidate; best possible = mean best real "
                    "AUROC.</p>", metric),
        html_table(shown1, "table1"),
        "<h3>Table 2 — ranking agreement (Kendall's tau)</h3>",
        f"<p class=cap>Kendall's tau-b between the candidates' synthetic and real AUROCs (averaged over tasks). "
        f"{html.escape(table2_note(tables.table2).replace('`', '').replace('*', ''))} mean_task_tau averages the "
        "per-task taus.</p>",
        html_table(tables.table2, "table2"),
    ]
    if tables.strategies is not None:
        parts += [metric_text("<h3>Strategies compared — real AUROC of the pick, regret, pick rate</h3>", metric),
                  f"<p class=cap>{html.escape(metric_text(STRATEGIES_NOTE, metric))}</p>",
                  html_table(tables.strategies, "strategies")]
    if tables.table3 is not None:
        parts += [
            "<h3>Table 3 — total variation between real and synthetic validation sets</h3>",
            "<p class=cap>TV = Σ|p_i − q_i| of k-means cluster histograms (0 = same, 2 = disjoint).</p>",
            html_table(tables.table3, "table3"),
        ]
    return parts


def _figures_html(figures: _ReportFigures) -> list[str]:
    """Figure 3 (drawn by the script, plus the PNG when present), Figure 4 when present, and the
    end of the overview section."""
    parts = [
        "<h3>Figure 3 — real vs synthetic AUROC per candidate</h3>",
        '<p class=cap>Mean over each dataset\'s tasks; one panel per dataset and setting; the dashed line is y = x. '
        'Synthetic source: <select id="fig3-source"></select></p>',
        '<div id="fig3" class="panels"></div>',
    ]
    if figures.figure3_png:
        parts.append(f'<details><summary>Figure 3 as rendered for the Markdown report</summary><img class="fig" alt="figure 3" src="{figures.figure3_png}"></details>')
    if figures.strategies_png:
        parts += ["<h3>Strategies compared — mean regret per strategy</h3>",
                  f'<img id="strategies-figure" class="fig" alt="strategies: mean regret" src="{figures.strategies_png}">']
    if figures.figure4_png:
        parts += ["<h3>Figure 4 — t-SNE of one task per dataset</h3>",
                  f'<img id="figure4" class="fig" alt="figure 4" src="{figures.figure4_png}">']
    parts.append("</section>")
    return parts


def _tasks_html(thumb_size: int, max_per_generator: int, n_real: int) -> list[str]:
    """The tasks section (filled by the script from the task payloads) and the footer."""
    return [
        '<section id="tasks"><h2>Tasks</h2>',
        '<p><input id="task-search" type="search" placeholder="search a class name…" autocomplete="off" size="40"> '
        '<span id="task-count"></span></p>',
        '<div class="task-layout"><ul id="task-list"></ul><div id="task-view"><p class=cap>Open a task to see its '
        "images and results.</p></div></div></section></main>",
        f'<footer>Written by swsa. Thumbnails {thumb_size} px; up to {max_per_generator} synthetic images per generator '
        f"and {n_real} real normal / anomalous images per task are shown.</footer>",
    ]
