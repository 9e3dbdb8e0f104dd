"""The report's tables as DataFrames and Markdown, shared by the Markdown report
(:mod:`swsa_engine.report.summary`), the HTML report (:mod:`swsa_engine.report.html`) and the
command line: Table 1's and the strategies comparison's display forms, Table 2's verdict note,
Markdown tables, every recorded skip in one table, the candidates built with random weights, and
each candidate's detector family."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from swsa_store.csv_safe import FORMULA_START, csv_cell, read_csv, write_csv  # noqa: F401 (re-exported: the one CSV rule)

from swsa_engine.core.cube import AurocCube
from swsa_engine.core.selection import VERDICTS
from swsa_engine.core.strategy_comparison import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL
from swsa_engine.core.detectors import parse_detector

__all__ = [
    "fmt_cell", "markdown_table", "table1_display", "detector_families", "ReportTables", "TABLE2_FORMATS",
    "RANDOM_CANDIDATES_NOTE", "random_candidates", "all_skips", "SKIP_TABLE_COLUMNS", "strategies_display",
    "table2_display", "table2_note", "STRATEGIES_NOTE", "csv_cell", "write_csv", "read_csv", "md_cell",
    "FORMULA_START",
]

#: Markdown formats of Table 2's p-value columns (the other floats get 3 decimals).
TABLE2_FORMATS = {"p_value": ".3g", "p_one_sided": ".3g", "bonferroni_threshold": ".3g"}

#: What the strategies comparison shows (Markdown and HTML captions).
STRATEGIES_NOTE = (
    f"Per strategy and setting, over the tasks: the mean real AUROC of the pick, the mean regret (best real AUROC "
    f"among the candidates − real AUROC of the pick, per task; 0 = always a best candidate) and the pick rate (share "
    f"of tasks where the pick is a best candidate, ties count), each with a percentile bootstrap "
    f"{CI_LEVEL:.0%} interval over tasks ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}). The random pick "
    f"is its expected value over the candidates, not one draw; the oracle reads the real labels (upper bound).")

#: What the report says of candidates whose embeddings were made with ``weights="random"``.
RANDOM_CANDIDATES_NOTE = ("They were built with random weights, as asked for (`--weights random`, or by the digits demo "
                          "where no pretrained weights were found), so their AUROCs describe random networks, not "
                          "pretrained models.")

#: The columns of the report's skips table (``skips.csv``).
SKIP_TABLE_COLUMNS = ["stage", "image_id", "task_id", "candidate", "reason"]


def md_cell(text) -> str:
    """``text`` safe inside a Markdown table cell: ``|`` escaped, line breaks as spaces, ``<`` as ``&lt;``."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
    return " ".join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


def fmt_cell(value, digits: int = 3) -> str:
    """A Markdown cell: floats with ``digits`` decimals ("–" for NaN), anything else as ``str``
    made safe by :func:`md_cell`."""
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:.{digits}f}"
    return md_cell(value)


def markdown_table(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency); ``formats`` maps a column to the
    format spec of its finite floats."""
    formats = formats or {}
    header = "| " + " | ".join(map(md_cell, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    lines = [header, rule]
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            spec = formats.get(column)
            if spec and isinstance(value, (float, np.floating)) and not np.isnan(value):
                cells.append(format(value, spec))
            else:
                cells.append(fmt_cell(value))
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


def table2_display(table2: pd.DataFrame) -> pd.DataFrame:
    """Table 2 as the Markdown report prints it: ``agrees`` as **yes** / no."""
    return table2.assign(agrees=table2["agrees"].map({True: "**yes**", False: "no"}))


def table2_note(table2: pd.DataFrame) -> str:
    """What Table 2's p-values, ``agrees`` and ``verdict`` mean, with the Bonferroni threshold."""
    n_tests = int(table2["p_value"].notna().sum()) if len(table2) else 0
    if n_tests == 0:
        return "No test could be computed (fewer than two candidates with finite AUROCs, or constant AUROCs)."
    threshold = float(table2["bonferroni_threshold"].iloc[0])
    return (f"`p_value` is the paper's two-sided p; `p_one_sided` tests the alternative tau > 0 (\"the synthetic "
            f"ranking agrees with the real one\"). **agrees** means p_one_sided < {threshold:.3g} (0.05 / {n_tests} "
            f"tests, Bonferroni); a negative tau never agrees. Verdicts: "
            + "; ".join(f"*{name}*: {meaning}" for name, meaning in VERDICTS.items()) + ".")


