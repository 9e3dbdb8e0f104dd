"""Dataset extension point: every dataset is first a *samples table*.

Following anomalib's "samples table first" design, a dataset does not hand out tensors; it
describes every one of its image files as one row of a :class:`pandas.DataFrame`. Everything
downstream (the catalog that assigns image ids, task construction, ingest) reads that table.

Extension point (see :mod:`swsa_store.registry`)::

    DATASETS = Registry("dataset")
    @register_dataset("name")          # decorator on a class or factory function
    create_dataset(name, **kwargs)     # -> a dataset object
    list_datasets()                    # -> sorted registered names

A dataset object has ``name: str`` and ``samples() -> pd.DataFrame`` (see :class:`Dataset`).

Samples table columns (:data:`SAMPLE_COLUMNS`, in this order)
--------------------------------------------------------------
``path``          str   absolute path of the image file (symlinks are *not* resolved).
``rel_path``      str   path relative to the dataset root, "/"-separated (stable across
                        machines; two renders into different folders differ only in ``path``).
``class_name``    str   the class; for these generic datasets every class is just a class
                        (which class is "normal" is decided later, per task).
``split``         str   "train" or "test".
``dataset``       str   the dataset's ``name``.
``source_index``  int   index of the sample in the original dataset (digits: the index into
                        ``load_digits()``), otherwise a running number in table order.
``status``        str   "ok" or "skipped". Rows are never silently dropped: an image that
                        cannot be decoded, or a symlink escaping the root, is kept as a row
                        with status "skipped".
``skip_reason``   str   why a row was skipped ("" when ok), e.g.
                        "cannot decode image: UnidentifiedImageError: cannot identify image file".
``sha256``        str   hex SHA-256 of the file bytes; "" when the file could not be read.
``width``         int   decoded width in pixels; 0 when skipped.
``height``        int   decoded height in pixels; 0 when skipped.

Rows are sorted by ``(class_name, split, rel_path)`` (plain code-point order) and the index
is ``0..n-1``, so image ids assigned in table order are stable across runs and machines.

Datasets
--------
``digits``  :class:`DigitsDataset` — scikit-learn's bundled handwritten digits, rendered to PNG.
``folder``  :class:`ImageFolderDataset` — any ``root/<class>/<files>`` or
            ``root/{train,test}/<class>/<files>`` folder.

and, registered on import of this module: ``cub``, ``flowers``, ``mvtec``, ``visa``,
``tinyimagenet`` (:mod:`swsa_store.datasets.paper`) and ``elpv`` (:mod:`swsa_store.datasets.elpv`).

:func:`read_image` is the one place that turns a file into an RGB :class:`PIL.Image.Image`;
it raises :class:`ImageReadError` (a ``ValueError``) with a one-line message;
:func:`inspect_image_file` reads a file into a row's status, reason, hash and size. Both, and
:data:`SAMPLE_COLUMNS`, live in :mod:`swsa_store.samples` (re-exported here). A class every one
of whose images is skipped is an error naming the reasons
(:func:`~swsa_store.samples.require_usable_classes`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from PIL import Image

from swsa_store.registry import Registry
from swsa_store.samples import SAMPLE_COLUMNS, ImageReadError, inspect_image_file, read_image, require_usable_classes

__all__ = [
    "DATASETS",
    "SAMPLE_COLUMNS",
    "DEFAULT_EXTENSIONS",
    "Dataset",
    "DigitsDataset",
    "ImageFolderDataset",
    "ImageReadError",
    "create_dataset",
    "inspect_image_file",
    "list_datasets",
    "read_image",
    "register_dataset",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_FOLDER_LAYOUT = (
    "expected root/<class>/<image files> or root/train/<class>/<image files> "
    "+ root/test/<class>/<image files>"
)


# --------------------------------------------------------------------------- registry

DATASETS: Registry = Registry("dataset")


def register_dataset(name: str | None = None, *, overwrite: bool = False) -> Callable:
    """Decorator registering a dataset class or factory under ``name``."""
    return DATASETS.register(name, overwrite=overwrite)


def create_dataset(name: str, /, **kwargs: Any) -> "Dataset":
    """Build the dataset registered as ``name``; unknown names list the valid ones."""
    return DATASETS.create(name, **kwargs)


def list_datasets() -> list[str]:
    """Sorted names of the registered datasets."""
    return DATASETS.names()


@runtime_checkable
class Dataset(Protocol):
    """What every registered dataset provides."""

    name: str

    def samples(self) -> pd.DataFrame:
        """The samples table (columns: :data:`SAMPLE_COLUMNS`)."""
        ...


# --------------------------------------------------------------------------- table helpers


def _make_table(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Build the samples table: fixed columns and dtypes, sorted, index 0..n-1."""
    rows = sorted(rows, key=lambda r: (r["class_name"], r["split"], r["rel_path"]))
    df = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))
    return df.astype(SAMPLE_COLUMNS).reset_index(drop=True)


def _check_fraction(test_fraction: float) -> float:
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    return test_fraction


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file and ``os.replace``.

    A process killed mid-write leaves at most a hidden ``.<name>.<pid>.tmp`` file (ignored by
    :class:`ImageFolderDataset`), never a half-written ``path``. No fsync: after a power
    loss a file may hold wrong bytes, but a re-render compares bytes and rewrites it.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- digits

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC}


