"""How close synthetic validation sets are to real ones: the paper's Table 3 (total variation,
Appendix B) and Figure 4 (t-SNE of one task's embeddings).

Total variation (Sajjadi et al. 2018, as in the SWSA paper's Appendix B): embed both sets,
cluster their union with k-means (k = round(sqrt(|D1| + |D2|))), histogram each set's cluster
assignments, normalise, and sum the absolute differences: TV = Σ_i |p_i − q_i| (between 0 and
2); the average over ten k-means runs is reported. As in the paper, D1 = support ∪ real
anomalies and D2 = support ∪ synthetic anomalies; the real anomalies are the task's
one-vs-closest out-class for the chosen candidate.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def cluster_histogram_tv(assignments: np.ndarray, in_first: np.ndarray, n_clusters: int) -> float:
    """Σ_i |p_i − q_i| of the normalised cluster histograms of two sets.

    assignments : (n1 + n2,) cluster index of every point; in_first : (n1 + n2,) bool, True for D1.
    """
    p = np.bincount(assignments[in_first], minlength=n_clusters) / max(1, in_first.sum())
    q = np.bincount(assignments[~in_first], minlength=n_clusters) / max(1, (~in_first).sum())
    return float(np.abs(p - q).sum())


def total_variation(first: np.ndarray, second: np.ndarray, *, runs: int = 10, seed: int = 0) -> float:
    """Mean over ``runs`` k-means clusterings of the TV between ``first`` (n1, D) and ``second`` (n2, D)."""
    from sklearn.cluster import KMeans

    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1]:
        raise ValueError(f"expected two (n, D) arrays with the same D, got {first.shape} and {second.shape}")
    if len(first) == 0 or len(second) == 0:
        raise ValueError("total variation needs at least one point in each set")
    union = np.concatenate([first, second])
    in_first = np.r_[np.ones(len(first), bool), np.zeros(len(second), bool)]
    n_clusters = max(1, min(len(union), int(round(np.sqrt(len(union))))))
    values = []
    for run in range(runs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate points can leave fewer distinct clusters
            labels = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed + run).fit_predict(union)
        values.append(cluster_histogram_tv(labels, in_first, n_clusters))
    return float(np.mean(values))


def _task_sets(store, tables, cube, task_row: int, candidate: str, source: str):
    """Embeddings of (support, closest real anomalies, synthetic anomalies, real normals) of a task."""
    from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

    task_id = int(cube.tasks["task_id"].iloc[task_row])
    images, members = tables
    mine = members[members["task_id"] == task_id]
    support = np.union1d(mine.loc[mine["role"] == ROLE_SEED, "image_id"], mine.loc[mine["role"] == ROLE_HELDOUT, "image_id"])
    closest = cube.closest_class()[task_row, cube.candidate_names.index(candidate)]
    anomalies = mine.loc[(mine["role"] == ROLE_REAL_ANOMALY) & (mine["group"] == closest), "image_id"].to_numpy()
    normals = mine.loc[mine["role"] == ROLE_REAL_NORMAL, "image_id"].to_numpy()
    synthetic = images.loc[(images["task_id"] == task_id) & (images["kind"] == source) & (images["status"] == "ok"), "image_id"].to_numpy()
    done = store.done_mask(candidate) == 1

    def feats(ids):
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[done[ids]]
        return store.embeddings(candidate, ids)

    return feats(support), feats(anomalies), feats(synthetic), feats(normals), closest


def default_candidate(cube) -> str:
    """ViT-B/16 as in the paper when the store has it, else the first candidate."""
    return "vit_b_16" if "vit_b_16" in cube.candidate_names else cube.candidate_names[0]


def sample_tasks(cube, per_dataset: int, seed: int = 0) -> np.ndarray:
    """Row indices of ``per_dataset`` tasks of every dataset (seeded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _, group in cube.tasks.groupby("dataset", sort=True):
        index = group.index.to_numpy()
        rows.append(np.sort(rng.choice(index, size=min(per_dataset, len(index)), replace=False)))
    return np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)


def tv_table(store_path: str | os.PathLike, cube, *, candidate: str | None = None, tasks_per_dataset: int = 5,
             runs: int = 10, seed: int = 0) -> pd.DataFrame:
    """The paper's Table 3: mean TV between real and synthetic validation sets per dataset × source.

    Columns: dataset, source, candidate, tasks, total_variation (mean over the sampled tasks).
    """
    from swsa_store import open_store

    candidate = candidate or default_candidate(cube)
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    records = []
    with open_store(store_path) as store:
        tables = (store.images(), store.task_members())
        for row in sample_tasks(cube, tasks_per_dataset, seed):
            for source in base:
                support, real, synthetic, _, _ = _task_sets(store, tables, cube, row, candidate, source)
                if len(real) == 0 or len(synthetic) == 0:
                    continue
                records.append({"dataset": cube.tasks["dataset"].iloc[row], "source": source, "task_id": int(cube.tasks["task_id"].iloc[row]),
                                "tv": total_variation(np.concatenate([support, real]), np.concatenate([support, synthetic]), runs=runs, seed=seed)})
    per_task = pd.DataFrame(records, columns=["dataset", "source", "task_id", "tv"])
    table = per_task.groupby(["dataset", "source"], as_index=False).agg(tasks=("tv", "size"), total_variation=("tv", "mean"))
    table.insert(2, "candidate", candidate)
    return table


def figure4(store_path: str | os.PathLike, cube, path: str | os.PathLike, *, candidate: str | None = None, seed: int = 0) -> Path:
    """t-SNE of one task per dataset: in-class images, each synthetic source, and the real
    one-vs-closest anomalies (the paper's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from swsa_store import open_store

    candidate = candidate or default_candidate(cube)
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    rows = sample_tasks(cube, 1, seed)
    fig, axes = plt.subplots(1, max(1, len(rows)), figsize=(4.6 * max(1, len(rows)), 4.4), squeeze=False)
    markers = ["o", "s", "D", "P", "X", "v"]
    with open_store(store_path) as store:
        tables = (store.images(), store.task_members())
        for ax, row in zip(axes[0], rows):
            support, real, _, normals, closest = _task_sets(store, tables, cube, row, candidate, base[0] if base else "")
            sets = [("in-class", np.concatenate([support, normals]), "^", "tab:orange")]
            for i, source in enumerate(base):
                synthetic = _task_sets(store, tables, cube, row, candidate, source)[2]
                sets.append((source, synthetic, markers[i % len(markers)], plt.get_cmap("tab10")(2 + i)))
            sets.append((f"real anomalies ({closest})", real, "v", "tab:blue"))
            points = np.concatenate([s[1] for s in sets if len(s[1])])
            if len(points) < 5:
                ax.set_axis_off()
                continue
            embedded = TSNE(n_components=2, perplexity=min(30.0, (len(points) - 1) / 3), random_state=seed,
                            init="pca").fit_transform(points.astype(np.float64))
            start = 0
            for label, values, marker, colour in sets:
                if len(values) == 0:
                    continue
                chunk = embedded[start : start + len(values)]
                start += len(values)
                ax.scatter(chunk[:, 0], chunk[:, 1], marker=marker, s=14, color=colour, label=label, alpha=0.8)
            ax.set_title(f"{cube.tasks['dataset'].iloc[row]} · {cube.tasks['normal_class'].iloc[row]}", fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"t-SNE of {candidate} embeddings (one-vs-closest anomalies)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
