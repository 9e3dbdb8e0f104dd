"""The catalog: every image, real or synthetic, gets a stable integer id and one row.

Image ids are assigned in order of appearance and never change: the id of an image is its row
number in ``/images`` and in every ``/embeddings/<name>/features`` matrix. Columns
(:data:`~swsa_store.schema.IMAGE_COLUMNS`):

============== ==========================================================================
image_id       int, the stable id (= row number)
dataset        the dataset the image belongs to (synthetic images: their task's dataset)
class_name     its class (synthetic images: the task's normal class)
split          "train" / "test" for real images, "synthetic" for generated ones
kind           "real", or the name of the generator that made it (e.g. "cutpaste")
path           path of the image file: stored relative to its dataset's root (real images)
               or to the store's folder (synthetic ones), read back absolute
               (:mod:`swsa_store.paths`; stores from before hold absolute paths, read as they are)
sha256         hex digest of the file's bytes ("" when unreadable)
status         "ok" or "skipped" (then never embedded nor used by a task)
skip_reason    why it was skipped ("" when ok)
width, height  pixels (0 when skipped)
task_id        the task a synthetic image was made for (-1 for real images)
parent_ids     JSON list of the image ids it was made from ("[]" for real images)
params         JSON of the generator's parameters for this image ("{}" for real images)
seed           base seed of the generator run (-1 for real images)
source_index   index of the sample in its original dataset, or its running number
defect         defect type in defect datasets (MVTec-AD, VisA: "good" for normal images);
               "" for every other image
============== ==========================================================================

A dataset may also have ``rest_groups`` (the anomaly groups that enter one-vs-rest, stored per
task; see :func:`swsa_store.tasks.build_tasks`) and ``skipped_entries`` (reasons for index lines
that name no image, recorded in the skips table).

Ids are handed out under the store's writer lock from the catalogue's ``next_image_id``
attribute (never lower than its row count), so two writers never give out the same id and an
id is never reused. The images table's ``dataset_roots`` attribute records each dataset's root.

The tasks table's attributes record how its real validation sets were built:
``validation_rule`` (the multi-class rule), ``defect_validation_rule`` and
``validation_sources`` (JSON ``{dataset: which official split its support and real validation
come from}``, from the dataset's ``validation_source``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from swsa_store.datasets import create_dataset
from swsa_store.schema import IMAGE_COLUMNS, INT_IMAGE_COLUMNS
from swsa_store.locks import store_lock
from swsa_store.paths import NEXT_ID_ATTR, dataset_root, store_folder, stored_root
from swsa_store.schema import StoreError
from swsa_store.store import create_store, edit_store, open_store
from swsa_store.tasks import DEFECT_VALIDATION_RULE, VALIDATION_RULE, build_tasks

log = logging.getLogger(__name__)


def normalise_image_rows(rows: pd.DataFrame, first_id: int) -> pd.DataFrame:
    """``rows`` (image rows of a samples table or a generator) as catalog rows: ``image_id`` numbered
    from ``first_id``, missing columns given their defaults (real, ok, no task, ...), exactly the
    columns :data:`IMAGE_COLUMNS` in order and with their dtypes. Raises :class:`ValueError` naming
    any column that has no default and is missing."""
    rows = rows.reset_index(drop=True).copy()
    rows["image_id"] = np.arange(first_id, first_id + len(rows), dtype=np.int64)
    defaults = {"kind": "real", "task_id": -1, "parent_ids": "[]", "params": "{}", "seed": -1,
                "sha256": "", "status": "ok", "skip_reason": "", "width": 0, "height": 0,
                "source_index": -1, "defect": ""}
    for column, value in defaults.items():
        if column not in rows:
            rows[column] = value
    missing = [c for c in IMAGE_COLUMNS if c not in rows]
    if missing:
        raise ValueError(f"image rows lack columns {missing}; expected {list(IMAGE_COLUMNS)}")
    rows = rows[list(IMAGE_COLUMNS)]
    for column in IMAGE_COLUMNS:
        rows[column] = rows[column].astype(np.int64 if column in INT_IMAGE_COLUMNS else object)
    return rows


def _with_defaults(images: pd.DataFrame) -> pd.DataFrame:
    """``images`` with the columns added since a store was written (``defect``) filled in."""
    if "defect" not in images:
        images = images.copy()
        images["defect"] = pd.Series([""] * len(images), dtype=object, index=images.index)
    return images


def catalog_dataset(
    store_path: str | os.PathLike,
    dataset_name: str,
    *,
    n_seed: int = 20,
    split_seed: int = 0,
    **dataset_kwargs,
) -> dict:
    """Catalog a registered dataset into the store and build its tasks.

    Idempotent: cataloguing the same dataset again with the same files changes nothing. A
    dataset of the same name with other files is an error (catalog it under another name).
    Returns a summary dict (images, skipped images, tasks, skipped tasks, skipped classes).
    """
    with store_lock(store_path):  # the catalogue is read and written by one writer at a time
        dataset = create_dataset(dataset_name, **dataset_kwargs)
        samples = dataset.samples()
        name = str(samples["dataset"].iloc[0]) if len(samples) else getattr(dataset, "name", dataset_name)
        create_store(store_path)
        with open_store(store_path) as store:
            already = _is_already_catalogued(store_path, _with_defaults(store.images(["dataset", "kind", "sha256"])),
                                             name, samples)
        if already:
            log.info("dataset %s is already catalogued in %s; nothing to do", name, store_path)
        else:
            with edit_store(store_path) as store:
                _write_dataset(store, store_path, dataset, name, samples, _with_defaults(store.images()),
                               n_seed=n_seed, split_seed=split_seed)
        return _summary(store_path, name, already=already)


def next_image_id(store, images: pd.DataFrame) -> int:
    """The first id a new image gets: the catalogue's persistent counter, never below its row count.
    A catalogue that handed out more ids than it holds rows (rows removed) is refused, since an
    image's id is its row number and ids are never reused."""
    counter = int(store.table_attrs("images").get(NEXT_ID_ATTR, 0))
    if counter > len(images):
        raise StoreError(f"store {store.path}: its catalogue handed out image ids up to {counter - 1} but holds "
                         f"{len(images)} rows (rows were removed); ids are never reused, so no image can be added — "
                         "restore the store from a copy")
    return len(images)


