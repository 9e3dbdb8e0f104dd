"""Task groups: a store's catalog and task tables turned into the padded index arrays every scoring pass uses.

:func:`build_task_groups` takes the tables the sweeps read from a store (images, tasks, task
members and the abnormal-reference split, as DataFrames) and builds one :class:`TaskGroup` per
dataset: tasks of one dataset share their real validation images, so their arrays are built
together; every array is indexed ``[task, ...]`` with ``-1`` padding where tasks have fewer
members than the longest. :func:`rest_mask` and :func:`groups_in_rest` say which out-classes enter
a task's one-vs-rest AUROC. This module opens no file itself: the callers
(:mod:`swsa_engine.run.sweep`, :mod:`swsa_engine.run.prompt_sweep`) read the tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED


def pad_rows(rows: list[np.ndarray], fill: int = -1) -> np.ndarray:
    """Stack 1-D integer arrays of different lengths into ``(len(rows), max_len)`` padded with ``fill``."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


@dataclass
class TaskGroup:
    """Index arrays for the scoreable tasks of one dataset.

    Attributes (T tasks, all image ids are catalog ids, ``-1`` = padding)
    ----------
    task_ids : (T,)
    support : (T, S) the kNN bank (seed ∪ held-out images)
    heldout : (T, H) held-out normals (label 0 of the synthetic validation set; in the bank)
    synthetic : source name → (T, A) synthetic anomaly ids (label 1)
    real_ids : (Q,) union of the real validation images of these tasks
    real_label : (T, Q) int8: -1 not in the task, 0 normal, 1 anomaly
    real_group : (T, Q) int: index into ``group_names`` of an anomaly's group (its class, or its
        defect type), -1 otherwise
    group_names : (G,) the groups anomalies come from (one-vs-closest reports the worst)
    abnormal : (T, R) synthetic anomalies held apart as abnormal references
        (:mod:`swsa_store.references`); never in ``synthetic`` (checked), ``(T, 0)`` without a split
    group_in_rest : (T, G) bool: whether anomalies of group g enter task t's one-vs-rest AUROC
        (the task's ``rest_groups``); all True by default. One-vs-closest uses every group.
    synthetic_parents : source → (T, A, E) the ids each anomaly of ``synthetic[source]`` was made
        from (the catalog's ``parent_ids``), -1 padded; ``(T, A, 0)`` (none known) by default. The
        leak-free protocol (:mod:`swsa_engine.core.protocol`) scores each anomaly without them.
    abnormal_parents : (T, R, E) the parents of each ``abnormal`` reference, -1 padded
    abnormal_sources : the sources (generators) the abnormal references come from
    """

    dataset: str
    task_ids: np.ndarray
    support: np.ndarray
    heldout: np.ndarray
    synthetic: dict[str, np.ndarray]
    real_ids: np.ndarray
    real_label: np.ndarray
    real_group: np.ndarray
    group_names: np.ndarray
    n_members: dict = field(default_factory=dict)
    abnormal: np.ndarray | None = None
    group_in_rest: np.ndarray | None = None
    synthetic_parents: dict[str, np.ndarray] | None = None
    abnormal_parents: np.ndarray | None = None
    abnormal_sources: tuple[str, ...] = ()

    def __post_init__(self):
        if self.abnormal is None:
            self.abnormal = np.full((len(self.task_ids), 0), -1, dtype=np.int64)
        if self.abnormal_parents is None:
            self.abnormal_parents = np.full(self.abnormal.shape + (0,), -1, dtype=np.int64)
        parents = dict(self.synthetic_parents or {})
        for source, ids in self.synthetic.items():
            known = parents.setdefault(source, np.full(np.shape(ids) + (0,), -1, dtype=np.int64))
            if np.ndim(known) != 3 or np.shape(known)[:2] != np.shape(ids):
                raise ValueError(f"synthetic_parents[{source!r}] must be (tasks, anomalies, E) = {np.shape(ids)} + (E,), "
                                 f"got {np.shape(known)}")
        self.synthetic_parents = parents
        shape = (len(self.task_ids), len(self.group_names))
        if self.group_in_rest is None:
            self.group_in_rest = np.ones(shape, dtype=bool)
        elif np.shape(self.group_in_rest) != shape:
            raise ValueError(f"group_in_rest must be (tasks, groups) = {shape}, got {np.shape(self.group_in_rest)}")
        check_references_disjoint(self)


