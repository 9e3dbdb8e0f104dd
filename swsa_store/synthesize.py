"""Make each task's synthetic anomalies from its seed images and catalogue them.

Files are written under ``<store>.files/synth/<source>/task_<id>/`` (atomically, one per
image, as it is made) and catalogued with their provenance: task, parent image ids, the
generator's parameters and the base seed. Deterministic per (task, generator, seed). Images
already catalogued for a task (by their index) are skipped, so an interrupted run is resumed
by running it again; generators with ``iter_generate(..., skip=...)`` (``diffusion``) do not
even recompute them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .catalog import add_images, resolve_path
from .store import open_store
from .tasks import ROLE_SEED, select_tasks

log = logging.getLogger(__name__)

#: Anomalies per task when neither the caller nor the generator sets a number (the paper's 100).
DEFAULT_COUNT = 100


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def synthesize(
    store_path: str | os.PathLike,
    method: str = "cutpaste",
    *,
    count: int | None = None,
    seed: int = 0,
    source: str | None = None,
    task_ids: list[int] | None = None,
    progress: bool = True,
    commit_every_s: float = 30.0,
    **generator_kwargs,
) -> dict:
    """Generate ``count`` anomalies per task with generator ``method`` and catalogue them.

    ``count`` None means the generator's own number (``resolve_count(n_seeds, None)``, e.g.
    every style × content pair for ``diffusion``), else :data:`DEFAULT_COUNT` (the paper's 100).
    ``source`` names the validation source in reports (default: ``method``, with ``-<variant>``
    appended for a non-default variant). Each image is written as it is made and catalogue rows
    are committed every ``commit_every_s`` seconds, so a run that is interrupted and started
    again makes only the images still missing (by their index in the task; generators are
    deterministic, so the result equals an uninterrupted run). Returns ``{"source",
    "tasks_done", "tasks_skipped", "images"}`` (``images``: written by this call).
    """
    from .datasets import read_image
    from .synth import create_generator, generator_rng
    from .synth import diffstyle as _diffstyle  # noqa: F401  (registers "diffusion")

    if count is not None and (isinstance(count, bool) or count < 1):
        raise ValueError(f"count must be at least 1, got {count}")
    generator = create_generator(method, **generator_kwargs)
    resolve_count = getattr(generator, "resolve_count", None)
    iter_generate = getattr(generator, "iter_generate", None)
    variant = generator_kwargs.get("variant")
    source = source or (method if variant in (None, "normal") else f"{method}-{variant}")
    with open_store(store_path) as store:
        images, tasks, members = store.images(), store.tasks(), store.task_members()
        files_dir = store.files_dir
    tasks = select_tasks(tasks, task_ids, store_path)
    mine = images[images["kind"] == source]
    made = mine.groupby("task_id")["source_index"].apply(lambda s: set(int(i) for i in s))
    pending_rows: list[dict] = []
    done = skipped = written = 0
    last_commit = time.monotonic()
    seeds_by_task = members[members["role"] == ROLE_SEED].groupby("task_id")["image_id"].apply(np.sort)
    for task in tqdm(list(tasks.itertuples()), desc=f"synth {source}", unit="task", disable=not progress):
        seed_ids = seeds_by_task.get(task.task_id, np.empty(0, dtype=np.int64))
        ok_seeds = images.loc[seed_ids][images.loc[seed_ids, "status"] == "ok"]
        existing = made.get(task.task_id, set())
        if resolve_count is not None and len(ok_seeds):
            task_count = resolve_count(len(ok_seeds), count)
        else:
            task_count = DEFAULT_COUNT if count is None else int(count)
        if existing and len(existing) >= task_count:
            skipped += 1
            continue
        if any(i >= task_count for i in existing):
            raise ValueError(
                f"task {task.task_id} already holds {len(existing)} {source} images, not {task_count}; "
                "use another --source name for a different count"
            )
        if len(ok_seeds) == 0:
            raise ValueError(f"task {task.task_id} ({task.normal_class}) has no usable seed images")
        seed_images = [read_image(resolve_path(store_path, p)) for p in ok_seeds["path"]]
        rng = generator_rng(seed, int(task.task_id), source)
        if iter_generate is not None:
            synthetic = iter_generate(seed_images, ok_seeds["image_id"].tolist(), task_count, rng, skip=existing)
        else:
            synthetic = (
                (i, item) for i, item in enumerate(generator.generate(seed_images, ok_seeds["image_id"].tolist(), task_count, rng))
                if i not in existing
            )
        task_dir = files_dir / "synth" / source / f"task_{task.task_id:05d}"
        bar = tqdm(total=task_count, initial=len(existing), desc=f"task {task.task_id}", unit="img", leave=False,
                   disable=not progress or iter_generate is None)
        for index, item in synthetic:
            data = _png_bytes(item.image)
            path = task_dir / f"{index:04d}.png"
            _write_atomic(path, data)
            pending_rows.append({
                "dataset": task.dataset, "class_name": task.normal_class, "split": "synthetic",
                "kind": source, "path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest(),
                "status": "ok", "skip_reason": "", "width": item.image.width, "height": item.image.height,
                "task_id": int(task.task_id), "parent_ids": json.dumps(list(map(int, item.parent_ids))),
                "params": json.dumps({"generator": method, **item.params}, sort_keys=True),
                "seed": seed, "source_index": index,
            })
            written += 1
            bar.update(1)
            if time.monotonic() - last_commit > commit_every_s:
                add_images(store_path, pd.DataFrame(pending_rows))
                pending_rows, last_commit = [], time.monotonic()
        bar.close()
        done += 1
    if pending_rows:
        add_images(store_path, pd.DataFrame(pending_rows))
    return {"source": source, "tasks_done": done, "tasks_skipped": skipped, "images": written}