def _write_dataset(store, store_path, dataset, name: str, samples: pd.DataFrame, images: pd.DataFrame, *,
                   n_seed: int, split_seed: int) -> None:
    """Append dataset ``name``'s ``samples`` to the open, writable ``store`` and build its tasks."""
    rows = normalise_image_rows(samples, first_id=next_image_id(store, images))
    catalog = _appended(images, rows)
    skipped_classes = list(getattr(dataset, "skipped_classes", []))
    tasks_attrs = store.table_attrs("tasks")
    real_paths = rows.loc[rows["path"].astype(str) != "", "path"].astype(str)
    root = dataset_root([p for p in real_paths if os.path.isabs(p)])
    roots = {name: stored_root(root, store_folder(store_path))} if root else {}
    tasks_before, members_before = _with_task_defaults(store.tasks()), store.task_members()
    first_task = int(tasks_before["task_id"].max()) + 1 if len(tasks_before) else 0
    protocol = getattr(dataset, "protocol", "multiclass")
    tasks, members = build_tasks(catalog, name, n_seed=n_seed, seed=split_seed, first_task_id=first_task,
                                 protocol=protocol, class_labels=getattr(dataset, "class_labels", None),
                                 rest_groups=getattr(dataset, "rest_groups", None))
    attrs = _tasks_table_attrs(tasks_attrs, name, getattr(dataset, "validation_source", ""), protocol)
    store.replace_images(catalog, roots)
    store.replace_table("tasks", _appended(tasks_before, tasks), attrs=attrs)
    store.replace_table("task_members", _appended(members_before, members))
    skips = _catalog_skips(rows, skipped_classes, tasks, list(getattr(dataset, "skipped_entries", [])))
    if skips:
        store.append_skips(pd.DataFrame(skips))
    store.grow_embeddings(len(catalog))


