"""Export each task's validation data as folders that other tools read as they are.

``swsa export-validation --store S --format anomalib-folder OUT [--tasks ...]`` writes, per
task, a folder that anomalib's ``Folder`` datamodule (or any tool reading class folders) reads
without conversion::

    OUT/
      manifest.csv                       every exported file of every task (paths relative to OUT)
      <task>/                            e.g. 00003_digits_3  (task id, dataset, normal class)
        manifest.csv                     this task's files (paths relative to <task>/)
        train/good/<image_id>.<ext>      training normals (see ``train`` below)
        val/good/<image_id>.<ext>        held-out normal images         (label 0)
        val/<generator>/<image_id>.<ext> synthetic anomalies per source (label 1), e.g.
                                         val/cutpaste, val/cutpaste-scar, val/perlin
        test/good/<image_id>.<ext>       real test normals              (label 0)
        test/<group>/<image_id>.<ext>    real test anomalies per group  (label 1): the other
                                         class, or the defect type (MVTec-AD, VisA)

``train``: ``"disjoint"`` (default) puts in ``train/good`` the support images that are *not*
held out (the seed images), so no validation normal is a training image (a memory-bank model
such as PatchCore would score its own training images ~0 and every synthetic anomaly above
them). When a task's seeds are its held-out images (support no larger than ``n_seed``, e.g.
Oxford Flowers) disjoint sets are impossible: ``train/good`` is then the whole support, the
manifest marks those validation rows ``in_train=1`` and a warning is logged. ``"support"``
puts the whole support set (seeds and held-out) in ``train/good``, as swsa's own kNN bank
(swsa scores held-out normals leave-one-out; a tool that cannot must not use this mode for
validation). ``include_test=False`` leaves out ``test/``.

Manifest columns: ``file``, ``image_id``, ``task`` (task id), ``task_dir``, ``split`` (train,
val, test), ``role`` (seed, heldout, real_normal, real_anomaly, synthetic), ``label`` (0
normal, 1 anomaly), ``generator`` (the synthetic source, else empty), ``group`` (a real
anomaly's class or defect type, else empty), ``in_train`` (1 when the image is also in this
task's ``train/good``). Apart from the extra ``train`` rows of ``train="support"``, the
non-synthetic rows are exactly the store's task members.

Files are hard links to the store's files (fallback, e.g. across file systems: byte copies;
``link=False``: always copies), never re-encoded; names are the stable image id plus the
source's suffix (lower case). Exporting again is idempotent: files already in place are kept,
changed ones replaced atomically, files of an earlier export no longer wanted are removed, and
the root manifest keeps the rows of tasks not exported this time.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from swsa_store.catalog import resolve_path
from swsa_store.csv_safe import read_csv, write_csv
from swsa_store.store import open_store
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED, ROLES

log = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "MANIFEST_COLUMNS", "TRAIN_MODES", "export_validation", "task_dir_name"]

EXPORT_FORMATS = ("anomalib-folder",)
TRAIN_MODES = ("disjoint", "support")
MANIFEST_COLUMNS = ["file", "image_id", "task", "task_dir", "split", "role", "label", "generator", "group", "in_train"]
NORMAL_DIR = "good"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(value: object) -> str:
    text = _UNSAFE.sub("_", str(value)).strip("._")
    return text or "_"


def task_dir_name(task_id: int, dataset: str, normal_class: str) -> str:
    """The folder of one task: ``<task id, 5 digits>_<dataset>_<normal class>`` (file-name safe)."""
    return f"{int(task_id):05d}_{_slug(dataset)}_{_slug(normal_class)}"


def _select_tasks(tasks: pd.DataFrame, wanted: Sequence[int | str] | None, store_path) -> pd.DataFrame:
    tasks = tasks.assign(task_dir=[task_dir_name(t, d, c) for t, d, c in
                                   zip(tasks["task_id"], tasks["dataset"], tasks["normal_class"])])
    if wanted is None:
        return tasks[tasks["status"] == "ok"]
    by_id = {int(t): i for i, t in zip(tasks.index, tasks["task_id"])}
    by_dir = {d: i for i, d in zip(tasks.index, tasks["task_dir"])}
    picked = []
    for item in wanted:
        text = str(item).strip()
        index = by_id.get(int(text)) if re.fullmatch(r"\d+", text) else by_dir.get(text)
        if index is None:
            raise ValueError(
                f"unknown task {text!r} in store {store_path}; give task ids or folder names "
                f"(e.g. {tasks['task_id'].iloc[0] if len(tasks) else 0} or "
                f"{tasks['task_dir'].iloc[0] if len(tasks) else '00000_dataset_class'}; see `swsa info --store {store_path}`)"
            )
        row = tasks.loc[index]
        if row["status"] != "ok":
            raise ValueError(f"task {text!r} is a skipped task ({row['skip_reason']}); it has no validation set to export")
        if index not in picked:
            picked.append(index)
    return tasks.loc[picked]


def _place(src: Path, dst: Path, link: bool, counts: dict) -> None:
    """Put ``src``'s bytes at ``dst``: keep what is already there, else hard-link (or copy), atomically."""
    if dst.exists():
        try:
            if os.path.samefile(src, dst):
                counts["unchanged"] += 1
                return
        except OSError:
            pass
        if dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
            counts["unchanged"] += 1
            return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    linked = False
    if link:
        try:
            os.link(src, tmp)
            linked = True
        except OSError:  # other file system, no hard links allowed, ...: copy the bytes
            linked = False
    if not linked:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    counts["linked" if linked else "copied"] += 1


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    """``frame`` to ``path`` (atomically, untouched when unchanged), text cells formula-escaped
    (:func:`swsa_store.csv_safe.write_csv`: class names and generators come from user data)."""
    text = write_csv(frame, None, lineterminator="\n")
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _task_rows(task, members: pd.DataFrame, synthetic: pd.DataFrame, path_of: dict[int, str],
               train: str, include_test: bool) -> pd.DataFrame:
    """The manifest rows of one task (``file`` relative to the task folder), before linking."""
    mine = members[members["task_id"] == task.task_id]
    seed_ids = set(mine.loc[mine["role"] == ROLE_SEED, "image_id"].astype(int))
    heldout_ids = set(mine.loc[mine["role"] == ROLE_HELDOUT, "image_id"].astype(int))
    rows: list[dict] = []

    def add(image_id: int, split: str, folder: str, role: str, label: int, generator: str = "", group: str = ""):
        suffix = os.path.splitext(path_of[image_id])[1].lower()
        rows.append({"file": f"{split}/{folder}/{image_id:07d}{suffix}", "image_id": int(image_id),
                     "task": int(task.task_id), "task_dir": task.task_dir, "split": split, "role": role,
                     "label": label, "generator": generator, "group": group})

    train_ids = seed_ids - heldout_ids if train == "disjoint" else seed_ids | heldout_ids
    if not train_ids:  # seeds are the held-out images: disjoint sets are impossible
        train_ids = seed_ids | heldout_ids
    for member in mine.itertuples():
        image_id, role = int(member.image_id), int(member.role)
        if role == ROLE_SEED:
            if image_id in train_ids:
                add(image_id, "train", NORMAL_DIR, ROLES[role], 0)
        elif role == ROLE_HELDOUT:
            add(image_id, "val", NORMAL_DIR, ROLES[role], 0)
            if train == "support" and image_id not in seed_ids:
                add(image_id, "train", NORMAL_DIR, ROLES[role], 0)
        elif not include_test:
            continue
        elif role == ROLE_REAL_NORMAL:
            add(image_id, "test", NORMAL_DIR, ROLES[role], 0)
        elif role == ROLE_REAL_ANOMALY:
            group = str(member.group) if str(member.group) else "anomaly"
            add(image_id, "test", _slug(group), ROLES[role], 1, group=str(member.group))
    for source, group in synthetic.groupby("kind", sort=True):
        folder = _slug(source)
        if folder == NORMAL_DIR:
            raise ValueError(f"synthetic source {source!r} would be exported as the normal folder {NORMAL_DIR!r}; "
                             "rename that source (swsa synth --source NAME)")
        for image_id in group["image_id"].astype(int):
            add(image_id, "val", folder, "synthetic", 1, generator=str(source))
    frame = pd.DataFrame(rows, columns=[c for c in MANIFEST_COLUMNS if c != "in_train"])
    frame = frame.sort_values(["split", "file", "role"], kind="stable", ignore_index=True)
    in_train = set(frame.loc[frame["split"] == "train", "image_id"])
    frame["in_train"] = frame["image_id"].isin(in_train).astype(int)
    folders = frame.drop_duplicates(["split", "file"]).assign(folder=lambda f: f["file"].str.rsplit("/", n=1).str[0])
    clash = folders.groupby("folder")[["generator", "group"]].nunique().max(axis=1)
    if len(clash) and clash.max() > 1:
        raise ValueError(f"task {task.task_id}: two sources or groups share the folder {clash.idxmax()!r} "
                         "after making their names file-name safe; rename one of them")
    return frame


