"""The paper's datasets, read from their official on-disk layouts (nothing is downloaded).

Every loader builds the samples table of :mod:`swsa_store.datasets` (columns
:data:`~swsa_store.datasets.SAMPLE_COLUMNS`, same sorting and dtypes) plus one extra column:

``defect``  str  the defect type of an image of a defect dataset (MVTec-AD, VisA): ``"good"``
                 for a normal image (train or test), else the defect type; ``""`` for the
                 multi-class datasets (CUB, Flowers, Tiny-ImageNet).

and these attributes (read by :func:`swsa_store.catalog.catalog_dataset`):

``protocol``           ``"multiclass"`` (every other class is an anomaly) or ``"defect"`` (the
                       class is a product, anomalies are its defective test images); see
                       :func:`swsa_store.tasks.build_tasks`.
``class_labels``       ``{class_name: cleaned human-readable name}`` for prompts
                       (:func:`swsa_store.datasets.class_names.clean_class_name`).
``validation_source``  one sentence: which official split each task's real validation set
                       comes from (stored in the tasks table's attributes).
``skipped_classes``    ``[(class_name, reason)]`` classes that cannot become a task.

Registered names and layouts (``root`` is the folder holding the files listed):

``cub``           CUB-200-2011: ``images.txt`` (``<id> <path under images/>``),
                  ``image_class_labels.txt`` (``<id> <class id>``), ``train_test_split.txt``
                  (``<id> <1 = train, 0 = test>``), ``classes.txt`` (``<class id> <name>``),
                  ``images/<NNN.Name>/<file>.jpg``. class_name = the ``classes.txt`` name.
``flowers``       Oxford Flowers-102: ``jpg/image_NNNNN.jpg``, ``imagelabels.mat`` (``labels``,
                  1..102 per image), ``setid.mat`` (``trnid``, ``valid``, ``tstid``: 1-based
                  image numbers). class_name = the flower's name (:data:`FLOWERS_102_NAMES`).
                  train = ``trnid`` (10 per class); test (real validation) = ``valid`` (10 per
                  class) by default — the paper's "validation subsets"; ``validation="tstid"``
                  or ``"valid+tstid"`` chooses otherwise. Images of the unused set are not
                  catalogued.
``mvtec``         MVTec-AD: ``<category>/train/good/*.png`` (train),
                  ``<category>/test/<defect type or good>/*.png`` (test),
                  ``<category>/ground_truth/<defect>/*_mask.png`` (masks; not catalogued).
``visa``          VisA: ``split_csv/1cls.csv`` (``object,split,label,image,mask``; split
                  train/test, label normal/anomaly) over ``<object>/Data/Images/...``; the
                  defect type of an anomalous image from ``<object>/image_anno.csv``
                  (``image,label,mask``). A label listing several defects ("a,b") is one
                  image in one group: ``multi_defect="multiple"`` (default) puts every
                  multi-defect image of a product into the single group ``"multiple"``;
                  ``"combined"`` uses the sorted defects joined by ``"+"``; ``"first"`` the
                  first listed defect.
``tinyimagenet``  Tiny-ImageNet-200: ``wnids.txt``, ``words.txt``,
                  ``train/<wnid>/images/*.JPEG`` (train), ``val/val_annotations.txt`` over
                  ``val/images/*.JPEG`` (test). ``test/`` (unlabelled) is not catalogued.

Bad layouts: a missing root, index file or folder raises :class:`FileNotFoundError` with one
line naming the expected file and the layout; a malformed index line raises
:class:`ValueError` naming the file and line. An image that cannot be read or decoded, or a
path in an index file that escapes the dataset root, is a row with status ``"skipped"`` and
a reason; a class every one of whose images is skipped raises :class:`ValueError` naming the
reasons. A class with no images is recorded in ``skipped_classes``; a class with no training
images becomes a skipped task (see :func:`swsa_store.tasks.build_tasks`). The shared machinery
(:class:`~swsa_store.datasets.base.PaperDataset`) lives in :mod:`swsa_store.datasets.base`; the
ELPV solar cells are in :mod:`swsa_store.datasets.elpv`.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from swsa_store.datasets.class_names import FLOWERS_102_NAMES, clean_class_name
from swsa_store.datasets.base import NORMAL_DEFECT, PAPER_SAMPLE_COLUMNS, PaperDataset, require_path
from swsa_store.datasets import DEFAULT_EXTENSIONS, register_dataset

__all__ = [
    "CUBDataset",
    "FlowersDataset",
    "MVTecDataset",
    "NORMAL_DEFECT",
    "PAPER_DATASETS",
    "PAPER_SAMPLE_COLUMNS",
    "TinyImageNetDataset",
    "VisADataset",
]

logger = logging.getLogger(__name__)

#: The four datasets of the paper's benchmark (Tiny-ImageNet is its auxiliary-outlier source).
PAPER_DATASETS = ("cub", "flowers", "mvtec", "visa")

CUB_LAYOUT = "expected CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}"
FLOWERS_LAYOUT = "expected root/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}"
MVTEC_LAYOUT = "expected root/<category>/train/good/*.png and root/<category>/test/<defect type or good>/*.png"
VISA_LAYOUT = "expected root/split_csv/1cls.csv (object,split,label,image,mask) and root/<object>/image_anno.csv"
TINY_LAYOUT = "expected root/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt, val/images/}"


# --------------------------------------------------------------------------- helpers


def _read_index(path: Path, n_fields: int, layout: str, what: str, sep: str | None = None) -> list[list[str]]:
    """Non-empty lines of a whitespace- (or ``sep``-) separated index file, ``n_fields`` each.

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


