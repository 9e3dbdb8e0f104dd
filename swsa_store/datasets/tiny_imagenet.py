"""``tinyimagenet``: Tiny-ImageNet-200 (the paper's auxiliary-outlier source); nothing is downloaded.

Layout: ``wnids.txt``, ``words.txt``, ``train/<wnid>/images/*.JPEG`` (train),
``val/val_annotations.txt`` over ``val/images/*.JPEG`` (test). ``test/`` (unlabelled) is not
catalogued. Shared rules (skipped rows, bad layouts): :mod:`swsa_store.datasets.base`.
"""

from __future__ import annotations

import os
from typing import Any

from swsa_store.datasets.base import PaperDataset, list_image_files, read_index, require_path
from swsa_store.datasets.registry import register_dataset

__all__ = ["TINY_LAYOUT", "TinyImageNetDataset"]

TINY_LAYOUT = "expected root/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt, val/images/}"


@register_dataset("tinyimagenet")
class TinyImageNetDataset(PaperDataset):
    """Tiny-ImageNet-200: train/<wnid>/images (train), val/ with val_annotations.txt (test)."""

    name = "tinyimagenet"

    def __init__(self, root: str | os.PathLike, name: str | None = None):
        super().__init__(root, name, TINY_LAYOUT, "Tiny-ImageNet")
        what = "Tiny-ImageNet"
        self.wnids = [r[0] for r in read_index(self.root / "wnids.txt", 1, TINY_LAYOUT, what)]
        words = {w: names for w, names in read_index(self.root / "words.txt", 2, TINY_LAYOUT, what, sep="\t")}
        self.class_labels = {w: " ".join(words.get(w, w).split(",")[0].split()).lower() for w in self.wnids}
        require_path(self.root / "train", TINY_LAYOUT, what)
        self._val = read_index(self.root / "val" / "val_annotations.txt", 2, TINY_LAYOUT, what, sep="\t")
        self.validation_source = (
            f"{self.name}: support = train/<wnid>/images; real validation = val/ (labels from val/val_annotations.txt)"
        )

    def train_files(self) -> list[str]:
        """Relative paths of every training image (the auxiliary-outlier pool), sorted."""
        return [p.relative_to(self.root).as_posix() for w in self.wnids
                for p in list_image_files(self.root / "train" / w / "images")]

    def _entries(self) -> list[dict[str, Any]]:
        known = set(self.wnids)
        entries = []
        for wnid in self.wnids:
            files = list_image_files(self.root / "train" / wnid / "images")
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
