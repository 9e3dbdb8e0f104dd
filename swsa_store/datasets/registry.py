"""The dataset registry: :data:`DATASETS`, ``register_dataset`` / ``create_dataset`` /
``list_datasets`` and the :class:`Dataset` protocol every registered dataset follows.

Dataset modules (:mod:`.digits`, :mod:`.folder`, :mod:`.cub`, ...) import this module (never the
package ``swsa_store.datasets``) to register themselves; the package imports them all.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import pandas as pd

from swsa_store.registry import Registry

__all__ = ["DATASETS", "DEFAULT_EXTENSIONS", "SPLITS", "Dataset", "create_dataset", "list_datasets", "register_dataset"]

#: The splits of a samples table.
SPLITS = ("train", "test")
#: Image file endings read by the folder datasets (case-insensitive).
DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")  # GIF: first frame

#: name → dataset class or factory (building an object with ``name`` and ``samples()``).
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
        """The samples table (columns: :data:`~swsa_store.samples.SAMPLE_COLUMNS`)."""
        ...
