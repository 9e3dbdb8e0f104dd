"""Real images for tests: scikit-learn's two sample photos (RGB JPEG) and ELPV solar cells (greyscale PNG)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from sklearn.datasets import load_sample_images

from swsa_store.catalog import catalog_dataset

SAMPLE_IMAGES = Path(load_sample_images().filenames[0]).parent
ELPV_IMAGES = Path(importlib.util.find_spec("elpv_dataset").submodule_search_locations[0]) / "data" / "images"


def photo_store(root: Path, n_cells: int) -> Path:
    """A catalogued store under ``root`` of the two photos and the first ``n_cells`` ELPV cells, in two
    class folders ("a": china.jpg and the first half of the cells, "b": flower.jpg and the rest)."""
    cells = sorted(ELPV_IMAGES.glob("*.png"))[:n_cells]
    half = (n_cells + 1) // 2
    classes = {"a": [SAMPLE_IMAGES / "china.jpg", *cells[:half]], "b": [SAMPLE_IMAGES / "flower.jpg", *cells[half:]]}
    for folder, files in classes.items():
        (root / "img" / folder).mkdir(parents=True)
        for file in files:
            shutil.copy(file, root / "img" / folder / file.name)
    store = root / "s.h5"
    catalog_dataset(store, "folder", root=root / "img", n_seed=1)
    return store