@register_dataset("digits")
class DigitsDataset:
    """scikit-learn's bundled handwritten digits (1,797 images, classes "0".."9"), as PNGs.

    Each 8x8 image (values 0..16) is scaled to 0..255 (``round(v * 255 / 16)``), upsampled to
    ``image_size`` x ``image_size`` and written as an RGB PNG (the grey value copied to all
    three channels) to ``image_dir/<class>/<index:04d>.png``, where ``index`` is the sample's
    index in ``load_digits()`` (also its ``source_index``).

    Upsampling defaults to **nearest neighbour** (``resample="nearest"``): it is exact (every
    pixel is one of the 17 original grey levels), identical across Pillow versions, and keeps
    the 8x8 grid visible. ``resample="bicubic"`` gives smoother strokes instead.

    PNG bytes are deterministic (fixed ``compress_level``, no metadata chunks), so the same
    Pillow/zlib build writes the same bytes every run. Rendering is idempotent: a file that
    already holds exactly the right bytes is left untouched; anything else is (re)written
    atomically (temporary file + ``os.replace``).

    The split is a deterministic stratified split:
    ``train_test_split(indices, test_size=test_fraction, stratify=target, random_state=seed)``.

    Rendering happens on the first :meth:`samples` call (or an explicit :meth:`render`).
    """

    name = "digits"
    class_names = tuple(str(d) for d in range(10))

    def __init__(
        self,
        image_dir: str | os.PathLike,
        image_size: int = 64,
        test_fraction: float = 0.5,
        seed: int = 0,
        resample: str = "nearest",
    ):
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        self.image_dir = Path(os.path.abspath(os.fspath(image_dir)))
        self.image_size = int(image_size)
        self.test_fraction = _check_fraction(test_fraction)
        self.seed = int(seed)
        self.resample = resample
        #: Number of files written by the last :meth:`render` (0 when all were up to date).
        self.files_written = 0
        self._table: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return (
            f"DigitsDataset(image_dir={str(self.image_dir)!r}, image_size={self.image_size}, "
            f"test_fraction={self.test_fraction}, seed={self.seed}, resample={self.resample!r})"
        )

    def _png_bytes(self, image: np.ndarray) -> bytes:
        grey = np.rint(np.asarray(image, dtype=np.float64) * (255.0 / 16.0))
        grey = np.clip(grey, 0, 255).astype(np.uint8)
        img = Image.fromarray(grey)  # uint8 2-D -> mode "L"
        if self.image_size != img.width:
            img = img.resize((self.image_size, self.image_size), _RESAMPLE[self.resample])
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG", compress_level=6, optimize=False)
        return buf.getvalue()

    def render(self) -> pd.DataFrame:
        """Write the PNGs that are missing or differ, and return the samples table."""
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images, target = digits.images, digits.target
        indices = np.arange(len(target))
        _, test_idx = train_test_split(
            indices, test_size=self.test_fraction, stratify=target, random_state=self.seed
        )
        is_test = np.zeros(len(target), dtype=bool)
        is_test[test_idx] = True

        written = 0
        rows = []
        for cls in self.class_names:
            (self.image_dir / cls).mkdir(parents=True, exist_ok=True)
        for i in indices:
            cls = str(int(target[i]))
            rel = f"{cls}/{i:04d}.png"
            dest = self.image_dir / cls / f"{i:04d}.png"
            data = self._png_bytes(images[i])
            try:
                up_to_date = dest.is_file() and dest.read_bytes() == data
            except OSError:
                up_to_date = False
            if not up_to_date:
                _atomic_write(dest, data)
                written += 1
            rows.append(
                {
                    "path": str(dest),
                    "rel_path": rel,
                    "class_name": cls,
                    "split": "test" if is_test[i] else "train",
                    "dataset": self.name,
                    "source_index": int(i),
                    "status": "ok",
                    "skip_reason": "",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "width": self.image_size,
                    "height": self.image_size,
                }
            )
        self.files_written = written
        if written:
            logger.info("digits: wrote %d of %d PNGs to %s", written, len(rows), self.image_dir)
        self._table = _make_table(rows)
        return self._table.copy()

    def samples(self) -> pd.DataFrame:
        """The samples table (renders on first call; later calls return a cached copy)."""
        if self._table is None:
            return self.render()
        return self._table.copy()


# --------------------------------------------------------------------------- image folders


def _visible_dirs(path: Path) -> list[str]:
    """Sorted names of non-hidden sub-directories of ``path`` (symlinked ones included)."""
    return sorted(e.name for e in os.scandir(path) if not e.name.startswith(".") and e.is_dir())


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
        self.test_fraction = _check_fraction(test_fraction)
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
        top = _visible_dirs(self.root)
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
                for cls in _visible_dirs(self.root / split):
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
            table = _make_table(rows)
            table["source_index"] = np.arange(len(table), dtype=np.int64)
            require_usable_classes(table, self.name, self.root)
            self._table = table
        return self._table.copy()


import swsa_store.datasets.paper as _paper_datasets  # noqa: E402,F401  (registers cub, flowers, mvtec, visa, tinyimagenet)
import swsa_store.datasets.elpv as _elpv  # noqa: E402,F401  (registers elpv)
