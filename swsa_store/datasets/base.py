"""The shared base of the index-file datasets (CUB, Flowers, MVTec-AD, VisA, Tiny-ImageNet, ELPV).

A loader subclasses :class:`PaperDataset` and lists its images as *entries* (``_entries()``:
dicts with ``rel_path``, ``class_name``, ``split``, ``source_index`` and optionally ``defect``
and the loader's :attr:`~PaperDataset.extra_columns`); the base reads and decodes each file once
and builds the samples table of :mod:`swsa_store.datasets` plus ``defect`` (and the extras).

Rules shared by every such loader:

* the root is checked when the object is built (:func:`dataset_root`); a root reached through
  symlinks (the root itself or a folder above it) is compared with the images by its real path,
  so the images inside it are inside it;
* an index path that leaves the root (``..``, absolute, or a symlink leading out) is a row with
  status ``"skipped"`` and reason ``"path escapes dataset root: ..."`` (:func:`escape_reason`);
* an image that cannot be read or decoded is a skipped row (:func:`inspect_image_file`);
* a class every one of whose images is skipped is an error naming the reasons
  (:func:`~swsa_store.samples.require_usable_classes`);
* a missing root, index file or folder raises :class:`FileNotFoundError` with one line naming
  the expected file and the layout; a malformed index line raises :class:`ValueError` naming
  the file and line (:func:`read_index`); a class with no images is recorded in
  ``skipped_classes``; a class with no training images becomes a skipped task (see
  :func:`swsa_store.tasks.build_tasks`).

Every loader's samples table has the columns of :data:`~swsa_store.samples.SAMPLE_COLUMNS` (same
sorting and dtypes) plus ``defect`` (:data:`PAPER_SAMPLE_COLUMNS`): the defect type of an image
of a defect dataset (MVTec-AD, VisA, ELPV): ``"good"`` for a normal image (train or test), else
the defect type; ``""`` for the multi-class datasets (CUB, Flowers, Tiny-ImageNet). A loader has
these attributes (read by :func:`swsa_store.catalog.catalog_dataset`):

``protocol``           ``"multiclass"`` (every other class is an anomaly) or ``"defect"`` (the
                       class is a product, anomalies are its defective test images); see
                       :func:`swsa_store.tasks.build_tasks`.
``class_labels``       ``{class_name: cleaned human-readable name}`` for prompts
                       (:func:`swsa_store.datasets.class_names.clean_class_name`).
``validation_source``  one sentence: which official split each task's real validation set
                       comes from (stored in the tasks table's attributes).
``skipped_classes``    ``[(class_name, reason)]`` classes that cannot become a task.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from swsa_store.datasets.registry import DEFAULT_EXTENSIONS
from swsa_store.samples import SAMPLE_COLUMNS, inspect_image_file, require_usable_classes

__all__ = [
    "NORMAL_DEFECT", "PAPER_SAMPLE_COLUMNS", "PaperDataset", "dataset_root", "escape_reason", "list_image_files",
    "parse_int", "read_index", "require_path", "visible_dirs",
]

logger = logging.getLogger(__name__)

#: The defect type of normal images in defect datasets.
NORMAL_DEFECT = "good"

#: Samples-table columns of these loaders: :data:`SAMPLE_COLUMNS` plus ``defect``.
PAPER_SAMPLE_COLUMNS: dict[str, str] = {**SAMPLE_COLUMNS, "defect": "str"}


def dataset_root(root: str | os.PathLike, layout: str, what: str) -> Path:
    """``root`` as an absolute path (symlinks kept: the ``path`` column shows what the user gave);
    :class:`FileNotFoundError` naming ``layout`` when it is not a folder."""
    path = Path(os.path.abspath(os.fspath(root)))
    if not path.is_dir():
        raise FileNotFoundError(f"{what} root {path} does not exist or is not a folder; {layout}")
    return path


def require_path(path: Path, layout: str, what: str) -> Path:
    """``path``, or a one-line :class:`FileNotFoundError` naming it and the expected ``layout``."""
    if not path.exists():
        raise FileNotFoundError(f"{what}: missing {path}; {layout}")
    return path


def escape_reason(rel: str, root_real: str, root: Path) -> str:
    """A skip reason when index path ``rel`` leaves the dataset root ("" when it stays inside).

    ``root_real`` is the root's real path (``os.path.realpath``), so a root reached through a
    symlink holds the files under its target.
    """
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
        return f"path escapes dataset root: {rel}"
    real = os.path.realpath(root / rel)
    if not (real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)):
        return f"path escapes dataset root: {rel} -> {real}"
    return ""


# --------------------------------------------------------------------------- index files and folders


def read_index(path: Path, n_fields: int, layout: str, what: str, sep: str | None = None) -> list[list[str]]:
    """Non-empty lines of a whitespace- (or ``sep``-) separated index file, ``n_fields`` each
    (:class:`FileNotFoundError` naming ``layout`` when it is missing).

    The last field keeps any further separators (``maxsplit``), so names may hold spaces.
    """
    require_path(path, layout, what)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {type(exc).__name__}: {exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(sep, n_fields - 1) if sep is None else line.rstrip("\r\n").split(sep)
        if len(fields) < n_fields:
            raise ValueError(f"{what}: {path} line {number} has {len(fields)} fields, expected {n_fields}: {line.strip()[:80]!r}")
        rows.append([f.strip() for f in fields])
    return rows


def parse_int(value: str, path: Path, what: str) -> int:
    """``int(value)``, or a one-line :class:`ValueError` naming the index file ``path`` it came from."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what}: {path} holds {value!r} where a number is expected") from None


