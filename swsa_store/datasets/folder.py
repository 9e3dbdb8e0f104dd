"""``folder``: images in class folders, ``root/<class>/<files>`` or ``root/{train,test}/<class>/<files>``
(see :class:`ImageFolderDataset`)."""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from swsa_store.datasets.base import visible_dirs
from swsa_store.datasets.registry import DEFAULT_EXTENSIONS, SPLITS, register_dataset
from swsa_store.samples import check_test_fraction, inspect_image_file, make_samples_table, require_usable_classes

__all__ = ["ImageFolderDataset"]

logger = logging.getLogger(__name__)

_FOLDER_LAYOUT = (
    "expected root/<class>/<image files> or root/train/<class>/<image files> "
    "+ root/test/<class>/<image files>"
)


def _is_within(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


@register_dataset("folder")
class ImageFolderDataset:
    """Images in class folders, in one of two layouts.

    * ``root/<class>/<files>`` — the split is made here: per class, the files (sorted by
      relative path) are shuffled with a generator seeded by ``(seed, crc32(class_name))`` and
      the first ``n_test = round(n * test_fraction)`` (half rounded up, clamped to
      ``1..n-1`` when ``n >= 2``) go to "test", the rest to "train"; a class with a single image
      puts it in "train". Seeding per class keeps a class's split unchanged when other classes
      are added or removed. Only decodable files count towards ``n`` and take part in the
      split, so a corrupt file changes no other image's split (skipped rows are marked "train").
    * ``root/train/<class>/<files>`` + ``root/test/<class>/<files>`` — splits as given (chosen
      when the root's visible sub-folders are ``train`` and/or ``test`` only).

    Files are found recursively inside each class folder; names starting with "." (files and
    folders) are ignored, as are files whose extension (case-insensitive) is not in
    ``extensions``. Symlinked sub-folders are not followed (logged).

    Bad input:

    * missing root -> :class:`FileNotFoundError`; no class folders -> :class:`ValueError`
      (both one line, naming the path and the expected layout);
    * a class folder with no image files -> not an error: recorded in
      :attr:`skipped_classes` as ``(class_name, reason)`` and logged as a warning;
    * an image that cannot be fully decoded (corrupt, truncated) -> a row with status
      "skipped" and ``skip_reason`` "cannot decode image: <short error>";
    * a symlink whose target lies outside ``root`` -> a row with status "skipped" and
      ``skip_reason`` "symlink escapes dataset root: ..." (the root itself is compared by its real
      path, so a root reached through a symlink, or under a symlinked folder, keeps its files);
    * a class every one of whose images is skipped -> :class:`ValueError` naming the reasons.

    The root and layout are checked, and files listed, when the object is built; images are
    decoded and hashed on the first :meth:`samples` call.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        name: str | None = None,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        test_fraction: float = 0.5,
        seed: int = 0,
    ):
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.name = name or self.root.name or "folder"
        self.extensions = tuple(
            e.lower() if e.startswith(".") else "." + e.lower() for e in extensions
        )
        self.test_fraction = check_test_fraction(test_fraction)
        self.seed = int(seed)
        #: ``(class_name, reason)`` for class folders that hold no image files.
        self.skipped_classes: list[tuple[str, str]] = []
        self.layout: str = ""  # "class" or "split"
        self._table: pd.DataFrame | None = None

        if not self.root.exists():
            raise FileNotFoundError(
                f"dataset root {self.root} does not exist; {_FOLDER_LAYOUT}"
            )
        if not self.root.is_dir():
            raise NotADirectoryError(
                f"dataset root {self.root} is not a directory; {_FOLDER_LAYOUT}"
            )
        # images are compared with the root's real path, so a root reached through a symlink (or under
        # a symlinked folder) holds its files; only a symlink leading out of that real root escapes
        self._root_real = os.path.realpath(self.root)
        self._files = self._scan()  # list of (class_name, split or None, rel_path)

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, name={self.name!r}, "
            f"layout={self.layout!r}, test_fraction={self.test_fraction}, seed={self.seed})"
        )

    # -- scanning

    def _list_images(self, class_dir: Path) -> list[str]:
        """Relative ("/"-separated, from root) paths of image files under ``class_dir``."""
        found = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
            kept = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                if os.path.islink(os.path.join(dirpath, d)):
                    logger.warning(
                        "%s: not following symlinked folder %s", self.name, os.path.join(dirpath, d)
                    )
                    continue
                kept.append(d)
            dirnames[:] = kept
            for f in filenames:
                if f.startswith(".") or os.path.splitext(f)[1].lower() not in self.extensions:
                    continue
                full = os.path.join(dirpath, f)
                found.append(Path(os.path.relpath(full, self.root)).as_posix())
        return sorted(found)

    def _scan(self) -> list[tuple[str, str | None, str]]:
        top = visible_dirs(self.root)
        if not top:
            raise ValueError(f"no class folders in dataset root {self.root}; {_FOLDER_LAYOUT}")
        split_dirs = [d for d in top if d in SPLITS]
        if split_dirs and len(split_dirs) != len(top):
            others = ", ".join(d for d in top if d not in SPLITS)
            raise ValueError(
                f"ambiguous layout in dataset root {self.root}: it mixes split folders "
                f"({', '.join(split_dirs)}) with class folders ({others}); {_FOLDER_LAYOUT}"
            )
        files: list[tuple[str, str | None, str]] = []
        if split_dirs:
            self.layout = "split"
            for missing in set(SPLITS) - set(split_dirs):
                logger.warning("%s: no %s/ folder in %s", self.name, missing, self.root)
            any_class = False
            for split in split_dirs:
                for cls in visible_dirs(self.root / split):
                    any_class = True
                    images = self._list_images(self.root / split / cls)
                    if not images:
                        self._skip_class(cls, f"no image files in {split}/{cls}/")
                    files.extend((cls, split, rel) for rel in images)
            if not any_class:
                raise ValueError(
                    f"no class folders under {', '.join(d + '/' for d in split_dirs)} "
                    f"in dataset root {self.root}; {_FOLDER_LAYOUT}"
                )
        else:
            self.layout = "class"
            for cls in top:
                images = self._list_images(self.root / cls)
                if not images:
                    self._skip_class(cls, f"no image files in {cls}/")
                files.extend((cls, None, rel) for rel in images)
        return files

    def _skip_class(self, cls: str, reason: str) -> None:
        self.skipped_classes.append((cls, reason))
        logger.warning("%s: skipping class %r: %s (under %s)", self.name, cls, reason, self.root)

    # -- splitting

    def _n_test(self, n: int) -> int:
        if n < 2:
            return 0
        n_test = int(np.floor(n * self.test_fraction + 0.5))
        return min(max(n_test, 1), n - 1)

    def _assign_splits(self, usable: set[str]) -> dict[str, str]:
        """rel path → split. Only ``usable`` (decodable) files take part in the seeded per-class
        split, so a corrupt file changes no other image's split; skipped files are marked "train"."""
        if self.layout == "split":
            return {r: s for _, s, r in self._files}  # type: ignore[misc]
        by_class: dict[str, list[str]] = {}
        for cls, _, rel in self._files:
            if rel in usable:
                by_class.setdefault(cls, []).append(rel)
        out = {rel: "train" for _, _, rel in self._files}
        for cls, rels in by_class.items():
            rels = sorted(rels)
            rng = np.random.default_rng([self.seed, zlib.crc32(cls.encode("utf-8"))])
            order = rng.permutation(len(rels))
            test = set(order[: self._n_test(len(rels))].tolist())
            out.update({rel: "test" if k in test else "train" for k, rel in enumerate(rels)})
        return out

    # -- table

    def samples(self) -> pd.DataFrame:
        """The samples table; images are decoded and hashed on the first call (then cached)."""
        if self._table is None:
            rows = []
            inspected = {}
            for cls, _, rel in self._files:
                path = os.path.join(self.root, *rel.split("/"))
                if not _is_within(path, self._root_real):  # a symlink (file or folder) led out
                    target = os.path.realpath(path)
                    inspected[rel] = ("skipped", f"symlink escapes dataset root: -> {target}", "", 0, 0)
                else:
                    inspected[rel] = inspect_image_file(path)
            splits = self._assign_splits({rel for rel, info in inspected.items() if info[0] == "ok"})
            for cls, _, rel in self._files:
                path = os.path.join(self.root, *rel.split("/"))
                status, reason, digest, w, h = inspected[rel]
                split = splits[rel]
                if status != "ok":
                    logger.warning("%s: skipping %s: %s", self.name, rel, reason)
                rows.append(
                    {
                        "path": path,
                        "rel_path": rel,
                        "class_name": cls,
                        "split": split,
                        "dataset": self.name,
                        "source_index": 0,
                        "status": status,
                        "skip_reason": reason,
                        "sha256": digest,
                        "width": w,
                        "height": h,
                    }
                )
            table = make_samples_table(rows)
            table["source_index"] = np.arange(len(table), dtype=np.int64)
            require_usable_classes(table, self.name, self.root)
            self._table = table
        return self._table.copy()
