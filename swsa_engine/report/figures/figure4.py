"""Figure 4: t-SNE of one task per dataset — its in-class images, each synthetic source and the
real one-vs-closest anomalies, in one candidate's embedding (the paper's Figure 4). The
embeddings are read through :func:`swsa_engine.run.report_inputs.task_embedding_reader`."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from swsa_engine.core.cube import AurocCube
from swsa_engine.report.distribution import default_candidate, sample_tasks
from swsa_engine.report.figures.registry import register_figure
from swsa_engine.run.report_inputs import TaskEmbeddings, task_embedding_reader

__all__ = ["figure4"]

MARKERS = ["o", "s", "D", "P", "X", "v"]


@register_figure("figure4")
def figure4(cube: AurocCube, path: str | os.PathLike, *, store_path: str | os.PathLike, candidate: str | None = None,
            seed: int = 0) -> Path:
    """t-SNE of one task per dataset (seeded choice) in the embedding ``candidate`` (default
    :func:`~swsa_engine.report.distribution.default_candidate`) of the store at ``store_path``:
    in-class images, each base synthetic source, and the real one-vs-closest anomalies. Writes the
    PNG to ``path`` and returns it."""
    candidate = candidate or default_candidate(cube)
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    rows = sample_tasks(cube, 1, seed)
    fig = Figure(figsize=(4.6 * max(1, len(rows)), 4.4))
    axes = fig.subplots(1, max(1, len(rows)), squeeze=False)
    with task_embedding_reader(store_path, cube, candidate) as read:
        for ax, row in zip(axes[0], rows):
            first = read(row, base[0] if base else "")
            sets = _point_sets(first, [read(row, source).synthetic for source in base], base)
            if _draw_panel(ax, sets, seed):
                ax.set_title(f"{cube.tasks['dataset'].iloc[row]} · {cube.tasks['normal_class'].iloc[row]}", fontsize=9)
                ax.set_xticks([]), ax.set_yticks([])
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"t-SNE of {candidate} embeddings (one-vs-closest anomalies)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _point_sets(first: TaskEmbeddings, synthetic: list[np.ndarray], base: list[str]) -> list[tuple]:
    """(label, (n, D) points, marker, colour) per set of one panel: in-class (support and real
    normals), each base source's synthetic anomalies, the real anomalies of the closest class."""
    colours = matplotlib.colormaps["tab10"]
    sets = [("in-class", np.concatenate([first.support, first.normals]), "^", "tab:orange")]
    for i, (source, points) in enumerate(zip(base, synthetic)):
        sets.append((source, points, MARKERS[i % len(MARKERS)], colours(2 + i)))
    sets.append((f"real anomalies ({first.closest})", first.anomalies, "v", "tab:blue"))
    return sets


def _draw_panel(ax, sets: list[tuple], seed: int) -> bool:
    """Embed every set's points together with t-SNE and scatter them per set; returns False for
    an empty panel (axis off) when there are fewer than 5 points."""
    points = np.concatenate([s[1] for s in sets if len(s[1])])
    if len(points) < 5:
        ax.set_axis_off()
        return False
    embedded = TSNE(n_components=2, perplexity=min(30.0, (len(points) - 1) / 3), random_state=seed,
                    init="pca").fit_transform(points.astype(np.float64))
    start = 0
    for label, values, marker, colour in sets:
        if len(values) == 0:
            continue
        chunk = embedded[start : start + len(values)]
        start += len(values)
        ax.scatter(chunk[:, 0], chunk[:, 1], marker=marker, s=14, color=colour, label=label, alpha=0.8)
    return True
