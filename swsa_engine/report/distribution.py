"""How close synthetic validation sets are to real ones: the paper's Table 3 (total variation,
Appendix B). Figure 4 (t-SNE of one task's embeddings) is :mod:`swsa_engine.report.figures.figure4`.

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

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from swsa_engine.core.cube import AurocCube
from swsa_engine.run.report_inputs import task_embedding_reader


def cluster_histogram_tv(assignments: np.ndarray, in_first: np.ndarray, n_clusters: int) -> float:
    """Σ_i |p_i − q_i| of the normalised cluster histograms of two sets.

    assignments : (n1 + n2,) cluster index of every point; in_first : (n1 + n2,) bool, True for D1.
    """
    p = np.bincount(assignments[in_first], minlength=n_clusters) / max(1, in_first.sum())
    q = np.bincount(assignments[~in_first], minlength=n_clusters) / max(1, (~in_first).sum())
    return float(np.abs(p - q).sum())


def total_variation(first: np.ndarray, second: np.ndarray, *, runs: int = 10, seed: int = 0) -> float:
    """Mean over ``runs`` k-means clusterings of the TV between ``first`` (n1, D) and ``second`` (n2, D)."""
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


def default_candidate(cube: AurocCube) -> str:
    """ViT-B/16 as in the paper when the store has it, else the first candidate."""
    return "vit_b_16" if "vit_b_16" in cube.candidate_names else cube.candidate_names[0]


def sample_tasks(cube: AurocCube, per_dataset: int, seed: int = 0) -> np.ndarray:
    """Row indices (into ``cube.tasks``) of ``per_dataset`` tasks of every dataset (seeded), sorted within each dataset."""
    rng = np.random.default_rng(seed)
    rows = []
    for _, group in cube.tasks.groupby("dataset", sort=True):
        index = group.index.to_numpy()
        rows.append(np.sort(rng.choice(index, size=min(per_dataset, len(index)), replace=False)))
    return np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)


def tv_table(store_path: str | os.PathLike, cube: AurocCube, *, candidate: str | None = None, tasks_per_dataset: int = 5,
             runs: int = 10, seed: int = 0) -> pd.DataFrame:
    """The paper's Table 3: mean TV between real and synthetic validation sets per dataset × source.

    Columns: dataset, source, candidate, tasks, total_variation (mean over the sampled tasks).
    """
    candidate = candidate or default_candidate(cube)
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    records = []
    with task_embedding_reader(store_path, cube, candidate) as read:
        for row in sample_tasks(cube, tasks_per_dataset, seed):
            for source in base:
                sets = read(row, source)
                if len(sets.anomalies) == 0 or len(sets.synthetic) == 0:
                    continue
                records.append({"dataset": cube.tasks["dataset"].iloc[row], "source": source, "task_id": int(cube.tasks["task_id"].iloc[row]),
                                "tv": total_variation(np.concatenate([sets.support, sets.anomalies]),
                                                      np.concatenate([sets.support, sets.synthetic]), runs=runs, seed=seed)})
    per_task = pd.DataFrame(records, columns=["dataset", "source", "task_id", "tv"])
    table = per_task.groupby(["dataset", "source"], as_index=False).agg(tasks=("tv", "size"), total_variation=("tv", "mean"))
    table.insert(2, "candidate", candidate)
    return table
