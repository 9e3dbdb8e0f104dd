"""Figure 3: real vs synthetic AUROC (averaged over tasks) per candidate — the PNG of the Markdown
report (:func:`figure3`) and the numbers behind the HTML report's inline version (:func:`figure3_data`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.report.figures.registry import register_figure
from swsa_engine.report.tables import detector_families

__all__ = ["figure3", "figure3_data", "MAX_LABELS"]

MARKERS = "osD^vP*Xh<>p"
#: Candidates labelled per dataset in a panel: every one when there are at most this many, else
#: those with the highest mean synthetic AUROC (the ones a selection looks at); a label that
#: would overlap another (or leave its panel) at every place tried is left out.
MAX_LABELS = 10
#: Where a label may sit around its point (offset points, horizontal alignment), tried in order.
_LABEL_PLACES = ((3, 3, "left"), (3, -9, "left"), (-3, 3, "right"), (-3, -9, "right"),
                 (6, 10, "left"), (6, -16, "left"), (-6, 10, "right"), (-6, -16, "right"))


def _mean_over_tasks(values: np.ndarray) -> np.ndarray:
    """``nanmean`` over axis 0 with no warning for an all-NaN column (a candidate with no finite AUROC: NaN)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0)


@register_figure("figure3")
def figure3(cube: AurocCube, path: str | os.PathLike) -> Path:
    """Real vs synthetic AUROC (averaged over tasks) per candidate: one panel per setting ×
    base source, one marker colour per detector family, one marker shape per dataset,
    candidates labelled. Writes the PNG to ``path`` and returns it."""
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s]) or cube.sources[:1]
    datasets = sorted(cube.tasks["dataset"].unique())
    grow = min(1.0, max(0, len(cube.candidate_names) - MAX_LABELS) / 40)  # more candidates, larger panels (≤ 2x)
    fig = Figure(figsize=(5.2 * (1 + grow) * max(1, len(base)), 4.6 * (1 + grow) * len(SETTINGS)), dpi=110)
    axes = fig.subplots(len(SETTINGS), max(1, len(base)), squeeze=False)
    families = np.array(detector_families(cube))
    family_names = sorted(set(families))
    for s, setting in enumerate(SETTINGS):
        for b, source in enumerate(base):
            ax = axes[s, b]
            _draw_panel(ax, cube, s, cube.sources.index(source), datasets, families, family_names)
            ax.set_title(f"{setting} · {source}", fontsize=10)
            ax.set_xlabel("synthetic validation AUROC")
            ax.set_ylabel("real validation AUROC")
            ax.grid(alpha=0.3)
            if s == 0 and b == 0:  # one legend: colours = detector families, shapes = datasets
                ax.legend(handles=_legend_handles(family_names, datasets), fontsize=7, loc="lower right")
    labels = ("" if len(cube.candidate_names) <= MAX_LABELS else
              f"; labels: the {MAX_LABELS} highest synthetic AUROCs per dataset where they fit, every value in the HTML report")
    fig.suptitle("Real vs synthetic AUROC per candidate (mean over tasks; colour = detector family, "
                 f"marker = dataset{labels})", fontsize=11)
    fig.tight_layout()
    _place_labels(fig, axes.ravel())
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _draw_panel(ax, cube: AurocCube, s: int, v: int, datasets: list, families: np.ndarray, family_names: list) -> None:
    """One panel: per dataset, each candidate's mean synthetic AUROC on source ``v`` against its
    mean real AUROC in setting ``s``, coloured by detector family and labelled; then y = x."""
    colours = matplotlib.colormaps["tab10"]
    for d, dataset in enumerate(datasets):
        rows = cube.tasks["dataset"].to_numpy() == dataset
        x = _mean_over_tasks(cube.synthetic[rows, :, v])
        y = _mean_over_tasks(cube.real[rows, :, s])
        for f, family in enumerate(family_names):
            chosen = families == family
            if not chosen.any():
                continue
            ax.scatter(x[chosen], y[chosen], color=colours(f % 10), marker=MARKERS[d % len(MARKERS)], s=36,
                       edgecolor="black", linewidth=0.4)
        for c in _labelled(x, y, MAX_LABELS):
            ax.annotate(cube.candidate_names[c], (x[c], y[c]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    finite = np.concatenate([ax.collections[i].get_offsets().data.ravel() for i in range(len(ax.collections))])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        pad = max(0.02, 0.05 * (hi - lo))
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", linewidth=0.8, linestyle="--")


def _labelled(x: np.ndarray, y: np.ndarray, limit: int) -> list[int]:
    """The candidates to label, best mean synthetic AUROC first: every finite point when there
    are at most ``limit``, else the ``limit`` with the highest ``x`` (ties: the earlier candidate)."""
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    return [int(c) for c in finite[np.argsort(-x[finite], kind="stable")][:limit]]


def _place_labels(fig: Figure, axes) -> None:
    """Move each panel's labels, in the order drawn (best first), to the first place of
    :data:`_LABEL_PLACES` where they neither overlap a label already placed nor leave the panel;
    a label with no such place is hidden (its point stays)."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax in axes:
        frame = ax.get_window_extent(renderer)
        placed = []
        for label in ax.texts:
            for dx, dy, align in _LABEL_PLACES:
                label.xyann = (dx, dy)
                label.set_horizontalalignment(align)
                box = label.get_window_extent(renderer)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if inside and not any(box.overlaps(other) for other in placed):
                    placed.append(box)
                    break
            else:
                label.set_visible(False)


def _legend_handles(family_names: list, datasets: list) -> list:
    """Legend entries: one colour per detector family, and one marker per dataset when there are several."""
    colours = matplotlib.colormaps["tab10"]
    handles = [Line2D([], [], linestyle="", marker="o", color=colours(f % 10), markeredgecolor="black", label=family)
               for f, family in enumerate(family_names)]
    if len(datasets) > 1:
        handles += [Line2D([], [], linestyle="", marker=MARKERS[d % len(MARKERS)], color="lightgrey",
                           markeredgecolor="black", label=dataset) for d, dataset in enumerate(datasets)]
    return handles


def _floats(values) -> list:
    """Finite values as floats, the others as None (JSON null)."""
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def figure3_data(cube: AurocCube) -> dict:
    """Per dataset × setting: each candidate's mean real AUROC and mean synthetic AUROC per source,
    as ``{"candidates", "sources", "panels": [{"dataset", "setting", "real", "synthetic": {source: [...]}}]}``
    (None for a candidate with no finite AUROC) — what the HTML report draws as inline SVG."""
    out = {"candidates": cube.candidate_names, "sources": list(cube.sources), "panels": []}
    for dataset in sorted(cube.tasks["dataset"].unique()):
        rows = cube.tasks["dataset"].to_numpy() == dataset
        for s, setting in enumerate(SETTINGS):
            real = _mean_over_tasks(cube.real[rows, :, s])
            synthetic = {src: _mean_over_tasks(cube.synthetic[rows, :, v]) for v, src in enumerate(cube.sources)}
            out["panels"].append({
                "dataset": dataset, "setting": setting, "real": _floats(real),
                "synthetic": {k: _floats(v) for k, v in synthetic.items()},
            })
    return out