def list_image_files(folder: Path, extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Sorted visible image files directly in ``folder`` ([] when it does not exist)."""
    if not folder.is_dir():
        return []
    exts = tuple(extensions)
    return sorted(
        folder / e.name for e in os.scandir(folder)
        if not e.name.startswith(".") and e.is_file() and os.path.splitext(e.name)[1].lower() in exts
    )


def visible_dirs(path: Path) -> list[str]:
    """Sorted names of non-hidden sub-directories of ``path`` (symlinked ones included)."""
    return sorted(e.name for e in os.scandir(path) if not e.name.startswith(".") and e.is_dir())


# --------------------------------------------------------------------------- the base class


class PaperDataset:
    """Shared machinery: entries -> inspected rows -> the samples table (cached).

    Subclasses set ``name``, ``protocol``, ``validation_source``, fill ``class_labels`` and
    implement ``_entries()``. ``extra_columns`` (``{column: dtype}``) are further samples-table
    columns after ``defect``, read from each entry (the catalog keeps only its own columns).
    """

    name = ""
    protocol = "multiclass"
    validation_source = ""
    extra_columns: dict[str, str] = {}

    def __init__(self, root: str | os.PathLike, name: str | None, layout: str, what: str):
        self.root = dataset_root(root, layout, what)
        # compare images with the root's real path: a root reached through a symlink keeps its files
        self._root_real = os.path.realpath(self.root)
        if name:
            self.name = name
        self.skipped_classes: list[tuple[str, str]] = []
        self.class_labels: dict[str, str] = {}
        self._table: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, name={self.name!r})"

    def _skip_class(self, cls: str, reason: str) -> None:
        self.skipped_classes.append((cls, reason))
        logger.warning("%s: skipping class %r: %s (under %s)", self.name, cls, reason, self.root)

    def _entries(self) -> list[dict[str, Any]]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _row(self, entry: dict[str, Any]) -> dict[str, Any]:
        """One samples-table row: the entry's file checked against the root, read and decoded."""
        rel = entry["rel_path"]
        reason = escape_reason(rel, self._root_real, self.root)
        path = os.path.normpath(os.path.join(self.root, rel)) if not reason else os.path.join(self.root, rel)
        if reason:
            status, digest, w, h = "skipped", "", 0, 0
        elif entry.get("skip_reason"):  # the loader already knows the row is unusable (a bad label)
            status, reason, digest, w, h = "skipped", entry["skip_reason"], "", 0, 0
        else:
            status, reason, digest, w, h = inspect_image_file(path)
        if status != "ok":
            logger.warning("%s: skipping %s: %s", self.name, rel, reason)
        return {
            "path": path, "rel_path": Path(rel).as_posix(), "class_name": entry["class_name"],
            "split": entry["split"], "dataset": self.name, "source_index": int(entry["source_index"]),
            "status": status, "skip_reason": reason, "sha256": digest, "width": w, "height": h,
            "defect": entry.get("defect", ""), **{c: entry[c] for c in self.extra_columns},
        }

    def samples(self) -> pd.DataFrame:
        """The samples table (columns :data:`PAPER_SAMPLE_COLUMNS` then ``extra_columns``);
        decoded once, then cached. A class whose every image is skipped raises :class:`ValueError`."""
        if self._table is None:
            rows = sorted((self._row(e) for e in self._entries()),
                          key=lambda r: (r["class_name"], r["split"], r["rel_path"]))
            columns = {**PAPER_SAMPLE_COLUMNS, **self.extra_columns}
            table = pd.DataFrame(rows, columns=list(columns)).astype(columns).reset_index(drop=True)
            require_usable_classes(table, self.name, self.root)
            self._table = table
            for cls in self.class_labels:
                # kept beside any other reason the class was skipped for: every reason that applies is recorded
                if cls not in set(self._table["class_name"]) and (cls, "no images listed") not in self.skipped_classes:
                    self._skip_class(cls, "no images listed")
        return self._table.copy()
