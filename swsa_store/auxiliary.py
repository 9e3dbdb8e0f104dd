"""Auxiliary outliers: the paper's Tiny-ImageNet baseline as a validation source.

Per task, a seeded uniform sample (without replacement) of ``N`` images from an auxiliary pool
— Tiny-ImageNet's training images (``train/<wnid>/images/``, when ``root`` holds
``wnids.txt``) or every image file under any folder — is catalogued like a synthetic source:
one row per (task, image) with ``kind`` = the source name (default ``"tinyimagenet"`` for a
Tiny-ImageNet root, else ``"auxiliary"``), the task's id, dataset and normal class,
``split = "synthetic"``, ``params = {"root", "rel_path", "pool_size"}``, ``seed`` = the base
seed, ``source_index`` = the image's position in the sorted pool. No file is copied; the
catalog points at the pool's files.

``N`` is ``count`` (paper: 100), except for datasets named in ``counts`` (paper: Flowers 25,
:data:`PAPER_AUX_COUNTS`). The sample of task ``t`` is drawn with
``numpy.random.default_rng(stable_seed(seed, source, t))``, so it depends only on the seed,
the source name, the task id and the pool (its sorted file list). Tasks that already hold
their ``N`` images of this source are left alone (a re-run resumes).

A sampled image that cannot be decoded, or a symlink leading out of the root, is catalogued
with status ``"skipped"`` and recorded in the store's skips.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from swsa_store.catalog import add_images
from swsa_store.datasets import DEFAULT_EXTENSIONS
from swsa_store.datasets.tiny_imagenet import TinyImageNetDataset
from swsa_store.samples import check_source_name, inspect_image_file
from swsa_store.store import open_store
from swsa_store.tasks import select_tasks, stable_seed

__all__ = ["PAPER_AUX_COUNTS", "auxiliary_pool", "sample_auxiliary"]

log = logging.getLogger(__name__)

#: Per-dataset sample sizes of the paper (every other dataset: 100).
PAPER_AUX_COUNTS = {"flowers": 25}


def auxiliary_pool(root: str | os.PathLike) -> tuple[Path, list[str], bool]:
    """``(root, sorted relative paths of the pool's images, is_tinyimagenet)``."""
    root = Path(os.path.abspath(os.fspath(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"auxiliary root {root} does not exist or is not a folder; expected Tiny-ImageNet "
                                "(wnids.txt, train/<wnid>/images/) or any folder of images")
    if (root / "wnids.txt").exists():
        files = TinyImageNetDataset(root).train_files()
        tiny = True
    else:
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(os.path.relpath(os.path.join(dirpath, f), root)).as_posix() for f in filenames
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in DEFAULT_EXTENSIONS]
        tiny = False
    files = sorted(files)
    if not files:
        raise ValueError(f"auxiliary root {root} holds no image files "
                         f"({'train/<wnid>/images/*.JPEG' if tiny else ', '.join(DEFAULT_EXTENSIONS)})")
    return root, files, tiny


def sample_auxiliary(
    store_path: str | os.PathLike,
    root: str | os.PathLike,
    *,
    count: int = 100,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    source: str | None = None,
    task_ids: list[int] | None = None,
) -> dict:
    """Catalogue ``count`` (per dataset: ``counts``) auxiliary images per ok task of the store.

    ``counts`` defaults to :data:`PAPER_AUX_COUNTS` (Flowers: 25). Returns
    ``{"source", "tasks_done", "tasks_skipped", "images", "pool_size"}``.
    """
    if source is not None:
        check_source_name(source)  # before any file is listed
    counts = dict(PAPER_AUX_COUNTS if counts is None else counts)
    if count < 1 or any(int(n) < 1 for n in counts.values()):
        raise ValueError(f"auxiliary counts must be at least 1, got count={count}, counts={counts}")
    root, pool, tiny = auxiliary_pool(root)
    source = check_source_name(source or ("tinyimagenet" if tiny else "auxiliary"))
    root_real = os.path.realpath(root)
    with open_store(store_path) as store:
        images, tasks = store.images(), store.tasks()
    tasks = select_tasks(tasks, task_ids, store_path)
    made = images[images["kind"] == source].groupby("task_id").size()
    rows: list[dict] = []
    done = skipped = 0
    for task in tasks.itertuples():
        n = int(counts.get(task.dataset, count))
        if n > len(pool):
            raise ValueError(f"auxiliary pool {root} holds {len(pool)} images, fewer than the {n} asked per task")
        have = int(made.get(task.task_id, 0))
        if have >= n:
            skipped += 1
            continue
        if have:
            raise ValueError(f"task {task.task_id} already holds {have} {source} images, not {n}; "
                             "use another --source name for a different count")
        rng = np.random.default_rng(stable_seed(seed, source, int(task.task_id)))
        for index in rng.choice(len(pool), size=n, replace=False):
            rel = pool[int(index)]
            path = os.path.join(root, *rel.split("/"))
            real = os.path.realpath(path)
            if not (real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)):
                status, reason, digest, w, h = "skipped", f"symlink escapes auxiliary root: -> {real}", "", 0, 0
            else:
                status, reason, digest, w, h = inspect_image_file(path)
            rows.append({
                "dataset": task.dataset, "class_name": task.normal_class, "split": "synthetic", "kind": source,
                "path": path, "sha256": digest, "status": status, "skip_reason": reason, "width": w, "height": h,
                "task_id": int(task.task_id), "parent_ids": "[]",
                "params": json.dumps({"root": str(root), "rel_path": rel, "pool_size": len(pool)}, sort_keys=True),
                "seed": int(seed), "source_index": int(index),
            })
        done += 1
    if rows:
        add_images(store_path, pd.DataFrame(rows))
    log.info("auxiliary %s: %d tasks sampled, %d already done, pool of %d images", source, done, skipped, len(pool))
    return {"source": source, "tasks_done": done, "tasks_skipped": skipped, "images": len(rows), "pool_size": len(pool)}
