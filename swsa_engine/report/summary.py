"""The report: Markdown, CSV and JSON tables in the shape of the paper's Tables 1 and 2, per-task
picks, recorded skips, and the Figure-3 scatter of real vs synthetic AUROC per candidate."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from swsa_engine.core.selection import per_task_picks, ranking_table, selection_table
from swsa_engine.run.sweep import SETTINGS, AurocCube


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    formats = formats or {}
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    lines = [header, rule]
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            spec = formats.get(column)
            if spec and isinstance(value, (float, np.floating)) and not np.isnan(value):
                cells.append(format(value, spec))
            else:
                cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table1_display(table1: pd.DataFrame) -> pd.DataFrame:
    """Table 1 with "picks / tasks" strings, as printed in the paper."""
    shown = table1.copy()
    shown["pick rate"] = [
        "–" if s.startswith("Best model") or s.endswith("(oracle)") else (f"{p:.0f} / {n}" if float(p).is_integer() else f"{p:.1f} / {n}")
        for s, p, n in zip(shown["strategy"], shown["picks"], shown["tasks"])
    ]
    return shown[["dataset", "setting", "strategy", "pick rate", "auroc", "best"]].rename(
        columns={"auroc": "AUROC of pick", "best": "best possible"}
    )


def detector_families(cube: AurocCube) -> list[str]:
    """The detector family of every candidate ("knn", "gaussian", "residual", "nagl", "pca",
    "patch", "imported", ...), from the cube's ``detector`` column (knn for old cubes)."""
    from swsa_engine.core.detectors import parse_detector

    if "detector" not in cube.candidates:
        return ["knn"] * len(cube.candidates)
    families = []
    for label in cube.candidates["detector"]:
        try:
            families.append(parse_detector(label).family)
        except Exception:  # imported scores, or a detector this installation does not register
            families.append(str(label).split("(")[0])
    return families


