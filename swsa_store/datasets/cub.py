"""``cub``: CUB-200-2011 from its official index files (nothing is downloaded).

Layout (``root`` is the folder holding the files listed): ``images.txt`` (``<id> <path under
images/>``), ``image_class_labels.txt`` (``<id> <class id>``), ``train_test_split.txt``
(``<id> <1 = train, 0 = test>``), ``classes.txt`` (``<class id> <name>``),
``images/<NNN.Name>/<file>.jpg``. class_name = the ``classes.txt`` name. Shared rules (skipped
rows, bad layouts): :mod:`swsa_store.datasets.base`.
"""

from __future__ import annotations

import os
from typing import Any

from swsa_store.datasets.base import PaperDataset, parse_int, read_index, require_path
from swsa_store.datasets.class_names import clean_class_name
from swsa_store.datasets.registry import register_dataset

__all__ = ["CUB_LAYOUT", "CUBDataset"]

CUB_LAYOUT = "expected CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}"


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
        self._classes = {parse_int(i, self.root / "classes.txt", what): n for i, n in
                         read_index(self.root / "classes.txt", 2, CUB_LAYOUT, what)}
        self._images = read_index(self.root / "images.txt", 2, CUB_LAYOUT, what)
        self._labels = {i: c for i, c in read_index(self.root / "image_class_labels.txt", 2, CUB_LAYOUT, what)}
        self._split = {i: s for i, s in read_index(self.root / "train_test_split.txt", 2, CUB_LAYOUT, what)}
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
            class_id = parse_int(self._labels[image_id], self.root / "image_class_labels.txt", what)
            if class_id not in self._classes:
                raise ValueError(f"{what}: class {class_id} of image {image_id} is not in {self.root / 'classes.txt'}")
            flag = self._split[image_id]
            if flag not in ("0", "1"):
                raise ValueError(f"{what}: {self.root / 'train_test_split.txt'} gives image {image_id} "
                                 f"is_training={flag!r}, expected 0 or 1")
            entries.append({"rel_path": f"images/{rel}", "class_name": self._classes[class_id],
                            "split": "train" if flag == "1" else "test",
                            "source_index": parse_int(image_id, self.root / "images.txt", what)})
        return entries