def _appended(before: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``new``'s rows after ``before``'s (``new`` itself when ``before`` is empty, keeping its dtypes)."""
    return pd.concat([before, new], ignore_index=True) if len(before) else new


def _is_already_catalogued(store_path, images: pd.DataFrame, name: str, samples: pd.DataFrame) -> bool:
    """Whether the store's real images of ``name`` are ``samples`` (same files, same order); an
    error when it holds other images under that name, False when it holds none."""
    existing = images[(images["dataset"] == name) & (images["kind"] == "real")]
    if not len(existing):
        return False
    same = len(existing) == len(samples) and list(existing["sha256"]) == list(samples["sha256"].astype(str))
    if same:
        return True
    raise ValueError(
        f"store {store_path} already holds a different dataset named {name!r} "
        f"({len(existing)} images, now {len(samples)}); catalog it under another name "
        "(e.g. --name) or into a new store"
    )


def _with_task_defaults(tasks: pd.DataFrame) -> pd.DataFrame:
    """``tasks`` with the columns added since a store was written (``class_label``, ``protocol``,
    ``rest_groups``) filled in."""
    if len(tasks):  # a store from before class_label / protocol / rest_groups existed
        if "class_label" not in tasks:
            tasks["class_label"] = tasks["normal_class"]
        if "protocol" not in tasks:
            tasks["protocol"] = "multiclass"
        if "rest_groups" not in tasks:
            tasks["rest_groups"] = ""  # every anomaly group entered one-vs-rest
    return tasks


def _tasks_table_attrs(tasks_attrs: dict, name: str, validation_source: str, protocol: str) -> dict:
    """The tasks table's attributes once ``name`` is catalogued (see the module docstring)."""
    sources = json.loads(tasks_attrs.get("validation_sources", "{}"))
    sources[name] = validation_source or (DEFECT_VALIDATION_RULE if protocol == "defect" else VALIDATION_RULE)
    return {"validation_rule": VALIDATION_RULE, "defect_validation_rule": DEFECT_VALIDATION_RULE,
            "validation_sources": json.dumps(sources, sort_keys=True)}


def _catalog_skips(rows: pd.DataFrame, skipped_classes: list, tasks: pd.DataFrame,
                   skipped_entries: list[str] = ()) -> list[dict]:
    """The skips table rows of one catalogued dataset: skipped images, classes, index entries that
    name no image (the dataset's ``skipped_entries``, e.g. a malformed line) and tasks."""
    skips = [
        {"stage": "catalog", "image_id": int(r.image_id), "task_id": -1, "backbone": "", "reason": r.skip_reason}
        for r in rows[rows["status"] != "ok"].itertuples()
    ]
    skips += [
        {"stage": "catalog", "image_id": -1, "task_id": -1, "backbone": "", "reason": f"class {c!r}: {reason}"}
        for c, reason in skipped_classes
    ]
    skips += [
        {"stage": "catalog", "image_id": -1, "task_id": -1, "backbone": "", "reason": str(reason)}
        for reason in skipped_entries
    ]
    skips += [
        {"stage": "tasks", "image_id": -1, "task_id": int(r.task_id), "backbone": "", "reason": r.skip_reason}
        for r in tasks[tasks["status"] != "ok"].itertuples()
    ]
    return skips


#: What identifies a synthetic image: the same key twice is the same image (never catalogued twice).
SYNTHETIC_KEY = ("kind", "task_id", "source_index")


def add_images(store_path: str | os.PathLike, rows: pd.DataFrame) -> np.ndarray:
    """Append image rows (e.g. synthetic images) to the catalog; returns the ``(len(rows),)`` ids.

    Under the store's writer lock, from the catalogue as it is then: a synthetic row whose
    (kind, task_id, source_index) is already catalogued (or earlier in ``rows``) is not added
    again — its existing id is returned — so two runs of ``swsa synth`` never write duplicate rows."""
    rows = rows.reset_index(drop=True)
    with edit_store(store_path, compact=True) as store:
        images = _with_defaults(store.images())
        keys, ids = _synthetic_keys(images, rows)
        unique = [k if k is not None else ("row", i) for i, k in enumerate(keys)]  # non-synthetic: all new
        fresh = (ids < 0) & ~pd.Series(unique).duplicated().to_numpy()
        new_rows = normalise_image_rows(rows[fresh], first_id=next_image_id(store, images))
        ids[fresh] = new_rows["image_id"].to_numpy()
        first_id = {k: i for k, i in zip(keys, ids) if i >= 0 and k is not None}
        ids = np.array([i if i >= 0 else first_id[k] for k, i in zip(keys, ids)], dtype=np.int64)
        store.replace_images(_appended(images, new_rows))
        skipped = new_rows[new_rows["status"] != "ok"]
        if len(skipped):
            store.append_skips(pd.DataFrame({
                "stage": "synth", "image_id": skipped["image_id"], "task_id": skipped["task_id"],
                "backbone": "", "reason": skipped["skip_reason"],
            }))
        store.grow_embeddings(len(images) + len(new_rows))
    return ids


def _synthetic_keys(images: pd.DataFrame, rows: pd.DataFrame) -> tuple[list, np.ndarray]:
    """Each row's :data:`SYNTHETIC_KEY` (None for non-synthetic rows, which are always new) and
    ``(len(rows),)`` ids: the catalogued id of a synthetic row already in ``images``, else -1."""
    ids = np.full(len(rows), -1, dtype=np.int64)
    if not len(rows) or not {*SYNTHETIC_KEY, "split"} <= set(rows):
        return [None] * len(rows), ids
    key = list(SYNTHETIC_KEY)
    held = images[images["split"] == "synthetic"]
    known = dict(zip(map(tuple, held[key].astype(str).to_numpy()), held["image_id"].astype(np.int64)))
    synthetic = (rows["split"] == "synthetic").to_numpy()
    keys = [tuple(k) if s else None for k, s in zip(rows[key].astype(str).to_numpy(), synthetic)]
    for i, k in enumerate(keys):
        if k is not None and k in known:
            ids[i] = known[k]
    return keys, ids


def _summary(store_path: str | os.PathLike, dataset: str, *, already: bool) -> dict:
    with open_store(store_path) as store:
        images, tasks, skips = store.images(), store.tasks(), store.skips()
    mine = images[images["dataset"] == dataset]
    my_tasks = tasks[tasks["dataset"] == dataset]
    return {
        "dataset": dataset,
        "already_catalogued": already,
        "images": int((mine["kind"] == "real").sum()),
        "skipped_images": int(((mine["kind"] == "real") & (mine["status"] != "ok")).sum()),
        "tasks": int(len(my_tasks)),
        "skipped_tasks": int((my_tasks["status"] != "ok").sum()),
        "skipped_classes": [r for r in skips[(skips["stage"] == "catalog") & (skips["image_id"] < 0)]["reason"]],
    }


def resolve_path(store_path: str | os.PathLike, path: str) -> Path:
    """An image path from the catalog as a usable path (relative ones are relative to the store)."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else Path(store_path).resolve().parent / candidate


def make_ingest_catalog(root: str | os.PathLike, n_images: int, *, source_size: int = 256, classes: int = 4,
                        seed: int = 0) -> Path:
    """A folder dataset of ``n_images`` seeded JPEGs (``source_size`` px, smooth colour fields plus
    noise, like photographs in cost to decode) catalogued into ``root/ingest.h5``; returns the store."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:source_size, 0:source_size] / source_size
    for i in range(n_images):
        folder = root / "images" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + k * c) for k in range(3)], axis=-1) * 90 + 128
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    store = root / "ingest.h5"
    catalog_dataset(store, "folder", root=root / "images", name="ingest", n_seed=2)
    return store