def export_validation(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str = "anomalib-folder",
    tasks: Iterable[int | str] | None = None,
    train: str = "disjoint",
    include_test: bool = True,
    link: bool = True,
) -> dict:
    """Export the validation set of every ok task (or of ``tasks``: ids or folder names) to ``out_dir``.

    See the module docstring for the layout, ``train`` modes and manifest. Returns ``{"out",
    "tasks", "files", "linked", "copied", "unchanged", "removed", "overlapping_tasks"}``
    (``overlapping_tasks``: ids of tasks whose validation normals are also in ``train/good``).
    """
    _check_export_args(store_path, format, train)
    with open_store(store_path) as store:
        images, all_tasks, members = store.images(), store.tasks(), store.task_members()
    wanted = None if tasks is None else [t for t in tasks]
    selected = _select_tasks(all_tasks, wanted, store_path)
    path_of = dict(zip(images["image_id"].astype(int).tolist(), images["path"].astype(str).tolist()))
    synthetic_all = images[(images["kind"] != "real") & (images["status"] == "ok")]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"linked": 0, "copied": 0, "unchanged": 0, "removed": 0}
    frames, overlapping = [], []
    for task in selected.itertuples():
        frame = _task_rows(task, members, synthetic_all[synthetic_all["task_id"] == task.task_id], path_of,
                           train, include_test)
        if ((frame["split"] == "val") & (frame["label"] == 0) & (frame["in_train"] == 1)).any() and train == "disjoint":
            overlapping.append(int(task.task_id))
        _export_task(task, frame, out / task.task_dir, store_path, path_of, link, counts)
        frames.append(frame.assign(file=task.task_dir + "/" + frame["file"]))
    if overlapping:
        log.warning("tasks %s: the seed images are the held-out images (support <= n_seed), so their validation "
                    "normals are also in train/good (manifest in_train=1)", overlapping[:10])
    _write_root_manifest(out / "manifest.csv", frames)
    return {"out": str(out), "tasks": len(frames), "files": int(sum(len(f) for f in frames)), **counts,
            "overlapping_tasks": overlapping}


