"""``flowers``: Oxford Flowers-102 from ``jpg/``, ``imagelabels.mat`` and ``setid.mat`` (nothing is downloaded).

Layout: ``jpg/image_NNNNN.jpg``, ``imagelabels.mat`` (``labels``, 1..102 per image), ``setid.mat``
(``trnid``, ``valid``, ``tstid``: 1-based image numbers). class_name = the flower's name
(:data:`~swsa_store.datasets.class_names.FLOWERS_102_NAMES`). train = ``trnid`` (10 per class);
test (real validation) = ``valid`` (10 per class) by default — the paper's "validation
subsets"; ``validation="tstid"`` or ``"valid+tstid"`` chooses otherwise. Images of the unused
set are not catalogued. Shared rules (skipped rows, bad layouts): :mod:`swsa_store.datasets.base`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.io import loadmat

from swsa_store.datasets.base import PaperDataset, require_path
from swsa_store.datasets.class_names import FLOWERS_102_NAMES
from swsa_store.datasets.registry import register_dataset

__all__ = ["FLOWERS_LAYOUT", "FLOWERS_VALIDATION", "FlowersDataset"]

FLOWERS_LAYOUT = "expected root/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}"
FLOWERS_VALIDATION = ("valid", "tstid", "valid+tstid")


def _loadmat(path: Path, key: str, what: str) -> np.ndarray:
    require_path(path, FLOWERS_LAYOUT, what)
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
