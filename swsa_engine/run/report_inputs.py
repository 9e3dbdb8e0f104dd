"""Read-only views of a store for the reports and the command line: plain DataFrames, arrays and
image paths, so that :mod:`swsa_engine.report` and :mod:`swsa_engine.app` never open a store.

* :func:`read_skips`, :func:`read_tasks`, :func:`embedding_configs`: one table or attribute set each;
* :class:`StoreImages`: what the HTML report's task sections show (image paths and status, each
  task's members and synthetic images, the store's task table), and :func:`real_image_ids`, the
  real images one task section samples;
* :func:`task_embedding_reader`: the embeddings of one task's support, real and synthetic
  anomalies and real normals (Table 3 and Figure 4);
* :func:`store_info` and :func:`grouped_skip_reasons`: what ``swsa info`` prints.

Nothing here writes to the store.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pandas as pd

from swsa_store import open_store
from swsa_store.catalog import resolve_path
from swsa_store.schema import DONE_FAILED, DONE_WRITTEN
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

from swsa_engine.core.cube import AurocCube

__all__ = [
    "read_skips", "read_tasks", "embedding_configs", "group_rows", "StoreImages", "real_image_ids",
    "TaskEmbeddings", "task_embedding_reader", "store_info", "grouped_skip_reasons",
]


# --------------------------------------------------------------------------- single tables


def read_skips(store_path: str | os.PathLike) -> pd.DataFrame:
    """The store's recorded skips (columns stage, image_id, task_id, backbone, reason, ...)."""
    with open_store(store_path) as store:
        return store.skips()


def read_tasks(store_path: str | os.PathLike) -> pd.DataFrame:
    """The store's task table (one row per task, skipped ones included)."""
    with open_store(store_path) as store:
        return store.tasks()


def embedding_configs(store_path: str | os.PathLike, names) -> dict[str, dict]:
    """Per embedding name of ``names``: the ``config`` attribute it was written with (weights
    kind, path, sha256, package, ...); ``{}`` where it has none."""
    with open_store(store_path) as store:
        return {name: store.embedding_attrs(name).get("config", {}) for name in names}


def group_rows(frame: pd.DataFrame | None, column: str) -> dict:
    """``frame``'s rows grouped by ``column``: value -> sub-frame; empty for None or no rows."""
    if frame is None or not len(frame):
        return {}
    return {k: g for k, g in frame.groupby(column)}


# --------------------------------------------------------------------------- the HTML report's images


@dataclass
class StoreImages:
    """What the HTML report's task sections read from the store: each image's catalogued path and
    status (arrays of length n_images, indexed by image id), each task's members and synthetic
    images (task id -> sub-frame), which task each synthetic image was made for, and the store's
    task table. Without a store (``store_path`` None or missing) every lookup is empty."""

    store_path: str | os.PathLike | None = None
    paths: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    status: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    members_by_task: dict = field(default_factory=dict)
    synthetic_by_task: dict = field(default_factory=dict)
    #: synthetic image id -> the task it was made for
    task_of_synthetic: dict = field(default_factory=dict)
    store_tasks: pd.DataFrame | None = None

    @classmethod
    def read(cls, store_path: str | os.PathLike | None) -> StoreImages:
        """The view of the store at ``store_path``; an empty one when there is no store there."""
        if store_path is None or not Path(store_path).exists():
            return cls(store_path)
        with open_store(store_path) as store:
            images, members, store_tasks = store.images(), store.task_members(), store.tasks()
        synthetic = images[(images["kind"] != "real") & (images["task_id"] >= 0)]
        return cls(store_path, images["path"].to_numpy(), images["status"].to_numpy(), group_rows(members, "task_id"),
                   group_rows(synthetic, "task_id"), dict(zip(synthetic["image_id"], synthetic["task_id"])), store_tasks)

    def image_path(self, image_id: int) -> Path | None:
        """The file of ``image_id`` (relative catalog paths resolved against the store); None when
        the image is unknown, was skipped, or has no path."""
        image_id = int(image_id)
        ok = 0 <= image_id < len(self.paths) and self.status[image_id] == "ok" and self.paths[image_id]
        return resolve_path(self.store_path, self.paths[image_id]) if ok else None


