"""The plain reference that ``swsa bench`` checks the engine against: the sweep's AUROCs and
Kendall taus computed one task and candidate at a time with scikit-learn ``NearestNeighbors``,
``roc_auc_score`` and ``scipy.stats.kendalltau`` (:func:`reference_sweep`,
:func:`reference_kendall`), and their cost extrapolated from a sample of tasks to all
(:func:`extrapolate_reference`)."""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
from scipy.stats import kendalltau
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from swsa_store import open_store
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

from swsa_engine.core.cube import AurocCube

__all__ = ["reference_sweep", "extrapolate_reference", "reference_kendall"]


def reference_sweep(store_path: str | os.PathLike, task_ids: list[int], k: int = 3, hardest=(10, 5),
                    normalise: bool = False) -> dict:
    """The same AUROCs as the sweep, computed the plain way, one task and candidate at a time:
    scikit-learn ``NearestNeighbors`` for the kNN scores (leave-one-out: k + 1 neighbours, the
    query's own row dropped), ``roc_auc_score`` for every AUROC, per out-class pair. Returns
    ``{"results": {(task_id, candidate): {"real": [rest, closest], "synthetic": {source: auroc}}},
    "seconds": total, "read_seconds": reading embeddings, "task_seconds": {task_id: seconds}}``:
    ``task_seconds`` is each task's compute over all candidates, reading excluded (a per-task
    loop reads each embedding matrix once, however many tasks it scores).
    ``normalise`` L2-normalises the features first (the cosine kNN detector)."""
    started = time.perf_counter()
    results = {}
    read_seconds = 0.0
    task_seconds = dict.fromkeys(task_ids, 0.0)
    with open_store(store_path) as store:
        images, members = store.images(), store.task_members()
        for name in store.backbones():
            read_started = time.perf_counter()
            features = store.embeddings(name)
            read_seconds += time.perf_counter() - read_started
            if normalise:
                features = features / np.linalg.norm(features, axis=1, keepdims=True)
            for task_id in task_ids:
                task_started = time.perf_counter()
                results[(task_id, name)] = _reference_task(features, images, members, task_id, k, hardest)
                task_seconds[task_id] += time.perf_counter() - task_started
    return {"results": results, "seconds": time.perf_counter() - started, "read_seconds": read_seconds,
            "task_seconds": task_seconds}


def _reference_task(features: np.ndarray, images: pd.DataFrame, members: pd.DataFrame, task_id: int, k: int,
                    hardest) -> dict:
    """One task's AUROCs for one candidate (``features``: (n_images, D), rows by image id), the
    plain way: ``{"real": [one-vs-rest, one-vs-closest], "synthetic": {source: auroc}}``."""
    mine = members[members["task_id"] == task_id]
    ids = {role: np.sort(mine.loc[mine["role"] == role, "image_id"].to_numpy())
           for role in (ROLE_SEED, ROLE_HELDOUT, ROLE_REAL_NORMAL, ROLE_REAL_ANOMALY)}
    support = np.union1d(ids[ROLE_SEED], ids[ROLE_HELDOUT])
    index = NearestNeighbors(n_neighbors=k).fit(features[support].astype(np.float64))

    def knn(rows):
        distances, _ = index.kneighbors(features[rows].astype(np.float64))
        return (distances ** 2).sum(axis=1)

    normal, anomaly = knn(ids[ROLE_REAL_NORMAL]), knn(ids[ROLE_REAL_ANOMALY])
    groups = mine.loc[mine["role"] == ROLE_REAL_ANOMALY].sort_values("image_id")["group"].to_numpy()
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))]
    rest = roc_auc_score(labels, np.r_[normal, anomaly])
    per_group = [roc_auc_score(np.r_[np.zeros(len(normal)), np.ones((groups == g).sum())],
                               np.r_[normal, anomaly[groups == g]]) for g in np.unique(groups)]
    # leave-one-out: ask for k + 1 neighbours and drop the query's own bank row
    distances, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(features[support].astype(np.float64)).kneighbors(
        features[ids[ROLE_HELDOUT]].astype(np.float64))
    own = support[neighbours] == ids[ROLE_HELDOUT][:, None]
    keep = ~own & (np.cumsum(~own, axis=1) <= k)
    heldout_scores = np.where(keep, distances ** 2, 0.0).sum(axis=1)
    synthetic = {}
    task_synth = images[(images["task_id"] == task_id) & (images["kind"] != "real")]
    for source, rows in task_synth.groupby("kind"):
        scores = knn(rows["image_id"].to_numpy())
        synthetic[source] = roc_auc_score(np.r_[np.zeros(len(heldout_scores)), np.ones(len(scores))],
                                          np.r_[heldout_scores, scores])
        for n in hardest:
            hard = np.sort(scores)[:n]
            synthetic[f"{source}@hard{n}"] = roc_auc_score(
                np.r_[np.zeros(len(heldout_scores)), np.ones(len(hard))], np.r_[heldout_scores, hard])
    return {"real": [rest, min(per_group)], "synthetic": synthetic}


def extrapolate_reference(reference: dict, kendall_seconds: float, tasks: pd.DataFrame) -> dict:
    """The reference loops' cost for every task of ``tasks`` (``task_id``, ``dataset``) from a sample.

    Tasks of different datasets cost very different amounts (a CUB task scores 5,794 test
    images and 199 per-class AUROCs, an MVTec one ~110 images), so the sampled tasks' mean cost
    is taken per dataset and multiplied by that dataset's number of tasks; reading the
    embeddings is counted once (a loop reads each matrix once, however many tasks it scores),
    and the Kendall loop's per-task cost is added for every task.
    """
    sampled = pd.Series(reference["task_seconds"], dtype=float)
    dataset_of = tasks.set_index("task_id")["dataset"]
    per_dataset = sampled.groupby(dataset_of.reindex(sampled.index).to_numpy()).mean()
    counts = tasks["dataset"].value_counts()
    missing = sorted(set(counts.index) - set(per_dataset.index))
    if missing:
        raise ValueError(f"the reference sample has no task of dataset(s) {missing}; sample at least one task per dataset")
    compute = float((per_dataset * counts.reindex(per_dataset.index)).sum())
    kendall = kendall_seconds / max(1, len(sampled)) * len(tasks)
    return {
        "seconds_per_task_by_dataset": {str(d): float(v) for d, v in per_dataset.items()},
        "tasks_by_dataset": {str(d): int(v) for d, v in counts.items()},
        "read_seconds": float(reference["read_seconds"]),
        "seconds_per_task": (compute + kendall) / len(tasks),
        "extrapolated_seconds": float(reference["read_seconds"]) + compute + kendall,
    }


def reference_kendall(cube: AurocCube, task_rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Per task and source: ``scipy.stats.kendalltau`` of synthetic vs real AUROC (one-vs-rest)."""
    started = time.perf_counter()
    out = np.full((len(task_rows), len(cube.sources)), np.nan)
    for i, t in enumerate(task_rows):
        for v in range(len(cube.sources)):
            out[i, v] = kendalltau(cube.synthetic[t, :, v], cube.real[t, :, 0]).statistic
    return out, time.perf_counter() - started
