"""Anomaly-detection tasks: every class of a dataset becomes the normal class of one task.

For the task whose normal class is ``c`` (SWSA paper, Sections 3.1 and 4.1):

* **support set** = the training images of ``c`` (the kNN feature bank is the whole support);
* the support is split (seeded, per task) into ``n_seed`` **seed images**, from which
  synthetic anomalies are made, and **held-out normal images**, the synthetic validation
  set's label-0 part. When the support has no more than ``n_seed`` images (Oxford Flowers
  has 10), every support image is both a seed and a held-out normal;
* a held-out normal is in the feature bank, so it is scored leave-one-out (without its own
  row);
* **real validation** = the test images of ``c`` (normal) against the test images of every
  other class of the dataset (anomalies), each remembering its class: one-vs-rest uses all of
  them, one-vs-closest reports the worst single out-class.

For defect datasets (MVTec-AD, VisA; ``protocol="defect"``) the class is a product: support =
its train images whose ``defect`` is ``"good"``, real normal = its ``"good"`` test images,
anomalies = its defective test images, each remembering its defect type (one-vs-rest: all
defect types together; one-vs-closest: the worst defect type). Every task also carries the
cleaned class name for prompts (``class_label``) and its ``protocol``.

Which anomaly groups enter **one-vs-rest** is the task's ``rest_groups``: ``""`` (every dataset
but ELPV) means all of them; otherwise a JSON list of group names (ELPV: ``["p=1"]``, the cells
that are surely defective, while one-vs-closest still reports the worst of every group, the
uncertain ``p=1/3`` ones included). One-vs-closest always covers every group.

The members table lists ``(task_id, image_id, role, group)`` with ``role`` one of :data:`ROLES`;
an image that is both seed and held-out appears twice. ``group`` names what a real anomaly
is (its class, or its defect type in defect datasets) — one-vs-closest reports the worst
group — and is ``""`` for every other role.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

ROLE_SEED = 0
ROLE_HELDOUT = 1
ROLE_REAL_NORMAL = 2
ROLE_REAL_ANOMALY = 3
ROLES = {ROLE_SEED: "seed", ROLE_HELDOUT: "heldout", ROLE_REAL_NORMAL: "real_normal", ROLE_REAL_ANOMALY: "real_anomaly"}

TASK_COLUMNS = (
    "task_id",
    "dataset",
    "normal_class",
    "status",
    "skip_reason",
    "n_support",
    "n_seed",
    "n_heldout",
    "n_real_normal",
    "n_real_anomaly",
    "n_out_classes",
    "seeds_are_heldout",
    "split_seed",
    "class_label",
    "protocol",
    "rest_groups",
)

#: Task protocols: ``multiclass`` (anomalies = other classes) and ``defect`` (MVTec-AD / VisA:
#: the class is a product, anomalies = its defective test images, grouped by defect type).
PROTOCOLS = ("multiclass", "defect")

#: The ``defect`` of a normal image in a defect dataset.
NORMAL_DEFECT = "good"

DEFECT_VALIDATION_RULE = (
    "defect datasets (MVTec-AD, VisA): the class is a product; support = its train images whose defect is "
    f"{NORMAL_DEFECT!r}; real validation = its test images: normal = defect {NORMAL_DEFECT!r}, anomalies = every "
    "other defect type of the same product (one-vs-rest: all together; one-vs-closest: the worst defect type)"
)

VALIDATION_RULE = (
    "support = train split of the normal class; real validation = test split: normal = test images "
    "of the normal class, anomalies = test images of every other class of the dataset "
    "(one-vs-rest: all together; one-vs-closest: the worst single out-class)"
)


def empty_tasks_table() -> pd.DataFrame:
    dtypes = {
        "task_id": np.int64, "dataset": object, "normal_class": object, "status": object,
        "skip_reason": object, "n_support": np.int64, "n_seed": np.int64, "n_heldout": np.int64,
        "n_real_normal": np.int64, "n_real_anomaly": np.int64, "n_out_classes": np.int64,
        "seeds_are_heldout": bool, "split_seed": np.int64, "class_label": object, "protocol": object,
        "rest_groups": object,
    }
    return pd.DataFrame({c: pd.Series([], dtype=dtypes[c]) for c in TASK_COLUMNS})


def empty_members_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "task_id": pd.Series([], dtype=np.int64),
            "image_id": pd.Series([], dtype=np.int64),
            "role": pd.Series([], dtype=np.int8),
            "group": pd.Series([], dtype=object),
        }
    )


def stable_seed(*parts: object) -> np.random.SeedSequence:
    """A SeedSequence from ints and strings, independent of Python's hash randomisation."""
    entropy = [p if isinstance(p, int) else zlib.crc32(str(p).encode("utf-8")) for p in parts]
    return np.random.SeedSequence(entropy)