def rest_mask(group: TaskGroup, rows: np.ndarray) -> np.ndarray:
    """(T', Q) bool for tasks ``rows``: the real images that take part in one-vs-rest — the task's
    normals and its anomalies whose group is in ``group.group_in_rest`` (not the task's: False)."""
    label = group.real_label[rows]
    real_group = group.real_group[rows]
    if real_group.shape[1] == 0 or group.group_in_rest.shape[1] == 0:
        return label >= 0
    in_rest = np.take_along_axis(group.group_in_rest[rows], np.maximum(real_group, 0), axis=1)
    return (label == 0) | ((label == 1) & (real_group >= 0) & in_rest)


def groups_in_rest(tasks: pd.DataFrame, task_ids: np.ndarray, group_names: np.ndarray) -> np.ndarray:
    """(T, G) bool from the tasks' ``rest_groups`` (JSON list of group names; "" or absent = all)."""
    out = np.ones((len(task_ids), len(group_names)), dtype=bool)
    if "rest_groups" not in tasks:  # a store from before rest_groups: every group enters one-vs-rest
        return out
    listed = tasks.set_index("task_id").loc[task_ids, "rest_groups"]
    names = np.asarray(group_names, dtype=str)
    for i, value in enumerate(listed):
        if isinstance(value, str) and value.strip():
            try:
                chosen = json.loads(value)
            except json.JSONDecodeError:
                chosen = None
            if not isinstance(chosen, list):
                raise ValueError(f"task {task_ids[i]}: rest_groups {value[:80]!r} is not a JSON list of group names "
                                 "(or \"\" for all groups); catalog the dataset again into a new store")
            out[i] = np.isin(names, [str(g) for g in chosen])
    return out


def check_references_disjoint(group: TaskGroup) -> None:
    """Raise when an abnormal reference of a task is also in that task's synthetic validation set."""
    if group.abnormal.size == 0:
        return
    for source, ids in group.synthetic.items():
        both = (ids[:, :, None] == group.abnormal[:, None, :]) & (ids[:, :, None] >= 0)
        if both.any():
            t, w, _ = np.argwhere(both)[0]
            raise ValueError(f"task {group.task_ids[t]}: synthetic image {ids[t, w]} ({source}) is both an abnormal "
                             "reference and a validation anomaly; rebuild the task groups from the store's "
                             "abnormal_references table (`swsa split-refs`)")


