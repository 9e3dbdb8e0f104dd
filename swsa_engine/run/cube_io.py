"""Cube I/O: an :class:`~swsa_engine.core.cube.AurocCube` written to and read from a store's results.

A cube is saved as the result ``name`` of the store (``<store>.results/<name>.h5``, written
atomically by :func:`swsa_store.schema.save_result`): its arrays as datasets, its tables and
config as JSON attributes (:meth:`AurocCube.to_arrays`). Reading needs no scoring pass, so
reports and applications load cubes from here.
"""

from __future__ import annotations

import json
import os

from swsa_store import open_store
from swsa_store.schema import save_result

from swsa_engine.core.cube import CUBE_RESULT, AurocCube

__all__ = ["save_cube", "load_cube", "stored_results"]

_STRING_ARRAYS = ("dataset", "normal_class", "class_names")
_NUMBER_ARRAYS = ("task_id", "real", "synthetic", "per_class")


def save_cube(cube: AurocCube, store_path: str | os.PathLike, name: str = CUBE_RESULT) -> None:
    """Write ``cube`` as the result ``name`` of the store at ``store_path`` (replacing an older one)."""
    arrays, attrs = cube.to_arrays()
    save_result(store_path, name, arrays, attrs)


def load_cube(store_path: str | os.PathLike, name: str = CUBE_RESULT) -> AurocCube:
    """The cube saved as the result ``name`` of the store at ``store_path`` (one-line StoreError if absent)."""
    with open_store(store_path) as store:
        group = store.result_group(name)
        attrs = {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v for k, v in group.attrs.items()}
        arrays = {key: group[key][...] for key in _NUMBER_ARRAYS}
        if "self_validated" in group:  # cubes from before self-validation was marked have none: all False
            arrays["self_validated"] = group["self_validated"][...]
        arrays.update({key: group[key].asstr()[...].astype(object) for key in _STRING_ARRAYS})
    return AurocCube.from_arrays(arrays, attrs)


def stored_results(store_path: str | os.PathLike) -> list[str]:
    """The names of the results (cubes and others) the store at ``store_path`` holds, sorted."""
    with open_store(store_path) as store:
        return store.results()