def build_tasks(
    images: pd.DataFrame,
    dataset: str,
    *,
    n_seed: int = 20,
    seed: int = 0,
    first_task_id: int = 0,
    protocol: str = "multiclass",
    class_labels: dict[str, str] | None = None,
    rest_groups: list[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tasks and their members for every class of ``dataset`` in the catalog ``images``.

    Parameters
    ----------
    images : the catalog (columns ``image_id, dataset, class_name, split, kind, status``).
    n_seed : seed images per task (paper: 20).
    seed : base seed of the per-task support split.
    protocol : ``"multiclass"`` (default): anomalies are the test images of every other class,
        ``group`` = their class. ``"defect"`` (MVTec-AD, VisA; needs a ``defect`` column): the
        class is a product; support = its train images with defect ``"good"``; real normal =
        its test images with defect ``"good"``; anomalies = its other test images, ``group`` =
        their defect type.
    class_labels : ``{class_name: cleaned name}`` for prompts (column ``class_label``; default:
        the class name).
    rest_groups : the anomaly groups that enter one-vs-rest (column ``rest_groups``, a JSON list);
        ``None`` (default): every group. A task with no real anomaly in these groups is skipped.

    Returns
    -------
    tasks : one row per class (columns :data:`TASK_COLUMNS`); a task that cannot be scored has
        status ``"skipped"`` and a reason (no training images, one class in real validation or in
        its one-vs-rest part).
    members : ``(task_id, image_id, role, group)`` rows.
    """
    _check_task_options(images, n_seed, protocol)
    if rest_groups is not None and (isinstance(rest_groups, str) or not all(isinstance(g, str) for g in rest_groups)):
        raise ValueError(f"rest_groups must be a list of group names (or None for all groups), got {rest_groups!r}")
    rest = None if rest_groups is None else sorted(set(rest_groups))
    class_labels = class_labels or {}
    classes, usable_train, test = _usable_images(images, dataset, protocol)
    task_rows, member_parts = [], []
    for offset, normal_class in enumerate(classes):
        task_id = first_task_id + offset
        split = _split_task(usable_train, test, normal_class, protocol=protocol, n_seed=n_seed,
                            rng=np.random.default_rng(stable_seed(seed, dataset, normal_class)))
        label = str(class_labels.get(normal_class, normal_class))
        task_rows.append(_task_row(split, task_id, dataset, normal_class, seed, label, protocol, rest))
        member_parts.extend(_member_frames(split, task_id))
    tasks = pd.DataFrame(task_rows, columns=list(TASK_COLUMNS)).astype(empty_tasks_table().dtypes.to_dict())
    members = pd.concat(member_parts, ignore_index=True) if member_parts else empty_members_table()
    return tasks, members


def _check_task_options(images: pd.DataFrame, n_seed: int, protocol: str) -> None:
    if n_seed < 1:
        raise ValueError(f"n_seed must be at least 1, got {n_seed}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if protocol == "defect" and "defect" not in images:
        raise ValueError("the defect protocol needs a 'defect' column in the catalog (MVTec-AD / VisA loaders)")


def _usable_images(images: pd.DataFrame, dataset: str, protocol: str) -> tuple[list, pd.DataFrame, pd.DataFrame]:
    """``(classes, support candidates, test images)`` of ``dataset``.

    Classes come from every real catalogued image, failed ones included, so that a class whose
    images all failed still gets a (skipped) task; support and test hold usable images only.
    """
    usable = images[(images["dataset"] == dataset) & (images["kind"] == "real") & (images["status"] == "ok")]
    classes = sorted(images.loc[(images["dataset"] == dataset) & (images["kind"] == "real"), "class_name"].unique())
    if not classes:
        raise ValueError(f"dataset {dataset!r} has no catalogued images; catalog it first")
    if protocol == "defect":
        is_normal = usable["defect"].astype(str) == NORMAL_DEFECT
        usable_train = usable[(usable["split"] == "train") & is_normal]
    else:
        usable_train = usable[usable["split"] == "train"]
    return classes, usable_train, usable[usable["split"] == "test"]


@dataclass(frozen=True)
class _TaskSplit:
    """One task's images: sorted id arrays, and the anomaly rows with the column naming their group."""

    support: np.ndarray
    seeds: np.ndarray
    heldout: np.ndarray
    seeds_are_heldout: bool
    real_normal: np.ndarray
    real_anomaly: np.ndarray
    anomalies: pd.DataFrame
    group_column: str


def _split_task(usable_train: pd.DataFrame, test: pd.DataFrame, normal_class: str, *, protocol: str,
                n_seed: int, rng: np.random.Generator) -> _TaskSplit:
    support = np.sort(usable_train.loc[usable_train["class_name"] == normal_class, "image_id"].to_numpy())
    if protocol == "defect":
        mine = test[test["class_name"] == normal_class]
        mine_normal = mine["defect"].astype(str) == NORMAL_DEFECT
        real_normal = np.sort(mine.loc[mine_normal, "image_id"].to_numpy())
        anomalies = mine[~mine_normal]
        group_column = "defect"
    else:
        real_normal = np.sort(test.loc[test["class_name"] == normal_class, "image_id"].to_numpy())
        anomalies = test[test["class_name"] != normal_class]
        group_column = "class_name"
    shuffled = rng.permutation(support)
    seeds_are_heldout = len(support) <= n_seed
    if seeds_are_heldout:
        seeds, heldout = np.sort(shuffled), np.sort(shuffled)
    else:
        seeds, heldout = np.sort(shuffled[:n_seed]), np.sort(shuffled[n_seed:])
    return _TaskSplit(support, seeds, heldout, seeds_are_heldout, real_normal,
                      np.sort(anomalies["image_id"].to_numpy()), anomalies, group_column)


def _skip_reasons(split: _TaskSplit, rest: list[str] | None) -> list[str]:
    reasons = []
    if len(split.support) == 0:
        reasons.append("no training images of the normal class")
    if len(split.real_normal) == 0 or len(split.real_anomaly) == 0:  # every side that is missing, said
        missing = [side for side, ids in (("normal", split.real_normal), ("anomalous", split.real_anomaly)) if len(ids) == 0]
        reasons.append(f"real validation has {'one class' if len(missing) == 1 else 'no class'} "
                       f"(no {' and no '.join(missing)} test images)")
    elif rest is not None and not split.anomalies[split.group_column].astype(str).isin(rest).any():
        reasons.append(f"one-vs-rest has one class (no test anomalies in groups {rest})")
    return reasons


def _task_row(split: _TaskSplit, task_id: int, dataset: str, normal_class: str, split_seed: int,
              class_label: str, protocol: str, rest: list[str] | None) -> dict:
    reasons = _skip_reasons(split, rest)
    return {
        "task_id": task_id,
        "dataset": dataset,
        "normal_class": normal_class,
        "status": "skipped" if reasons else "ok",
        "skip_reason": "; ".join(reasons),
        "n_support": len(split.support),
        "n_seed": len(split.seeds),
        "n_heldout": len(split.heldout),
        "n_real_normal": len(split.real_normal),
        "n_real_anomaly": len(split.real_anomaly),
        "n_out_classes": int(split.anomalies[split.group_column].nunique()),
        "seeds_are_heldout": bool(split.seeds_are_heldout),
        "split_seed": split_seed,
        "class_label": class_label,
        "protocol": protocol,
        "rest_groups": "" if rest is None else json.dumps(rest),
    }


def _member_frames(split: _TaskSplit, task_id: int) -> list[pd.DataFrame]:
    """One members frame per role; only real anomalies have a ``group``."""
    anomaly_group = (split.anomalies.set_index("image_id").loc[split.real_anomaly, split.group_column]
                     .astype(str).to_numpy(dtype=object))
    frames = []
    for ids, role, group in ((split.seeds, ROLE_SEED, ""), (split.heldout, ROLE_HELDOUT, ""),
                             (split.real_normal, ROLE_REAL_NORMAL, ""), (split.real_anomaly, ROLE_REAL_ANOMALY, anomaly_group)):
        frames.append(
            pd.DataFrame(
                {
                    "task_id": np.full(len(ids), task_id, dtype=np.int64),
                    "image_id": ids.astype(np.int64),
                    "role": np.full(len(ids), role, dtype=np.int8),
                    "group": np.broadcast_to(np.asarray(group, dtype=object), len(ids)).copy() if len(ids) else np.empty(0, object),
                }
            )
        )
    return frames


def select_tasks(tasks: pd.DataFrame, task_ids, store_path) -> pd.DataFrame:
    """The scoreable tasks (status ok), or those of ``task_ids`` (an error names unknown ones)."""
    tasks = tasks[tasks["status"] == "ok"]
    if task_ids is None:
        return tasks
    unknown = sorted(set(task_ids) - set(tasks["task_id"]))
    if unknown:
        raise ValueError(f"unknown or skipped task ids {unknown[:5]}; see `swsa info --store {store_path}`")
    return tasks[tasks["task_id"].isin(task_ids)]


def members_of(members: pd.DataFrame, task_id: int, role: int) -> np.ndarray:
    """Sorted image ids playing ``role`` in task ``task_id``."""
    rows = members[(members["task_id"] == task_id) & (members["role"] == role)]
    return np.sort(rows["image_id"].to_numpy())