def _spread_sample(ids: np.ndarray, n: int) -> np.ndarray:
    """``n`` ids spread evenly over ``ids`` (deterministic)."""
    ids = np.asarray(ids)
    if len(ids) <= n:
        return ids
    return ids[np.linspace(0, len(ids) - 1, n).round().astype(int)]


def real_image_ids(members: pd.DataFrame | None, n_real: int) -> tuple[list[int], list[int], list[tuple[int, str]]]:
    """A task's seed image ids (sorted), ``n_real`` real normal ids spread over the sorted ids, and
    ``n_real`` (real anomaly id, its group) pairs spread over the anomalies sorted by group and id;
    all empty without the task's ``members`` (its rows of the task_members table)."""
    if members is None:
        return [], [], []
    seeds = [int(i) for i in np.sort(members.loc[members["role"] == ROLE_SEED, "image_id"].to_numpy())]
    normals = [int(i) for i in _spread_sample(np.sort(members.loc[members["role"] == ROLE_REAL_NORMAL, "image_id"].to_numpy()),
                                              n_real)]
    anomaly_rows = members[members["role"] == ROLE_REAL_ANOMALY].sort_values(["group", "image_id"])
    chosen = _spread_sample(np.arange(len(anomaly_rows)), n_real)
    anomalies = [(int(i), str(g)) for i, g in zip(anomaly_rows["image_id"].to_numpy()[chosen],
                                                  anomaly_rows["group"].to_numpy()[chosen])]
    return seeds, normals, anomalies


# --------------------------------------------------------------------------- Table 3 and Figure 4


class TaskEmbeddings(NamedTuple):
    """One task's embeddings for one candidate, each (n, D) float: its support (seeds ∪ held-out),
    its real anomalies of the candidate's closest out-class, the synthetic anomalies of one source,
    its real normals; and that closest out-class."""

    support: np.ndarray
    anomalies: np.ndarray
    synthetic: np.ndarray
    normals: np.ndarray
    closest: str


@contextmanager
def task_embedding_reader(store_path: str | os.PathLike, cube: AurocCube,
                          candidate: str) -> Iterator[Callable[[int, str], TaskEmbeddings]]:
    """Open the store once; yields ``read(task_row, source) -> TaskEmbeddings`` for the task at row
    ``task_row`` of ``cube.tasks``, the embedding ``candidate`` (rows not written are left out) and
    the synthetic ``source`` (image kind)."""
    with open_store(store_path) as store:
        images, members = store.images(), store.task_members()
        done = store.done_mask(candidate) == 1

        def feats(ids) -> np.ndarray:
            ids = np.asarray(ids, dtype=np.int64)
            ids = ids[done[ids]]
            return store.embeddings(candidate, ids)

        def read(task_row: int, source: str) -> TaskEmbeddings:
            task_id = int(cube.tasks["task_id"].iloc[task_row])
            mine = members[members["task_id"] == task_id]
            support = np.union1d(mine.loc[mine["role"] == ROLE_SEED, "image_id"], mine.loc[mine["role"] == ROLE_HELDOUT, "image_id"])
            closest = cube.closest_class()[task_row, cube.candidate_names.index(candidate)]
            anomalies = mine.loc[(mine["role"] == ROLE_REAL_ANOMALY) & (mine["group"] == closest), "image_id"].to_numpy()
            normals = mine.loc[mine["role"] == ROLE_REAL_NORMAL, "image_id"].to_numpy()
            synthetic = images.loc[(images["task_id"] == task_id) & (images["kind"] == source) & (images["status"] == "ok"),
                                   "image_id"].to_numpy()
            return TaskEmbeddings(feats(support), feats(anomalies), feats(synthetic), feats(normals), closest)

        yield read


# --------------------------------------------------------------------------- swsa info


