"""``mvtec``: MVTec-AD (or any folder in its layout), one class per category (product); nothing is downloaded.

Layout: ``<category>/train/good/*.png`` (train), ``<category>/test/<defect type or good>/*.png``
(test), ``<category>/ground_truth/<defect>/*_mask.png`` (masks; not catalogued). Protocol
``"defect"``. Shared rules (skipped rows, bad layouts): :mod:`swsa_store.datasets.base`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

from swsa_store.datasets.base import NORMAL_DEFECT, PaperDataset, list_image_files, visible_dirs
from swsa_store.datasets.class_names import clean_class_name
from swsa_store.datasets.registry import DEFAULT_EXTENSIONS, register_dataset

__all__ = ["MVTEC_LAYOUT", "MVTecDataset"]

logger = logging.getLogger(__name__)

MVTEC_LAYOUT = "expected root/<category>/train/good/*.png and root/<category>/test/<defect type or good>/*.png"


@register_dataset("mvtec")
class MVTecDataset(PaperDataset):
    """MVTec-AD (or any folder in its layout): one class per category (product)."""

    name = "mvtec"
    protocol = "defect"

    def __init__(self, root: str | os.PathLike, name: str | None = None,
                 extensions: Iterable[str] = DEFAULT_EXTENSIONS):
        super().__init__(root, name, MVTEC_LAYOUT, "MVTec-AD")
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.categories = [c for c in visible_dirs(self.root)
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
            train = list_image_files(self.root / category / "train" / NORMAL_DEFECT, self.extensions)
            if not train:
                self._skip_class(category, f"no training images in {category}/train/{NORMAL_DEFECT}/")
            entries += [{"rel_path": p.relative_to(self.root).as_posix(), "class_name": category, "split": "train",
                         "defect": NORMAL_DEFECT} for p in train]
            test_dir = self.root / category / "test"
            if not test_dir.is_dir():
                logger.warning("%s: no test/ folder in %s", self.name, self.root / category)
                continue
            for defect in visible_dirs(test_dir):
                entries += [{"rel_path": p.relative_to(self.root).as_posix(), "class_name": category, "split": "test",
                             "defect": defect} for p in list_image_files(test_dir / defect, self.extensions)]
        for index, entry in enumerate(sorted(entries, key=lambda e: e["rel_path"])):
            entry["source_index"] = index
        return entries