def _check_export_args(store_path, format: str, train: str) -> None:
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid formats: {', '.join(EXPORT_FORMATS)}")
    if train not in TRAIN_MODES:
        raise ValueError(f"unknown train mode {train!r}; valid modes: {', '.join(TRAIN_MODES)}")
    if not Path(store_path).exists():
        raise FileNotFoundError(f"store {store_path} does not exist; make it with `swsa catalog ... --store {store_path}`")


def _export_task(task, frame: pd.DataFrame, task_root: Path, store_path, path_of: dict[int, str], link: bool,
                 counts: dict) -> None:
    """Put one task's files (``frame``: its manifest rows) in ``task_root``, drop the ones an
    earlier export left there and are no longer wanted, then write its manifest."""
    previous = task_root / "manifest.csv"
    unique = frame.drop_duplicates("file")
    for file, image_id in zip(unique["file"].tolist(), unique["image_id"].tolist()):
        src = resolve_path(store_path, path_of[int(image_id)])
        if not src.is_file():
            raise FileNotFoundError(f"image {int(image_id)} of task {task.task_id}: file {src} is missing; "
                                    "the store's files were moved or deleted")
        _place(src, task_root / file, link, counts)
    if previous.exists():
        _remove_unwanted(task_root, previous, set(frame["file"]), counts)
    _write_csv(previous, frame[MANIFEST_COLUMNS])


def _remove_unwanted(task_root: Path, previous: Path, wanted: set[str], counts: dict) -> None:
    """Remove the files listed in the earlier export's manifest ``previous`` that are not ``wanted``
    (only inside ``task_root``), and the folders that leaves empty."""
    old = read_csv(previous, dtype=str, keep_default_na=False)
    for file in sorted(set(old.get("file", [])) - wanted):
        path = task_root / file
        if path.is_file() and task_root.resolve() in path.resolve().parents:
            path.unlink()
            counts["removed"] += 1
            for parent in (path.parent, path.parent.parent):
                if parent != task_root and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()


def _write_root_manifest(root_manifest: Path, frames: list[pd.DataFrame]) -> None:
    """Write the exported tasks' rows (``frames``) plus the rows of tasks an earlier export wrote and
    this one did not touch."""
    exported = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=MANIFEST_COLUMNS)
    if root_manifest.exists():
        old = read_csv(root_manifest, keep_default_na=False, dtype={"generator": str, "group": str})
        kept = old[~old["task"].isin(exported["task"].unique())] if "task" in old else old.iloc[0:0]
        exported = pd.concat([kept, exported], ignore_index=True)
    exported = exported[MANIFEST_COLUMNS].sort_values(["task", "split", "file"], kind="stable", ignore_index=True)
    _write_csv(root_manifest, exported)