def strategies_display(table: pd.DataFrame) -> pd.DataFrame:
    """The strategies comparison with each measure and its interval in one "mean [low, high]" cell."""
    def cell(mean, low, high) -> list[str]:
        return [fmt_cell(m) if np.isnan(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
                for m, lo, hi in zip(table[mean], table[low], table[high])]

    return pd.DataFrame({
        "dataset": table["dataset"], "setting": table["setting"], "strategy": table["strategy"],
        "tasks": table["n_tasks"], "real AUROC of pick [95% CI]": cell("mean_real_auroc", "ci_low", "ci_high"),
        "regret [95% CI]": cell("mean_regret", "regret_ci_low", "regret_ci_high"),
        "pick rate [95% CI]": cell("pick_rate", "pick_rate_ci_low", "pick_rate_ci_high"),
    })


def detector_families(cube: AurocCube) -> list[str]:
    """The detector family of every candidate ("knn", "gaussian", "residual", "nagl", "pca",
    "patch", "imported", ...), from the cube's ``detector`` column (knn for old cubes). A label
    that no registered detector parses (imported scores, or a detector this installation does
    not register) counts as the family named by its text before "("."""
    if "detector" not in cube.candidates:
        return ["knn"] * len(cube.candidates)
    families = []
    for label in cube.candidates["detector"]:
        try:
            families.append(parse_detector(label).family)
        except (KeyError, ValueError, TypeError):  # not a registered detector label: the text before "("
            families.append(str(label).split("(")[0])
    return families


@dataclass
class ReportTables:
    """The DataFrames a report shows: Tables 1 and 2 and the per-task picks (one row per task ×
    setting), every recorded skip (:data:`SKIP_TABLE_COLUMNS`), Table 3 where it was computed
    (None otherwise), the strategies comparison (None where not computed), and the picks' label-free
    confidence and its correlation with the regret (``pick_confidence.csv`` and the distrust table of
    :mod:`swsa_engine.report.confidence`; None without per-image scores)."""

    table1: pd.DataFrame
    table2: pd.DataFrame
    picks: pd.DataFrame
    skips: pd.DataFrame
    table3: pd.DataFrame | None = None
    strategies: pd.DataFrame | None = None
    confidence: pd.DataFrame | None = None
    distrust: pd.DataFrame | None = None


def random_candidates(cube: AurocCube) -> list[str]:
    """The names of the candidates scored with randomly initialised weights (``weights_kind == "random"``)."""
    return cube.candidates.loc[cube.candidates["weights_kind"] == "random", "name"].tolist()


def all_skips(cube: AurocCube, store_skips: pd.DataFrame | None) -> pd.DataFrame:
    """Every recorded skip in one table with :data:`SKIP_TABLE_COLUMNS`: the store's (catalog,
    synthesis, embedding; their backbone as the candidate) then the cube's (stage "score", image -1)."""
    parts = []
    if store_skips is not None and len(store_skips):
        parts.append(store_skips.assign(candidate=store_skips["backbone"])[SKIP_TABLE_COLUMNS])
    if len(cube.skips):
        parts.append(cube.skips.assign(stage="score", image_id=-1)[SKIP_TABLE_COLUMNS])
    if not parts:
        return pd.DataFrame(columns=SKIP_TABLE_COLUMNS)
    return pd.concat(parts, ignore_index=True)