def _int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what}: {path} holds {value!r} where a number is expected") from None


def _list_files(folder: Path, extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Sorted visible image files directly in ``folder`` ([] when it does not exist)."""
    if not folder.is_dir():
        return []
    exts = tuple(extensions)
    return sorted(
        folder / e.name for e in os.scandir(folder)
        if not e.name.startswith(".") and e.is_file() and os.path.splitext(e.name)[1].lower() in exts
    )


def _visible_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if not e.name.startswith(".") and e.is_dir())


# --------------------------------------------------------------------------- CUB-200-2011


@register_dataset("cub")
class CUBDataset(PaperDataset):
    """CUB-200-2011 from its official index files (see the module docstring)."""

    name = "cub"
    validation_source = (
        "cub: support = train_test_split.txt is_training=1 images of the class; real validation = "
        "the official test split (is_training=0; CUB has no separate validation split): normal = "
        "test images of the class, anomalies = test images of the other 199 classes"
    )

    def __init__(self, root: str | os.PathLike, name: str | None = None):
        super().__init__(root, name, CUB_LAYOUT, "CUB-200-2011")
        what = "CUB-200-2011"
        self._classes = {_int(i, self.root / "classes.txt", what): n for i, n in
                         _read_index(self.root / "classes.txt", 2, CUB_LAYOUT, what)}
        self._images = _read_index(self.root / "images.txt", 2, CUB_LAYOUT, what)
        self._labels = {i: c for i, c in _read_index(self.root / "image_class_labels.txt", 2, CUB_LAYOUT, what)}
        self._split = {i: s for i, s in _read_index(self.root / "train_test_split.txt", 2, CUB_LAYOUT, what)}
        require_path(self.root / "images", CUB_LAYOUT, what)
        self.class_labels = {n: clean_class_name("cub", n) for n in self._classes.values()}

    def _entries(self) -> list[dict[str, Any]]:
        what = "CUB-200-2011"
        entries = []
        for image_id, rel in self._images:
            if image_id not in self._labels:
                raise ValueError(f"{what}: image {image_id} of images.txt has no line in {self.root / 'image_class_labels.txt'}")
            if image_id not in self._split:
                raise ValueError(f"{what}: image {image_id} of images.txt has no line in {self.root / 'train_test_split.txt'}")
            class_id = _int(self._labels[image_id], self.root / "image_class_labels.txt", what)
            if class_id not in self._classes:
                raise ValueError(f"{what}: class {class_id} of image {image_id} is not in {self.root / 'classes.txt'}")
            flag = self._split[image_id]
            if flag not in ("0", "1"):
                raise ValueError(f"{what}: {self.root / 'train_test_split.txt'} gives image {image_id} "
                                 f"is_training={flag!r}, expected 0 or 1")
            entries.append({"rel_path": f"images/{rel}", "class_name": self._classes[class_id],
                            "split": "train" if flag == "1" else "test",
                            "source_index": _int(image_id, self.root / "images.txt", what)})
        return entries


# --------------------------------------------------------------------------- Oxford Flowers-102

FLOWERS_VALIDATION = ("valid", "tstid", "valid+tstid")


def _loadmat(path: Path, key: str, what: str) -> np.ndarray:
    require_path(path, FLOWERS_LAYOUT, what)
    from scipy.io import loadmat

    try:
        data = loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, ...
        raise ValueError(f"{what}: cannot read {path} as a .mat file: {type(exc).__name__}: {str(exc)[:120]}") from None
    if key not in data:
        keys = sorted(k for k in data if not k.startswith("__"))
        raise ValueError(f"{what}: {path} has no variable {key!r} (it has {keys}); {FLOWERS_LAYOUT}")
    try:
        return np.asarray(data[key]).astype(np.int64).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{what}: variable {key!r} of {path} is not a list of integers") from None


@register_dataset("flowers")
class FlowersDataset(PaperDataset):
    """Oxford Flowers-102 from ``jpg/``, ``imagelabels.mat`` and ``setid.mat``.

    ``validation`` picks the images that become the "test" split (the real validation set):
    ``"valid"`` (default; 10 per class, the paper's "validation subsets"), ``"tstid"`` (the
    official test set) or ``"valid+tstid"``. ``trnid`` (10 per class) is always "train".
    """

    name = "flowers"

    def __init__(self, root: str | os.PathLike, name: str | None = None, validation: str = "valid"):
        super().__init__(root, name, FLOWERS_LAYOUT, "Oxford Flowers-102")
        if validation not in FLOWERS_VALIDATION:
            raise ValueError(f"validation must be one of {list(FLOWERS_VALIDATION)}, got {validation!r}")
        what = "Oxford Flowers-102"
        self.validation = validation
        self._labels = _loadmat(self.root / "imagelabels.mat", "labels", what)
        self._sets = {key: _loadmat(self.root / "setid.mat", key, what) for key in ("trnid", "valid", "tstid")}
        require_path(self.root / "jpg", FLOWERS_LAYOUT, what)
        bad = sorted(set(self._labels.tolist()) - set(range(1, len(FLOWERS_102_NAMES) + 1)))
        if bad:
            raise ValueError(f"{what}: {self.root / 'imagelabels.mat'} holds labels {bad[:5]} outside 1..102")
        self.class_labels = {n: n for n in FLOWERS_102_NAMES}
        self.validation_source = (
            f"{self.name}: support = setid.mat trnid images of the class (10); real validation = setid.mat "
            f"{' + '.join(validation.split('+'))} images: normal = those of the class, anomalies = those of the "
            "other 101 classes" + (" (tstid is not catalogued)" if validation == "valid" else "")
        )

    def _entries(self) -> list[dict[str, Any]]:
        what = "Oxford Flowers-102"
        test_sets = self.validation.split("+")
        entries = []
        for key, split in [("trnid", "train")] + [(k, "test") for k in test_sets]:
            for number in self._sets[key]:
                if not 1 <= number <= len(self._labels):
                    raise ValueError(f"{what}: setid.mat {key} lists image {number}, but imagelabels.mat labels "
                                     f"only {len(self._labels)} images")
                entries.append({"rel_path": f"jpg/image_{number:05d}.jpg",
                                "class_name": FLOWERS_102_NAMES[self._labels[number - 1] - 1],
                                "split": split, "source_index": int(number)})
        return entries


# --------------------------------------------------------------------------- MVTec-AD


@register_dataset("mvtec")
class MVTecDataset(PaperDataset):
    """MVTec-AD (or any folder in its layout): one class per category (product)."""

    name = "mvtec"
    protocol = "defect"

    def __init__(self, root: str | os.PathLike, name: str | None = None,
                 extensions: Iterable[str] = DEFAULT_EXTENSIONS):
        super().__init__(root, name, MVTEC_LAYOUT, "MVTec-AD")
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.categories = [c for c in _visible_dirs(self.root)
                           if (self.root / c / "train").is_dir() or (self.root / c / "test").is_dir()]
        if not self.categories:
            raise FileNotFoundError(f"MVTec-AD: no category with train/ or test/ under {self.root}; {MVTEC_LAYOUT}")
        self.class_labels = {c: clean_class_name("mvtec", c) for c in self.categories}
        self.validation_source = (
            f"{self.name}: support = <product>/train/good; real validation = the official test split: normal = "
            "<product>/test/good, anomalies = <product>/test/<defect type> (one-vs-rest: all defect types "
            "together; one-vs-closest: the worst defect type)"
        )

    def _entries(self) -> list[dict[str, Any]]:
        entries = []
        for category in self.categories:
            train = _list_files(self.root / category / "train" / NORMAL_DEFECT, self.extensions)
            if not train:
                self._skip_class(category, f"no training images in {category}/train/{NORMAL_DEFECT}/")
            entries += [{"rel_path": p.relative_to(self.root).as_posix(), "class_name": category, "split": "train",
                         "defect": NORMAL_DEFECT} for p in train]
            test_dir = self.root / category / "test"
            if not test_dir.is_dir():
                logger.warning("%s: no test/ folder in %s", self.name, self.root / category)
                continue
            for defect in _visible_dirs(test_dir):
                entries += [{"rel_path": p.relative_to(self.root).as_posix(), "class_name": category, "split": "test",
                             "defect": defect} for p in _list_files(test_dir / defect, self.extensions)]
        for index, entry in enumerate(sorted(entries, key=lambda e: e["rel_path"])):
            entry["source_index"] = index
        return entries


# --------------------------------------------------------------------------- VisA

VISA_MULTI_DEFECT = ("multiple", "combined", "first")


def _read_csv(path: Path, columns: tuple[str, ...], layout: str, what: str) -> list[dict[str, str]]:
    require_path(path, layout, what)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{what}: {path} lacks columns {missing} (header: {header}); {layout}")
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{what}: cannot read {path}: {type(exc).__name__}: {exc}") from None


def visa_defect(label: str, multi_defect: str = "multiple") -> str:
    """The group of a VisA anomaly from its ``image_anno.csv`` label (see the module docstring)."""
    defects = list(dict.fromkeys(" ".join(d.split()).lower() for d in label.split(",") if d.strip()))
    if not defects:
        return "unknown"
    if len(defects) == 1:
        return defects[0]
    if multi_defect == "combined":
        return "+".join(sorted(defects))
    if multi_defect == "first":
        return defects[0]
    return "multiple"


@register_dataset("visa")
class VisADataset(PaperDataset):
    """VisA from ``split_csv/<split_file>`` and each object's ``image_anno.csv``."""

    name = "visa"
    protocol = "defect"

    def __init__(self, root: str | os.PathLike, name: str | None = None, split_file: str = "split_csv/1cls.csv",
                 multi_defect: str = "multiple"):
        super().__init__(root, name, VISA_LAYOUT, "VisA")
        if multi_defect not in VISA_MULTI_DEFECT:
            raise ValueError(f"multi_defect must be one of {list(VISA_MULTI_DEFECT)}, got {multi_defect!r}")
        self.multi_defect = multi_defect
        self.split_file = split_file
        self._rows = _read_csv(self.root / split_file, ("object", "split", "label", "image", "mask"), VISA_LAYOUT, "VisA")
        objects = sorted({r["object"] for r in self._rows})
        self.class_labels = {o: clean_class_name("visa", o) for o in objects}
        self._anno: dict[str, dict[str, str]] = {}
        for obj in sorted({r["object"] for r in self._rows if r["label"] != "normal"}):
            rows = _read_csv(self.root / obj / "image_anno.csv", ("image", "label"), VISA_LAYOUT, "VisA")
            self._anno[obj] = {os.path.normpath(r["image"]): r["label"] for r in rows}
        self.validation_source = (
            f"{self.name}: support = {split_file} split=train (label normal) images of the object; real validation "
            f"= {split_file} split=test: normal = label normal, anomalies = label anomaly, grouped by defect type "
            f"from <object>/image_anno.csv (an image listing several defects: multi_defect={multi_defect!r})"
        )

    def _entries(self) -> list[dict[str, Any]]:
        entries = []
        split_path = self.root / self.split_file
        for number, row in enumerate(self._rows):
            split, label = row["split"].lower(), row["label"].lower()
            if split not in ("train", "test"):
                raise ValueError(f"VisA: {split_path} row {number + 2} has split {row['split']!r}, expected train or test")
            if label not in ("normal", "anomaly"):
                raise ValueError(f"VisA: {split_path} row {number + 2} has label {row['label']!r}, expected normal or anomaly")
            if label == "normal":
                defect = NORMAL_DEFECT
            else:
                anno = self._anno.get(row["object"], {}).get(os.path.normpath(row["image"]))
                if anno is None:
                    logger.warning("%s: %s is not in %s/image_anno.csv; defect type 'unknown'", self.name, row["image"], row["object"])
                    defect = "unknown"
                else:
                    defect = visa_defect(anno, self.multi_defect)
            entries.append({"rel_path": row["image"], "class_name": row["object"], "split": split,
                            "defect": defect, "source_index": number})
        return entries


# --------------------------------------------------------------------------- Tiny-ImageNet


@register_dataset("tinyimagenet")
class TinyImageNetDataset(PaperDataset):
    """Tiny-ImageNet-200: train/<wnid>/images (train), val/ with val_annotations.txt (test)."""

    name = "tinyimagenet"

    def __init__(self, root: str | os.PathLike, name: str | None = None):
        super().__init__(root, name, TINY_LAYOUT, "Tiny-ImageNet")
        what = "Tiny-ImageNet"
        self.wnids = [r[0] for r in _read_index(self.root / "wnids.txt", 1, TINY_LAYOUT, what)]
        words = {w: names for w, names in _read_index(self.root / "words.txt", 2, TINY_LAYOUT, what, sep="\t")}
        self.class_labels = {w: " ".join(words.get(w, w).split(",")[0].split()).lower() for w in self.wnids}
        require_path(self.root / "train", TINY_LAYOUT, what)
        self._val = _read_index(self.root / "val" / "val_annotations.txt", 2, TINY_LAYOUT, what, sep="\t")
        self.validation_source = (
            f"{self.name}: support = train/<wnid>/images; real validation = val/ (labels from val/val_annotations.txt)"
        )

    def train_files(self) -> list[str]:
        """Relative paths of every training image (the auxiliary-outlier pool), sorted."""
        return [p.relative_to(self.root).as_posix() for w in self.wnids
                for p in _list_files(self.root / "train" / w / "images")]

    def _entries(self) -> list[dict[str, Any]]:
        known = set(self.wnids)
        entries = []
        for wnid in self.wnids:
            files = _list_files(self.root / "train" / wnid / "images")
            if not files:
                self._skip_class(wnid, f"no training images in train/{wnid}/images/")
            entries += [{"rel_path": p.relative_to(self.root).as_posix(), "class_name": wnid, "split": "train"} for p in files]
        for filename, wnid in ((r[0], r[1]) for r in self._val):
            if wnid not in known:
                raise ValueError(f"Tiny-ImageNet: {self.root / 'val' / 'val_annotations.txt'} labels {filename} with "
                                 f"{wnid!r}, which is not in wnids.txt")
            entries.append({"rel_path": f"val/images/{filename}", "class_name": wnid, "split": "test"})
        for index, entry in enumerate(entries):
            entry["source_index"] = index
        return entries
