"""``visa``: VisA from ``split_csv/1cls.csv`` and each object's ``image_anno.csv`` (nothing is downloaded).

Layout: ``split_csv/1cls.csv`` (``object,split,label,image,mask``; split train/test, label
normal/anomaly) over ``<object>/Data/Images/...``; the defect type of an anomalous image from
``<object>/image_anno.csv`` (``image,label,mask``). A label listing several defects ("a,b") is
one image in one group: ``multi_defect="multiple"`` (default) puts every multi-defect image of a
product into the single group ``"multiple"``; ``"combined"`` uses the sorted defects joined by
``"+"``; ``"first"`` the first listed defect. Protocol ``"defect"``. Shared rules (skipped rows,
bad layouts): :mod:`swsa_store.datasets.base`.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from swsa_store.datasets.base import NORMAL_DEFECT, PaperDataset, require_path
from swsa_store.datasets.class_names import clean_class_name
from swsa_store.datasets.registry import register_dataset

__all__ = ["VISA_LAYOUT", "VISA_MULTI_DEFECT", "VisADataset", "visa_defect"]

logger = logging.getLogger(__name__)

VISA_LAYOUT = "expected root/split_csv/1cls.csv (object,split,label,image,mask) and root/<object>/image_anno.csv"
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
