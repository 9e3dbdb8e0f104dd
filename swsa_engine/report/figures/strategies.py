"""The strategies figure: mean regret of each selection strategy's pick with its bootstrap 95 %
interval, one panel per setting (from :func:`swsa_engine.core.strategy_comparison.strategies_table`)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.metric_cube import DEFAULT_METRIC, check_metric
from swsa_engine.core.strategy_comparison import strategies_table
from swsa_engine.report.figures.registry import register_figure

__all__ = ["strategies_figure"]


@register_figure("strategies")
def strategies_figure(cube: AurocCube, path: str | os.PathLike, table: pd.DataFrame | None = None) -> Path:
    """Mean regret (best real AUROC − real AUROC of the pick) per strategy with its bootstrap
    interval, one panel per setting, one colour per dataset (and "all" when there are several);
    lower is better, 0 = always a best candidate. ``table``: the comparison already computed
    (default: :func:`strategies_table` of ``cube``). Writes the PNG to ``path`` and returns it. A cube of
    :func:`~swsa_engine.core.metric_cube.metric_cube` (``config["metric"]``) names its metric instead of AUROC."""
    label = check_metric(cube.config.get("metric", DEFAULT_METRIC)).selection_label
    table = strategies_table(cube) if table is None else table
    strategies = list(dict.fromkeys(table["strategy"]))
    datasets = list(dict.fromkeys(table["dataset"]))
    fig = Figure(figsize=(6.4 * len(SETTINGS), 1.2 + 0.38 * len(strategies) * max(1, len(datasets) ** 0.5)))
    axes = fig.subplots(1, len(SETTINGS), squeeze=False, sharey=True)[0]
    colours = matplotlib.colormaps["tab10"]
    step = 0.7 / max(1, len(datasets))
    for ax, setting in zip(axes, SETTINGS):
        for d, dataset in enumerate(datasets):
            rows = table[(table["setting"] == setting) & (table["dataset"] == dataset)].set_index("strategy")
            rows = rows.reindex(strategies)
            y = np.arange(len(strategies)) - 0.35 + step * (d + 0.5)
            mean = rows["mean_regret"].to_numpy(dtype=np.float64)
            err = np.abs(np.stack([mean - rows["regret_ci_low"].to_numpy(dtype=np.float64),
                                   rows["regret_ci_high"].to_numpy(dtype=np.float64) - mean]))
            ax.errorbar(mean, y, xerr=err, fmt="o", color=colours(d % 10), ecolor=colours(d % 10), capsize=3,
                        markersize=5, label=str(dataset))
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_yticks(np.arange(len(strategies)))
        ax.set_yticklabels(strategies, fontsize=8)
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel(f"mean regret (best real {label} − pick's real {label})")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # the first strategy on top (the panels share the y axis)
    if len(datasets) > 1:
        axes[-1].legend(fontsize=7, loc="lower right", title="dataset", title_fontsize=7)
    fig.suptitle("Regret of each strategy's pick (mean over tasks, bootstrap 95 % interval; lower is better)",
                 fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
