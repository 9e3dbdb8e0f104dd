"""``swsa verify``: is a store intact? And ``swsa relocate``: re-point a dataset's root.

:func:`verify_store` checks, and lists every problem it finds:

* the schema: the file opens as an swsa store this version reads, the catalogue has its columns
  and ``image_id`` equal to the row numbers, every embedding / patch-token matrix has one row
  (and one done flag, one checksum) per catalogued image, done flags are 0, 1 or 2, and rows
  flagged written are finite;
* every written embedding row (and patch-token row) against the CRC32 checksum stored when it
  was written (:mod:`swsa_store.row_writer`): a flipped byte is found;
* every usable catalogued image: its file exists and its sha256 is the catalogue's;
* orphaned temporary files of killed writers (:func:`swsa_store.locks.orphan_files`), which
  ``repair=True`` removes. Checked only when no writer is running.

:func:`relocate_dataset` records a new root for one dataset (paths are stored relative to it,
:mod:`swsa_store.paths`); a store written before relative paths gets them at the same time.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swsa_store.locks import lock_holder, orphan_files, remove_orphans, store_lock
from swsa_store.paths import dataset_root, root_dir, store_folder, stored_root
from swsa_store.row_writer import CHECK_BLOCK_ROWS, row_checksums
from swsa_store.schema import DONE_TODO, DONE_WRITTEN, IMAGE_COLUMNS, StoreError
from swsa_store.store import edit_store, open_store

__all__ = ["VerifyReport", "verify_store", "relocate_dataset", "file_sha256"]

#: Problems of one kind listed one by one before the rest are counted.
MAX_LISTED = 20


@dataclass
class VerifyReport:
    """What :func:`verify_store` found: ``problems`` (each one line; empty: intact), ``notes``
    (what could not be checked and why), ``repaired`` (files removed) and ``checked`` counts."""

    store: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed(problems: list[str], what: str, items: list[str]) -> None:
    problems += [f"{what}: {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        problems.append(f"{what}: ... and {len(items) - MAX_LISTED} more")


def verify_store(store_path: str | os.PathLike, *, repair: bool = False, images: bool = True) -> VerifyReport:
    """Check the store at ``store_path`` (see the module docstring); ``images=False`` skips
    hashing the image files. ``repair`` removes orphaned temporary files."""
    report = VerifyReport(str(store_path))
    try:
        store = open_store(store_path)
    except StoreError as error:
        report.problems.append(f"schema: {error}")
        return report
    with store:
        table = store.images()
        _check_catalog(table, report)
        for group_name, data_name in (("embeddings", "features"), ("patches", "tokens")):
            names = sorted(store.file[group_name]) if group_name in store.file else []
            for name in names:
                _check_matrix(store.file[group_name][name], f"{group_name}/{name}", data_name, len(table), report)
    if images:
        _check_files(table, report)
    _check_orphans(store_path, repair, report)
    return report


def _check_catalog(table, report: VerifyReport) -> None:
    missing = [c for c in IMAGE_COLUMNS if c not in table and c != "defect"]
    if missing:
        report.problems.append(f"schema: the catalogue lacks columns {missing}")
        return
    ids = table["image_id"].to_numpy()
    if not np.array_equal(ids, np.arange(len(table))):
        first = int(np.flatnonzero(ids != np.arange(len(table)))[0])
        report.problems.append(f"schema: catalogue row {first} has image_id {int(ids[first])} (ids must equal row numbers)")
    report.checked["images"] = len(table)


def _check_matrix(group, label: str, data_name: str, n_images: int, report: VerifyReport) -> None:
    """Shapes, done flags, finiteness and per-row checksums of one embedding or patch-token group."""
    if data_name not in group or "done" not in group:
        report.problems.append(f"schema: {label} lacks its {data_name!r} or 'done' dataset")
        return
    data, done = group[data_name], group["done"][...]
    if data.shape[0] != n_images or done.shape != (n_images,):
        report.problems.append(f"schema: {label} has {data.shape[0]} rows and {done.shape[0]} done flags for "
                               f"{n_images} catalogued images")
        return
    if not np.isin(done, (0, 1, 2)).all():
        report.problems.append(f"schema: {label} has done flags other than 0, 1, 2")
    sums = group["checksum"][...] if "checksum" in group else None
    if sums is None:
        report.notes.append(f"{label} was written before rows carried checksums; `swsa embed` adds them")
    bad, non_finite = [], []
    for lo in range(0, n_images, CHECK_BLOCK_ROWS):
        hi = min(lo + CHECK_BLOCK_ROWS, n_images)
        flags = done[lo:hi]
        if not (flags != DONE_TODO).any():
            continue
        rows = data[lo:hi]
        written = flags == DONE_WRITTEN
        finite = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
        non_finite += [str(lo + i) for i in np.flatnonzero(written & ~finite)]
        if sums is not None:
            wrong = (flags != DONE_TODO) & (row_checksums(rows) != sums[lo:hi])
            bad += [str(lo + i) for i in np.flatnonzero(wrong)]
    _listed(report.problems, f"checksum mismatch in {label} (row changed since it was written), image id", bad)
    _listed(report.problems, f"{label}: row flagged written is not finite, image id", non_finite)
    report.checked[label] = int((done != DONE_TODO).sum())


def _check_files(table, report: VerifyReport) -> None:
    usable = table[(table["status"] == "ok") & (table["path"].astype(str) != "")]
    missing, changed = [], []
    for row in usable.itertuples():
        path = Path(row.path)
        if not path.is_file():
            missing.append(f"{int(row.image_id)} {path}")
        elif row.sha256 and file_sha256(path) != row.sha256:
            changed.append(f"{int(row.image_id)} {path}")
    _listed(report.problems, "image file missing (image id, path)", missing)
    _listed(report.problems, "image file changed, sha256 differs from the catalogue (image id, path)", changed)
    report.checked["image files"] = len(usable)


def _check_orphans(store_path, repair: bool, report: VerifyReport) -> None:
    try:
        with store_lock(store_path, wait=0, clean=False):
            found = orphan_files(store_path, deep=True)
            if repair:
                report.repaired = [str(p) for p in remove_orphans(store_path, deep=True)]
    except StoreError:
        holder = lock_holder(store_path)
        report.notes.append(f"a writer is running (PID {holder.get('pid', '?')}); temporary files not checked")
        return
    if not repair:
        _listed(report.problems, "orphaned temporary file (remove with --repair)", [str(p) for p in found])
    report.checked["temporary files"] = len(found)


# --------------------------------------------------------------------------- relocate


def relocate_dataset(store_path: str | os.PathLike, dataset: str, new_root: str | os.PathLike, *,
                     check: bool = True) -> dict:
    """Record ``new_root`` as the root of ``dataset``'s real images (their paths are kept relative
    to it). A store that holds absolute paths gets them made relative to their old root first.
    ``check``: every usable image must exist under ``new_root`` (else a one-line error and no change).
    Returns ``{"dataset", "old_root", "new_root", "images"}``."""
    new_root = os.path.abspath(os.fspath(new_root))
    if not os.path.isdir(new_root):
        raise StoreError(f"--root {new_root} is not a folder")
    with edit_store(store_path) as store:
        table = store.images(raw_paths=True)
        held = sorted(set(table["dataset"]))
        if dataset not in held:
            raise StoreError(f"store {store_path} holds no dataset {dataset!r} (held: {', '.join(held) or 'none'})")
        mine = ((table["dataset"] == dataset) & (table["kind"] == "real")).to_numpy()
        old_root = _old_root(store, table, mine)
        relative = _relative_to(table["path"].to_numpy(dtype=object)[mine], old_root, dataset)
        if check:
            _require_files(table[mine], relative, new_root)
        paths = table["path"].to_numpy(dtype=object)
        paths[mine] = relative
        table["path"] = paths
        store.replace_images(table, {dataset: stored_root(new_root, store_folder(store_path))})
    return {"dataset": dataset, "old_root": old_root, "new_root": new_root, "images": int(mine.sum())}


def _old_root(store, table, mine: np.ndarray) -> str:
    recorded = store.dataset_roots().get(str(table["dataset"][mine].iloc[0]))
    if recorded is not None:
        return root_dir(recorded, store_folder(store.path))
    absolute = [p for p in table["path"][mine] if p and os.path.isabs(p)]
    return dataset_root(absolute) or store_folder(store.path)


def _relative_to(paths: np.ndarray, old_root: str, dataset: str) -> np.ndarray:
    out = paths.copy()
    prefix = old_root.rstrip(os.sep) + os.sep
    for i, path in enumerate(paths):
        if path and os.path.isabs(path):
            if not path.startswith(prefix):
                raise StoreError(f"image {path} of dataset {dataset!r} is not below its root {old_root}; "
                                 "cannot relocate it")
            out[i] = path[len(prefix):]
    return out


def _require_files(rows, relative: np.ndarray, new_root: str) -> None:
    usable = (rows["status"] == "ok").to_numpy() & np.array([bool(p) for p in relative])
    missing = [p for p in relative[usable] if not os.path.isfile(os.path.join(new_root, p))]
    if missing:
        raise StoreError(f"{len(missing)} of {int(usable.sum())} images are not under {new_root} (e.g. {missing[0]}); "
                         "nothing changed (pass --no-check to relocate anyway)")