def figure3(cube: AurocCube, path: str | os.PathLike) -> Path:
    """Real vs synthetic AUROC (averaged over tasks) per candidate: one panel per setting ×
    base source, one marker colour per detector family, one marker shape per dataset,
    candidates labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s]) or cube.sources[:1]
    datasets = sorted(cube.tasks["dataset"].unique())
    fig, axes = plt.subplots(len(SETTINGS), max(1, len(base)), figsize=(5.2 * max(1, len(base)), 4.6 * len(SETTINGS)),
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    families = np.array(detector_families(cube))
    family_names = sorted(set(families))
    markers = "osD^vP*Xh<>p"
    for s, setting in enumerate(SETTINGS):
        for b, source in enumerate(base):
            ax = axes[s, b]
            v = cube.sources.index(source)
            for d, dataset in enumerate(datasets):
                rows = cube.tasks["dataset"].to_numpy() == dataset
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a candidate with no finite AUROC: NaN
                    x = np.nanmean(cube.synthetic[rows, :, v], axis=0)
                    y = np.nanmean(cube.real[rows, :, s], axis=0)
                for f, family in enumerate(family_names):
                    chosen = families == family
                    if not chosen.any():
                        continue
                    ax.scatter(x[chosen], y[chosen], color=colours(f % 10), marker=markers[d % len(markers)], s=36,
                               edgecolor="black", linewidth=0.4)
                for name, xi, yi in zip(cube.candidate_names, x, y):
                    if np.isfinite(xi) and np.isfinite(yi):
                        ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
            finite = np.concatenate([ax.collections[i].get_offsets().data.ravel() for i in range(len(ax.collections))])
            finite = finite[np.isfinite(finite)]
            if finite.size:
                lo, hi = float(finite.min()), float(finite.max())
                pad = max(0.02, 0.05 * (hi - lo))
                ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", linewidth=0.8, linestyle="--")
            ax.set_title(f"{setting} · {source}", fontsize=10)
            ax.set_xlabel("synthetic validation AUROC")
            ax.set_ylabel("real validation AUROC")
            ax.grid(alpha=0.3)
            if s == 0 and b == 0:  # one legend: colours = detector families, shapes = datasets
                from matplotlib.lines import Line2D

                handles = [Line2D([], [], linestyle="", marker="o", color=colours(f % 10), markeredgecolor="black",
                                  label=family) for f, family in enumerate(family_names)]
                if len(datasets) > 1:
                    handles += [Line2D([], [], linestyle="", marker=markers[d % len(markers)], color="lightgrey",
                                       markeredgecolor="black", label=dataset) for d, dataset in enumerate(datasets)]
                ax.legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle("Real vs synthetic AUROC per candidate (mean over tasks; colour = detector family, "
                 "marker = dataset)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Markdown formats of Table 2's p-value columns (the other floats get 3 decimals).
_TABLE2_FORMATS = {"p_value": ".3g", "bonferroni_threshold": ".3g"}


@dataclass
class _ReportTables:
    """The DataFrames a report shows: Tables 1 and 2 and the per-task picks (one row per task ×
    setting), every recorded skip, and Table 3 where it was computed (None otherwise)."""

    table1: pd.DataFrame
    table2: pd.DataFrame
    picks: pd.DataFrame
    skips: pd.DataFrame
    table3: pd.DataFrame | None = None


#: What the report says of candidates whose embeddings were made with ``weights="random"``.
RANDOM_CANDIDATES_NOTE = ("They were built with random weights, as asked for (`--weights random`, or by the digits demo "
                          "where no pretrained weights were found), so their AUROCs describe random networks, not "
                          "pretrained models.")


def _random_candidates(cube: AurocCube) -> list[str]:
    """The candidates scored with randomly initialised weights (``weights_kind == "random"``)."""
    return cube.candidates.loc[cube.candidates["weights_kind"] == "random", "name"].tolist()


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
) -> dict[str, Path]:
    """Write ``report.md``, ``table1.csv/.md``, ``table2.csv/.md``, ``tasks.csv``, ``summary.json``
    and ``figure3.png`` into ``out_dir``; returns their paths.

    With ``store_path``: ``table3_tasks > 0`` adds Table 3 (total variation, that many tasks per
    dataset) and ``figure4=True`` the t-SNE figure, both for ``candidate`` (default ViT-B/16).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "table1_csv": out / "table1.csv", "table2_csv": out / "table2.csv", "tasks_csv": out / "tasks.csv",
        "figure3": out / "figure3.png", "summary": out / "summary.json", "report": out / "report.md",
        "skips_csv": out / "skips.csv",
    }
    tables = _write_cube_tables(cube, store_skips, paths)
    if store_path is not None:
        tables.table3 = _write_store_figures(cube, store_path, out, paths, table3_tasks=table3_tasks,
                                             figure4=figure4, candidate=candidate)
    random_candidates = _random_candidates(cube)
    lines = _intro_lines(cube, title, notes, random_candidates) + _table_lines(tables)
    if "figure4" in paths:
        lines += ["## Figure 4 — t-SNE of one task per dataset", "", "![figure 4](figure4.png)", ""]
    if store_path is not None:  # prompt selection and BLISS blocks, when those cubes exist
        from swsa_engine.run.prompt_sweep import clip_report_lines

        lines += clip_report_lines(store_path, out, paths)
    lines += _picks_lines(cube, tables.picks) + _skips_lines(tables.skips)
    paths["report"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_summary(cube, tables, random_candidates, paths["summary"])
    (out / "table1.md").write_text(markdown_table(table1_display(tables.table1)) + "\n", encoding="utf-8")
    (out / "table2.md").write_text(markdown_table(tables.table2, _TABLE2_FORMATS) + "\n", encoding="utf-8")
    return paths


def _write_cube_tables(cube: AurocCube, store_skips: pd.DataFrame | None, paths: dict[str, Path]) -> _ReportTables:
    """Compute Tables 1 and 2, the per-task picks and the skips from ``cube`` (and the store's
    ``store_skips``), and write them and Figure 3 to ``paths``."""
    tables = _ReportTables(selection_table(cube), ranking_table(cube), per_task_picks(cube), _all_skips(cube, store_skips))
    tables.table1.to_csv(paths["table1_csv"], index=False)
    tables.table2.to_csv(paths["table2_csv"], index=False)
    tables.picks.to_csv(paths["tasks_csv"], index=False)
    figure3(cube, paths["figure3"])
    tables.skips.to_csv(paths["skips_csv"], index=False)
    return tables


def _write_store_figures(cube: AurocCube, store_path: str | os.PathLike, out: Path, paths: dict[str, Path], *,
                         table3_tasks: int, figure4: bool, candidate: str | None) -> pd.DataFrame | None:
    """Write Table 3 (when ``table3_tasks > 0``) and Figure 4 (when ``figure4``), which read the
    store's embeddings, adding their paths to ``paths``; returns Table 3 or None."""
    table3 = None
    if table3_tasks > 0:
        from swsa_engine.report.distribution import tv_table

        table3 = tv_table(store_path, cube, candidate=candidate, tasks_per_dataset=table3_tasks)
        paths["table3_csv"] = out / "table3.csv"
        table3.to_csv(paths["table3_csv"], index=False)
    if figure4:
        from swsa_engine.report.distribution import figure4 as draw_figure4

        paths["figure4"] = draw_figure4(store_path, cube, out / "figure4.png", candidate=candidate)
    return table3


def _intro_lines(cube: AurocCube, title: str, notes: list[str] | None, random_candidates: list[str]) -> list[str]:
    """The report's title, its warning about random candidates, the notes and one sentence on
    what was scored."""
    lines = [f"# {title}", ""]
    if random_candidates:
        lines += [
            f"> **Randomly initialised candidates:** {', '.join(random_candidates)}. {RANDOM_CANDIDATES_NOTE}", "",
        ]
    for note in notes or []:
        lines += [note, ""]
    lines += [
        f"{len(cube.tasks)} tasks over {cube.tasks['dataset'].nunique()} dataset(s); {len(cube.candidates)} candidates: "
        f"{', '.join(cube.candidate_names)}; synthetic validation sources: {', '.join(cube.sources)}. "
        + (f"Detectors: {', '.join(cube.config['detectors'])}." if cube.config.get("detectors")
         else f"kNN score with k = {cube.config.get('k')}."),
        "",
    ]
    return lines


def _table_lines(tables: _ReportTables) -> list[str]:
    """Tables 1 and 2, Figure 3, and Table 3 when it was computed, as Markdown sections."""
    table2 = tables.table2
    lines = [
        "## Table 1 — model selection",
        "",
        "Pick rate = tasks where the strategy picks a candidate with the best real AUROC (ties count), "
        "AUROC of pick = mean real AUROC of the picked candidate, best possible = mean of the best real AUROC.",
        "",
        markdown_table(table1_display(tables.table1)),
        "",
        "## Table 2 — ranking agreement (Kendall's tau)",
        "",
        "Kendall's tau-b between the candidates' synthetic and real AUROCs (each averaged over the tasks), "
        "with p-values; " + _significance_note(table2) + " `mean_task_tau` averages the per-task taus.",
        "",
        markdown_table(table2.assign(significant=table2["significant"].map({True: "**yes**", False: "no"})),
                       _TABLE2_FORMATS),
        "",
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


def _picks_lines(cube: AurocCube, picks: pd.DataFrame) -> list[str]:
    """The per-task picks section: what ``tasks.csv`` holds, and its rows when there are at
    most 40 tasks."""
    lines = [
        "## Per-task picks",
        "",
        f"`tasks.csv` has {len(picks)} rows: per task and setting, SWSA's pick on `{picks['source'].iloc[0] if len(picks) else ''}`, "
        "the oracle's pick and their real AUROCs.",
        "",
    ]
    if 0 < len(cube.tasks) <= 40:
        shown = picks[["normal_class", "setting", "swsa_pick", "swsa_pick_real_auroc", "oracle_pick", "oracle_real_auroc", "hit"]]
        lines += [markdown_table(shown.rename(columns={"normal_class": "normal class", "swsa_pick": "SWSA pick",
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


def _write_summary(cube: AurocCube, tables: _ReportTables, random_candidates: list[str], path: Path) -> None:
    """``summary.json``: the run's shape and config, and Tables 1 to 3 as lists of records."""
    summary = {
        "tasks": len(cube.tasks), "candidates": cube.candidate_names, "sources": cube.sources, "config": cube.config,
        "random_candidates": random_candidates, "skips": int(len(tables.skips)),
        "table3": None if tables.table3 is None else tables.table3.to_dict(orient="records"),
        "table1": tables.table1.to_dict(orient="records"), "table2": tables.table2.to_dict(orient="records"),
    }
    path.write_text(json.dumps(summary, indent=2, default=_json_default), encoding="utf-8")


def _significance_note(table2: pd.DataFrame) -> str:
    n_tests = int(table2["p_value"].notna().sum()) if len(table2) else 0
    if n_tests == 0:
        return "no test could be computed (fewer than two candidates with finite AUROCs, or constant AUROCs)."
    threshold = float(table2["bonferroni_threshold"].iloc[0])
    return f"**significant** after Bonferroni correction means p < {threshold:.3g} (0.05 / {n_tests} tests)."


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def _all_skips(cube: AurocCube, store_skips: pd.DataFrame | None) -> pd.DataFrame:
    parts = []
    if store_skips is not None and len(store_skips):
        parts.append(store_skips.assign(candidate=store_skips["backbone"])[["stage", "image_id", "task_id", "candidate", "reason"]])
    if len(cube.skips):
        parts.append(cube.skips.assign(stage="score", image_id=-1)[["stage", "image_id", "task_id", "candidate", "reason"]])
    if not parts:
        return pd.DataFrame(columns=["stage", "image_id", "task_id", "candidate", "reason"])
    return pd.concat(parts, ignore_index=True)