def parent_lookup(images: pd.DataFrame):
    """A function ``ids (...) → (..., E)`` giving the parents of synthetic image ids (-1 padded;
    -1 ids have none), read from the images table's ``parent_ids`` (JSON lists); without that
    column every image has none (E = 0)."""
    if "parent_ids" not in images:
        return lambda ids: np.full(np.shape(ids) + (0,), -1, dtype=np.int64)
    made = images[images["kind"] != "real"]
    image_ids = made["image_id"].to_numpy(dtype=np.int64)
    lists = [_parent_list(text, image_id) for text, image_id in zip(made["parent_ids"], image_ids)]
    table = pad_rows([np.asarray(p, dtype=np.int64) for p in lists])
    order = np.argsort(image_ids)
    image_ids, table = image_ids[order], table[order] if len(table) else table

    def lookup(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if image_ids.size == 0:
            return np.full(ids.shape + (0,), -1, dtype=np.int64)
        at = np.clip(np.searchsorted(image_ids, ids), 0, image_ids.size - 1)
        found = (image_ids[at] == ids) & (ids >= 0)
        return np.where(found[..., None], table[at], -1)

    return lookup


def _parent_list(text, image_id: int) -> list[int]:
    if not isinstance(text, str) or not text.strip():
        return []
    try:
        parents = json.loads(text)
    except json.JSONDecodeError:
        parents = None
    if not isinstance(parents, list) or not all(isinstance(p, int) for p in parents):
        raise ValueError(f"image {image_id}: parent_ids {text[:80]!r} is not a JSON list of image ids")
    return parents


def build_task_groups(images: pd.DataFrame, tasks: pd.DataFrame, members: pd.DataFrame,
                      references: pd.DataFrame | None = None) -> list[TaskGroup]:
    """One :class:`TaskGroup` per dataset, over the tasks whose status is ``"ok"``.

    ``references`` (``task_id, image_id``: the store's abnormal-reference split, see
    :func:`swsa_store.references.read_references`) become each task's ``abnormal`` ids and are
    removed from its synthetic validation set, so every candidate validates on the same images.
    With a ``parent_ids`` column in ``images``, each anomaly's and reference's parents are filled in
    (``synthetic_parents``, ``abnormal_parents``); without it none are known.
    """
    groups = []
    parents_of = parent_lookup(images)
    ok_tasks = tasks[tasks["status"] == "ok"].sort_values("task_id")
    synthetic_images = images[(images["kind"] != "real") & (images["status"] == "ok")]
    sources = sorted(synthetic_images["kind"].unique())
    reference_rows = synthetic_images.iloc[:0]
    if references is not None and len(references):
        is_reference = synthetic_images["image_id"].isin(references["image_id"].to_numpy())
        reference_rows = synthetic_images[is_reference]
        synthetic_images = synthetic_images[~is_reference]
    for dataset, dataset_tasks in ok_tasks.groupby("dataset", sort=True):
        task_ids = dataset_tasks["task_id"].to_numpy()
        mine = members[members["task_id"].isin(task_ids)]
        by_role = {role: mine[mine["role"] == role].groupby("task_id")["image_id"].apply(np.sort) for role in
                   (ROLE_SEED, ROLE_HELDOUT, ROLE_REAL_NORMAL, ROLE_REAL_ANOMALY)}
        empty = np.empty(0, dtype=np.int64)

        def rows(role):
            return [by_role[role].get(t, empty) for t in task_ids]

        support = pad_rows([np.union1d(s, h) for s, h in zip(rows(ROLE_SEED), rows(ROLE_HELDOUT))])
        heldout = pad_rows(rows(ROLE_HELDOUT))
        synthetic = {}
        for source in sources:
            of_source = synthetic_images[synthetic_images["kind"] == source].groupby("task_id")["image_id"].apply(np.sort)
            if any(t in of_source.index for t in task_ids):
                synthetic[source] = pad_rows([of_source.get(t, empty) for t in task_ids])
        normals = rows(ROLE_REAL_NORMAL)
        anomaly_rows = mine[mine["role"] == ROLE_REAL_ANOMALY]
        real_ids = np.unique(np.concatenate(normals + [anomaly_rows["image_id"].to_numpy()])) if task_ids.size else empty
        group_names = np.unique(anomaly_rows["group"].to_numpy(dtype=str)).astype(object)
        real_label = np.full((len(task_ids), len(real_ids)), -1, dtype=np.int8)
        real_group = np.full((len(task_ids), len(real_ids)), -1, dtype=np.int64)
        task_row = np.searchsorted(task_ids, anomaly_rows["task_id"].to_numpy())
        positions = np.searchsorted(real_ids, anomaly_rows["image_id"].to_numpy())
        real_label[task_row, positions] = 1
        real_group[task_row, positions] = np.searchsorted(group_names.astype(str), anomaly_rows["group"].to_numpy(dtype=str))
        for i, normal in enumerate(normals):
            real_label[i, np.searchsorted(real_ids, normal)] = 0
        of_task = reference_rows[reference_rows["task_id"].isin(task_ids)].groupby("task_id")["image_id"].apply(np.sort)
        abnormal = pad_rows([of_task.get(t, empty) for t in task_ids])
        groups.append(TaskGroup(str(dataset), task_ids, support, heldout, synthetic, real_ids,
                                real_label, real_group, group_names, abnormal=abnormal,
                                group_in_rest=groups_in_rest(dataset_tasks, task_ids, group_names),
                                synthetic_parents={s: parents_of(ids) for s, ids in synthetic.items()},
                                abnormal_parents=parents_of(abnormal),
                                abnormal_sources=tuple(sorted(reference_rows.loc[
                                    reference_rows["task_id"].isin(task_ids), "kind"].unique()))))
    return groups