def grouped_skip_reasons(skips: pd.DataFrame, limit: int = 20) -> list[dict]:
    """The store's recorded skips grouped by stage and reason (paths and numbers folded), most frequent
    first: ``[{"stage", "reason" (one example), "count"}]``, at most ``limit`` groups."""
    if not len(skips):
        return []
    keys = skips["reason"].astype(str).map(lambda r: re.sub(r"(/[^\s:;,]+)+|\d+", "#", r))
    table = skips.assign(key=keys).groupby(["stage", "key"], sort=False)
    groups = [{"stage": str(stage), "reason": str(rows["reason"].iloc[0]), "count": int(len(rows))}
              for (stage, _), rows in table]
    return sorted(groups, key=lambda g: -g["count"])[:limit]


def store_info(store_path: str | os.PathLike) -> dict:
    """What ``swsa info`` shows: the store's path and schema version, image and skip counts,
    grouped skip reasons, the results it holds, per dataset its classes, images by kind and tasks,
    and per embedding its completeness, weights and (where stored) patch tokens."""
    with open_store(store_path) as store:
        images, tasks, skips = store.images(), store.tasks(), store.skips()
        info = {
            "store": str(store.path), "schema_version": int(store.file.attrs["schema_version"]),
            "images": len(images), "datasets": {}, "backbones": {}, "results": store.results(),
            "skips": len(skips), "skip_reasons": grouped_skip_reasons(skips),
        }
        for dataset, rows in images.groupby("dataset"):
            info["datasets"][dataset] = _dataset_info(rows, tasks[tasks["dataset"] == dataset])
        usable = (images["status"] == "ok").to_numpy()
        for name in store.backbones():
            info["backbones"][name] = _backbone_info(store, name, usable)
            if name in store.patch_sets():
                info["backbones"][name]["patches"] = _patch_info(store, name, usable, images)
    return info


def _dataset_info(rows: pd.DataFrame, tasks: pd.DataFrame) -> dict:
    """One dataset's classes, images by kind, skipped images and tasks (``rows``: its images)."""
    return {
        "classes": int(rows.loc[rows["kind"] == "real", "class_name"].nunique()),
        "images": {kind: int(n) for kind, n in rows.groupby("kind").size().items()},
        "skipped_images": int((rows["status"] != "ok").sum()),
        "tasks": int(len(tasks)), "skipped_tasks": int((tasks["status"] != "ok").sum()),
    }


def _backbone_info(store, name: str, usable: np.ndarray) -> dict:
    """One embedding's completeness over the usable images, failures, feature size and weights."""
    done = store.done_mask(name)
    cfg = store.embedding_attrs(name).get("config", {})
    return {
        "done": int((done[usable] == DONE_WRITTEN).sum()), "of": int(usable.sum()),
        "failed": int((done == DONE_FAILED).sum()), "feature_dim": cfg.get("feature_dim"),
        "weights": cfg.get("weights_kind"), "weights_path": cfg.get("weights_path", ""),
        "weights_sha256": cfg.get("weights_sha256", ""), "weights_package": cfg.get("weights_package", ""),
        "weights_package_version": cfg.get("weights_package_version", ""),
    }


def _patch_info(store, name: str, usable: np.ndarray, images: pd.DataFrame) -> dict:
    """One embedding's patch tokens: completeness, shape, layer and bytes (float16)."""
    pa, pdone = store.patch_attrs(name), store.patch_done_mask(name)
    per_image = int(pa["n_patches"]) * int(pa["patch_dim"]) * 2
    return {
        "done": int((pdone[usable] == DONE_WRITTEN).sum()), "n_patches": int(pa["n_patches"]),
        "patch_dim": int(pa["patch_dim"]), "grid": list(pa["grid"]), "layer": pa["layer"],
        "dtype": "float16", "bytes_per_image": per_image, "bytes_total": per_image * len(images),
        "bytes_per_dataset": {str(d): per_image * int(n) for d, n in images.groupby("dataset").size().items()},
    }
