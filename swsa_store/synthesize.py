"""Make each task's synthetic anomalies from its seed images and catalogue them.

Files are written under ``<store>.files/synth/<source>/task_<id>/`` (atomically, one per
image, as it is made) and catalogued with their provenance: task, parent image ids, the
generator's parameters and the base seed. Deterministic per (task, generator, seed). Images
already catalogued for a task (by their index) are skipped, so an interrupted run is resumed
by running it again; generators with ``iter_generate(..., skip=...)`` (``diffusion``) do not
even recompute them.

An output the generator could not make an anomaly of (one that stayed within tolerance of its
parent through every redraw: a :class:`~swsa_store.synth.SyntheticImage` with ``image=None``)
is catalogued as ``status="skipped"`` with its ``skip_reason`` (no file; the skips table gets a
``stage="synth"`` row), so it is never validated on, reported, and not made again on a rerun.

A run holds the store's writer lock from before it plans until its last commit
(:func:`swsa_store.locks.store_lock`): a second ``swsa synth`` on the same store is refused at
once (or waits), and never writes duplicate rows. At its start, temporary image files left by a
killed run of the same source are removed. Progress (``rows_done`` catalogued of ``rows_total``)
is in ``<store>.progress`` after every commit.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from swsa_store.catalog import add_images, resolve_path
from swsa_store.locks import remove_orphans, store_lock, write_progress
from swsa_store.samples import check_source_name, path_inside, read_image
from swsa_store.store import open_store
from swsa_store.synth import create_generator, generator_rng
from swsa_store.tasks import ROLE_SEED, select_tasks

log = logging.getLogger(__name__)

#: Anomalies per task when neither the caller nor the generator sets a number (the paper's 100).
DEFAULT_COUNT = 100


def png_bytes(image) -> bytes:
    """``image`` (a PIL image) encoded as PNG bytes the way every synthetic image is stored
    (``compress_level=6``, not optimised: the same pixels give the same bytes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:  # durable before it is catalogued
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class TaskJob:
    """One task's share of a synthesis run: what to make and from which seeds.

    ``seed_ids``/``seed_paths``: the task's usable seed images (sorted by id); ``count``: the
    anomalies the task ends with; ``existing``: indices already catalogued (not made again).
    """

    task_id: int
    dataset: str
    normal_class: str
    seed_ids: tuple[int, ...]
    seed_paths: tuple[str, ...]
    count: int
    existing: frozenset[int]


def plan_synthesis(store_path: str | os.PathLike, generator, source: str, count: int | None,
                   task_ids: list[int] | None) -> tuple[list[TaskJob], int, Path]:
    """The tasks that still need images: ``(jobs, tasks already complete, files folder)``."""
    resolve_count = getattr(generator, "resolve_count", None)
    with open_store(store_path) as store:
        images, tasks, members = store.images(), store.tasks(), store.task_members()
        files_dir = store.files_dir
    tasks = select_tasks(tasks, task_ids, store_path)
    mine = images[images["kind"] == source]
    made = mine.groupby("task_id")["source_index"].apply(lambda s: set(int(i) for i in s))
    seeds_by_task = members[members["role"] == ROLE_SEED].groupby("task_id")["image_id"].apply(np.sort)
    jobs: list[TaskJob] = []
    skipped = 0
    for task in tasks.itertuples():
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
        jobs.append(TaskJob(int(task.task_id), str(task.dataset), str(task.normal_class),
                            tuple(int(i) for i in ok_seeds["image_id"]), tuple(str(p) for p in ok_seeds["path"]),
                            int(task_count), frozenset(existing)))
    return jobs, skipped, files_dir


def encode_synthetic(index: int, item) -> tuple:
    """``(index, png bytes, width, height, parent_ids, params, skip_reason)`` of one generated
    :class:`~swsa_store.synth.SyntheticImage` — ``(index, None, 0, 0, parent_ids, params, reason)``
    for a skip — the arguments of :meth:`SynthWriter.add` (also sent back by Ray actors)."""
    if item.image is None:
        return int(index), None, 0, 0, item.parent_ids, item.params, item.skip_reason
    return int(index), png_bytes(item.image), item.image.width, item.image.height, item.parent_ids, item.params, ""


def generate_task(generator, job: TaskJob, seed_images: list, seed: int, source: str):
    """Lazily ``(index, SyntheticImage)`` for the job's missing indices — the one generation step
    of the local and the Ray path (same rng, same skip, hence the same images)."""
    rng = generator_rng(seed, job.task_id, source)
    iter_generate = getattr(generator, "iter_generate", None)
    if iter_generate is not None:
        return iter_generate(seed_images, list(job.seed_ids), job.count, rng, skip=set(job.existing))
    return ((i, item) for i, item in enumerate(generator.generate(seed_images, list(job.seed_ids), job.count, rng))
            if i not in job.existing)


class SynthWriter:
    """The single writer of synthetic images: files first (atomic, fsync-ed), catalogue rows
    committed every ``commit_every_s`` seconds, every ``commit_every`` rows (when set) and on
    :meth:`flush` — a row is never catalogued before its file is durable, so a rerun remakes
    exactly the uncatalogued ones."""

    def __init__(self, store_path: str | os.PathLike, files_dir: Path, *, source: str, method: str, seed: int,
                 commit_every_s: float = 30.0, commit_every: int | None = None):
        self.store_path, self.files_dir = store_path, Path(files_dir)
        self.source, self.method, self.seed = source, method, seed
        self.commit_every_s = commit_every_s
        if commit_every is not None and (isinstance(commit_every, bool) or int(commit_every) < 1):
            raise ValueError(f"commit_every must be a positive number of images, got {commit_every!r}")
        #: also commit when this many rows are queued (None: by time only)
        self.commit_every = None if commit_every is None else int(commit_every)
        self.pending: list[dict] = []
        self.written = 0
        self.skipped = 0
        #: progress: rows catalogued by this writer, of ``rows_total`` (set by the caller) to make
        self.committed, self.rows_total = 0, None
        self._last_commit = time.monotonic()

    def add(self, job: TaskJob, index: int, data: bytes | None, width: int, height: int, parent_ids, params: dict,
            skip_reason: str = "") -> None:
        """Write one encoded image (PNG ``data``) of ``job`` at ``index`` and queue its row; with
        ``data=None`` (a skip) queue a ``status="skipped"`` row with ``skip_reason`` and no file."""
        if data is None:
            if not skip_reason:
                raise ValueError(f"task {job.task_id} image {index}: a skipped synthetic image needs a skip_reason")
            path_text, digest, status, width, height = "", "", "skipped", 0, 0
            self.skipped += 1
        else:
            path = path_inside(self.files_dir / "synth" / self.source / f"task_{job.task_id:05d}" / f"{index:04d}.png",
                               self.files_dir)
            _write_atomic(path, data)
            path_text, digest, status, skip_reason = str(path.resolve()), hashlib.sha256(data).hexdigest(), "ok", ""
            self.written += 1
        self.pending.append({
            "dataset": job.dataset, "class_name": job.normal_class, "split": "synthetic",
            "kind": self.source, "path": path_text, "sha256": digest,
            "status": status, "skip_reason": skip_reason, "width": int(width), "height": int(height),
            "task_id": int(job.task_id), "parent_ids": json.dumps(list(map(int, parent_ids))),
            "params": json.dumps({"generator": self.method, **params}, sort_keys=True),
            "seed": self.seed, "source_index": int(index),
        })
        if time.monotonic() - self._last_commit > self.commit_every_s or (
                self.commit_every is not None and len(self.pending) >= self.commit_every):
            self.flush()

    def flush(self) -> None:
        """Commit the queued catalogue rows."""
        if self.pending:
            add_images(self.store_path, pd.DataFrame(self.pending))
            self.committed += len(self.pending)
            if self.rows_total is not None:
                write_progress(self.store_path, stage="synth", source=self.source, rows_done=self.committed,
                               rows_total=self.rows_total)
        self.pending, self._last_commit = [], time.monotonic()


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
    deterministic, so the result equals an uninterrupted run); a generator with ``commit_every``
    (DiffStyle: its batch size) also commits after each such batch of finished images, so a kill
    loses at most one batch. Returns ``{"source",
    "tasks_done", "tasks_skipped", "images", "skipped_images"}`` (``images``: written by this
    call; ``skipped_images``: outputs catalogued as skipped because they stayed unchanged).
    """
    if count is not None and (isinstance(count, bool) or count < 1):
        raise ValueError(f"count must be at least 1, got {count}")
    source = synth_source_name(method, generator_kwargs, source)
    with store_lock(store_path):  # before any work: what is planned is what gets written
        generator = create_generator(method, **generator_kwargs)
        return _synthesize_locked(store_path, generator, method, source, count=count, seed=seed, task_ids=task_ids,
                                  progress=progress, commit_every_s=commit_every_s)


def _synthesize_locked(store_path, generator, method: str, source: str, *, count, seed: int, task_ids, progress: bool,
                       commit_every_s: float) -> dict:
    """:func:`synthesize`'s work, under the store's writer lock."""
    jobs, skipped, files_dir = plan_synthesis(store_path, generator, source, count, task_ids)
    remove_orphans(store_path, under=Path(files_dir) / "synth" / source)  # files of a killed run of this source
    writer = SynthWriter(store_path, files_dir, source=source, method=method, seed=seed, commit_every_s=commit_every_s,
                         commit_every=generator.commit_every)
    writer.rows_total = sum(job.count - len(job.existing) for job in jobs)
    streaming = getattr(generator, "iter_generate", None) is not None
    for job in tqdm(jobs, desc=f"synth {source}", unit="task", disable=not progress):
        seed_images = [read_image(resolve_path(store_path, p)) for p in job.seed_paths]
        bar = tqdm(total=job.count, initial=len(job.existing), desc=f"task {job.task_id}", unit="img", leave=False,
                   disable=not progress or not streaming)
        for index, item in generate_task(generator, job, seed_images, seed, source):
            index, data, width, height, parent_ids, params, reason = encode_synthetic(index, item)
            writer.add(job, index, data, width, height, parent_ids, params, reason)
            bar.update(1)
        bar.close()
    writer.flush()
    if writer.skipped:
        log.warning("synth %s: %d image(s) skipped (no visible change from the parent after every redraw; "
                    "reasons in the skips table)", source, writer.skipped)
    return {"source": source, "tasks_done": len(jobs), "tasks_skipped": skipped, "images": writer.written,
            "skipped_images": writer.skipped}


def synth_source_name(method: str, generator_kwargs: dict, source: str | None = None) -> str:
    """``source`` or the default validation-source name: ``method`` (``-<variant>`` appended for a
    non-default variant)."""
    variant = generator_kwargs.get("variant")
    return check_source_name(source or (method if variant in (None, "normal") else f"{method}-{variant}"))
