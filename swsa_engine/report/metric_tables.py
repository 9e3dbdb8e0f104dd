"""The report's tables of the field's metrics: every candidate's real AUROC, AUPR, F1-max and
FPR@95TPR (``metrics.csv``), how the label-free thresholds of each task's recommended pick fare on
the labelled test images (``thresholds.csv``), and what a ``--metric`` selection says about itself.

Numbers come from the cube's per-image scores (:mod:`swsa_engine.core.metric_cube`,
:mod:`swsa_engine.core.threshold_comparison`); without them each section says so.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.metric_cube import check_metric, metric_cube, metric_strategies, real_metrics
from swsa_engine.core.recommendation import RECOMMENDED, RECOMMENDED_LABEL
from swsa_engine.core.selection import as_weights, create_strategy, selection_context
from swsa_engine.core.strategy_comparison import selection_tables
from swsa_engine.core.threshold_comparison import DEFAULT_QUANTILES, THRESHOLD_RULES, first_picks, threshold_comparison
from swsa_engine.report.html_format import html_table
from swsa_engine.report.tables import markdown_table, write_csv

__all__ = ["METRIC_COLUMNS", "candidate_metrics", "metrics_summary", "recommended_thresholds", "thresholds_summary",
           "metric_report_lines", "metric_note", "metric_lines", "metric_text", "metric_display", "NO_SCORES_NOTE",
           "metric_tables_for", "metric_html"]

#: the metric columns of ``metrics.csv`` (raw values: FPR@95TPR lower is better) and their labels
METRIC_COLUMNS = {"auroc": "AUROC", "aupr": "AUPR", "f1_max": "F1-max", "fpr_at_95_tpr": "FPR@95TPR"}
#: what the sections say when the cube holds no per-image scores
NO_SCORES_NOTE = "needs the per-image scores of the cube, which it does not hold (re-run `swsa score`)."


def candidate_metrics(cube: AurocCube) -> pd.DataFrame | None:
    """One row per task × setting × candidate: real ``auroc`` (the cube's), ``aupr``, ``f1_max``,
    ``fpr_at_95_tpr`` (:func:`~swsa_engine.core.metric_cube.real_metrics`, the settings of the
    cube) and ``anomaly_share`` (the share of anomalies in the one-vs-rest test set: a random
    detector's AUPR); None without per-image scores."""
    scores = cube.scores
    if scores is None or list(scores.candidates) != cube.candidate_names:
        return None
    values = real_metrics(scores)
    n_tasks, n_candidates = len(cube.tasks), len(cube.candidates)
    labelled = (scores.real_label >= 0) & scores.real_in_rest
    with np.errstate(invalid="ignore", divide="ignore"):
        share = ((scores.real_label == 1) & labelled).sum(1) / labelled.sum(1)
    parts = []
    for s, setting in enumerate(SETTINGS):
        frame = pd.DataFrame({
            "task_id": np.repeat(cube.tasks["task_id"].to_numpy(), n_candidates),
            "dataset": np.repeat(cube.tasks["dataset"].to_numpy(), n_candidates),
            "normal_class": np.repeat(cube.tasks["normal_class"].to_numpy(), n_candidates),
            "setting": setting, "candidate": np.tile(np.asarray(cube.candidate_names, dtype=object), n_tasks),
            "auroc": cube.real[:, :, s].reshape(-1),
            **{key: values[key]["real"][:, :, s].reshape(-1) for key in METRIC_COLUMNS if key != "auroc"},
            "anomaly_share": np.repeat(share, n_candidates) if s == 0 else np.nan,
        })
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def metrics_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset × candidate (cube order), the mean over tasks of each metric of each setting
    (columns ``<metric> (<setting>)``) and the number of tasks."""
    order = {c: i for i, c in enumerate(dict.fromkeys(table["candidate"]))}
    means = table.groupby(["dataset", "setting", "candidate"], sort=False)[list(METRIC_COLUMNS)].mean()
    wide = means.unstack("setting")
    wide.columns = [f"{METRIC_COLUMNS[m]} ({setting})" for m, setting in wide.columns]
    shown = [f"{METRIC_COLUMNS[m]} ({setting})" for setting in SETTINGS for m in METRIC_COLUMNS]
    wide = wide.reindex(columns=[c for c in shown if c in wide.columns]).reset_index()
    tasks = table.groupby(["dataset", "candidate"], sort=False)["task_id"].nunique().rename("tasks").reset_index()
    wide = wide.merge(tasks, on=["dataset", "candidate"])
    wide = wide.sort_values(["dataset", "candidate"], key=lambda c: c.map(order) if c.name == "candidate" else c,
                            kind="stable")
    return wide[["dataset", "candidate", "tasks", *[c for c in wide.columns if "(" in c]]].reset_index(drop=True)


def recommended_thresholds(cube: AurocCube, quantiles: tuple[float, ...] = DEFAULT_QUANTILES) -> pd.DataFrame | None:
    """The threshold comparison (:func:`~swsa_engine.core.threshold_comparison.threshold_comparison`)
    of each task's ``recommended`` pick (chosen per dataset, as Table 1 does, among its ties the first
    candidate), with ``dataset`` and ``normal_class``; None without per-image scores."""
    scores = cube.scores
    if scores is None or list(scores.candidates) != cube.candidate_names:
        return None
    weights = np.full((len(cube.tasks), len(cube.candidates)), np.nan)
    for dataset in sorted(cube.tasks["dataset"].unique()):
        rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset)
        ctx = selection_context(cube, rows, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fallback is stated in Table 1's run already
            weights[rows] = as_weights(create_strategy(RECOMMENDED)(ctx), len(cube.candidates))
    table = threshold_comparison(scores, first_picks(weights), quantiles=quantiles)
    info = cube.tasks.set_index("task_id")
    table.insert(1, "dataset", info.loc[table["task_id"], "dataset"].to_numpy())
    table.insert(2, "normal_class", info.loc[table["task_id"], "normal_class"].to_numpy())
    return table


def thresholds_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and rule: tasks with a defined threshold (of all) and the mean stated FPR, real
    precision, recall and FPR over those tasks."""
    columns = ["stated_fpr", "real_precision", "real_recall", "real_fpr"]
    order = {r: i for i, r in enumerate(dict.fromkeys(table["rule"]))}
    table = table.assign(defined=np.isfinite(table["threshold"]))
    grouped = table.groupby(["dataset", "rule"], sort=False)
    out = grouped[columns].mean().join(grouped["defined"].sum().rename("defined")).join(grouped.size().rename("tasks"))
    out = out.reset_index()
    out["tasks"] = [f"{int(d)} / {int(n)}" for d, n in zip(out["defined"], out["tasks"])]
    out = out.sort_values(["dataset", "rule"], key=lambda c: c.map(order) if c.name == "rule" else c, kind="stable")
    return out[["dataset", "rule", "tasks", *columns]].reset_index(drop=True)


def metric_note(metric: str) -> str:
    """The sentence saying which metric Table 1 and the strategies comparison use."""
    spec = check_metric(metric)
    if spec.key is None:
        return ""
    oriented = (f" {spec.label} is lower-is-better, so selection and these tables use {spec.selection_label} = "
                f"1 − {spec.label} (higher is better; regret = best − pick as for AUROC)." if spec.lower_is_better else "")
    return (f"**Selection metric: {spec.label}** (`--metric {metric}`). Table 1 and the strategies comparison select by "
            f"the synthetic {spec.label} and measure the pick by its real {spec.label} (columns keep their AUROC names "
            f"in the CSV files).{oriented} The recommendation ({RECOMMENDED_LABEL}) keeps its rule, a bootstrap test of "
            f"synthetic AUROCs; its pick is measured in {spec.label}. Table 2, Figure 3 and the per-task picks stay in AUROC.")


def metric_lines(metric: str) -> list[str]:
    """:func:`metric_note` as report lines (none for AUROC)."""
    note = metric_note(metric)
    return [note, ""] if note else []


def metric_text(text: str, metric: str) -> str:
    """A caption of Table 1 or the strategies with "AUROC" replaced by the selection metric's label."""
    label = check_metric(metric).selection_label
    return text if label == "AUROC" else text.replace("AUROC", label)


def metric_display(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A display table (Table 1's, the strategies') with "AUROC" in its headers replaced by the
    selection metric's label."""
    return frame.rename(columns=lambda c: metric_text(str(c), metric))


def metric_report_lines(cube: AurocCube, out: Path, paths: dict[str, Path]) -> list[str]:
    """Write ``metrics.csv`` and ``thresholds.csv`` into ``out`` (their paths added to ``paths``) and
    return their Markdown sections."""
    lines = ["## The field's metrics per candidate — real AUROC, AUPR, F1-max, FPR@95TPR", ""]
    table = candidate_metrics(cube)
    if table is None:
        lines += [f"These metrics {NO_SCORES_NOTE}", ""]
    else:
        paths["metrics_csv"] = out / "metrics.csv"
        write_csv(table, paths["metrics_csv"])
        shares = table.loc[table["setting"] == SETTINGS[0]].groupby("dataset")["anomaly_share"].mean()
        lines += [
            "Mean over tasks of each candidate's real metrics in both settings (one-vs-closest: the worst class, "
            "as for AUROC). AUPR = average precision; F1-max = best F1 over thresholds; FPR@95TPR = false-positive "
            "rate at the first threshold reaching 95 % recall (lower is better). A random detector's AUPR is the "
            "share of anomalies (one-vs-rest: " + ", ".join(f"{d} {v:.3f}" for d, v in shares.items()) + "). "
            f"Per task in `metrics.csv` ({len(table)} rows).", "",
            markdown_table(metrics_summary(table)), "",
        ]
    return lines + _threshold_lines(cube, out, paths)


def _threshold_lines(cube: AurocCube, out: Path, paths: dict[str, Path]) -> list[str]:
    """Write ``thresholds.csv``; the threshold comparison's Markdown section."""
    lines = [f"## Label-free thresholds on the real test images — {RECOMMENDED_LABEL} pick", ""]
    table = recommended_thresholds(cube)
    if table is None:
        return lines + [f"The threshold comparison {NO_SCORES_NOTE}", ""]
    paths["thresholds_csv"] = out / "thresholds.csv"
    write_csv(table, paths["thresholds_csv"])
    rules = "; ".join(f"`{name}`: {what}" for name, (what, _) in THRESHOLD_RULES.items())
    lines += [
        f"Per task, the thresholds of its recommended pick (decision: anomaly when score ≥ threshold), chosen without "
        f"real labels except the last: {rules}. The normal quantiles' stated FPR is 1 − q (undefined with fewer than "
        "q / (1 − q) held-out normals: 99 for q = 0.99); `synthetic_f1` states its FPR on the "
        "held-out normals. Real precision, recall and FPR on the one-vs-rest test images; per task in "
        f"`thresholds.csv` ({len(table)} rows). Mean over the tasks where the threshold is defined:", "",
        markdown_table(thresholds_summary(table)), "",
    ]
    if 0 < table["task_id"].nunique() <= 20:
        shown = table[["normal_class", "candidate", "rule", "threshold", "stated_fpr", "real_precision", "real_recall",
                       "real_fpr"]]
        lines += [markdown_table(shown.rename(columns={"normal_class": "normal class", "stated_fpr": "stated FPR",
                                                       "real_precision": "precision", "real_recall": "recall",
                                                       "real_fpr": "real FPR"})), ""]
    return lines



def metric_tables_for(cube: AurocCube, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 1 and the strategies comparison of ``cube`` selected and measured by ``metric``
    (:func:`~swsa_engine.core.metric_cube.metric_cube`; for AUROC, ``cube``'s own)."""
    ranked, strategies = metric_cube(cube, metric), metric_strategies(cube, metric)
    return selection_tables(ranked, strategies)  # one run of the strategies for both tables


def metric_html(cube: AurocCube, metrics: pd.DataFrame | None, thresholds: pd.DataFrame | None) -> list[str]:
    """The HTML report's sections of ``metrics.csv`` and ``thresholds.csv`` (each computed from
    ``cube`` when not given), as the Markdown report shows them."""
    metrics = candidate_metrics(cube) if metrics is None else metrics
    thresholds = recommended_thresholds(cube) if thresholds is None else thresholds
    parts = ["<h3>The field's metrics per candidate — real AUROC, AUPR, F1-max, FPR@95TPR</h3>"]
    if metrics is None or not len(metrics):
        parts.append(f"<p class=cap>These metrics {html.escape(NO_SCORES_NOTE.replace('`', ''))}</p>")
    else:
        parts += ["<p class=cap>Mean over tasks of each candidate's real metrics (one-vs-closest: the worst class); "
                  "FPR@95TPR is lower-is-better. Per task in metrics.csv.</p>",
                  html_table(metrics_summary(metrics), "metrics")]
    parts.append(f"<h3>Label-free thresholds on the real test images — {html.escape(RECOMMENDED_LABEL)} pick</h3>")
    if thresholds is None or not len(thresholds):
        parts.append(f"<p class=cap>The threshold comparison {html.escape(NO_SCORES_NOTE.replace('`', ''))}</p>")
    else:
        parts += ["<p class=cap>Mean real precision, recall and FPR of each threshold rule over the tasks where it is "
                  "defined; only real_f1_max reads the real labels. Per task in thresholds.csv.</p>",
                  html_table(thresholds_summary(thresholds), "thresholds")]
    return parts
