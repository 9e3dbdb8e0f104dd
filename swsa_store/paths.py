"""Where the catalogue's image files are: paths stored relative, resolved on reading.

The catalogue's ``path`` column holds, per row:

* a real image of a dataset whose root is recorded: its path *relative to that root*. The roots
  are recorded once per dataset in the ``dataset_roots`` attribute of ``/images`` (JSON
  ``{dataset: root}``); a root inside the store's folder is itself recorded relative to that
  folder, so a store moved or copied together with its images keeps finding them, and
  ``swsa relocate --store S --dataset NAME --root NEW`` re-points one dataset;
* a synthetic image (made by ``swsa synth``, under ``<store>.files/``): its path relative to the
  store's folder;
* anything else (stores written before relative paths, files outside every root): absolute.

So that a store *file* copied elsewhere without its images keeps working too, the absolute roots
(``dataset_roots_absolute``) and the store's folder (``written_from``) at the last write are
recorded as well: a relative root or a store-relative path is resolved against the store's
current folder when that holds it, else against the recorded absolute place.

:meth:`swsa_store.store.Store.images` returns absolute paths (every form above is read); the
functions here convert between the two forms. No I/O but string work on paths.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
import pandas as pd

__all__ = ["ROOTS_ATTR", "NEXT_ID_ATTR", "ABS_ROOTS_ATTR", "WRITTEN_FROM_ATTR", "store_folder", "root_dir", "resolve_paths", "stored_paths",
           "dataset_root", "stored_root", "read_roots"]

#: Attribute of ``/images``: JSON ``{dataset: root}`` (absolute, or relative to the store's folder).
ROOTS_ATTR = "dataset_roots"
#: Attributes of ``/images``: the roots as absolute folders, and the store's folder, at the last write.
ABS_ROOTS_ATTR = "dataset_roots_absolute"
WRITTEN_FROM_ATTR = "written_from"
#: Attribute of ``/images``: the next image id to hand out (ids are never reused).
NEXT_ID_ATTR = "next_image_id"


def store_folder(store_path: str | os.PathLike) -> str:
    """The absolute folder that holds the store file."""
    return os.path.dirname(os.path.abspath(os.fspath(store_path)))


def read_roots(attrs: Mapping, attr: str = ROOTS_ATTR) -> dict[str, str]:
    """The ``dataset_roots`` (or another JSON dict ``attr``) of an images table's attributes ({} when none)."""
    raw = attrs.get(attr)
    if raw is None:
        return {}
    value = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    return {str(k): str(v) for k, v in value.items()}


def root_dir(root: str, folder: str) -> str:
    """A recorded root as an absolute folder (relative roots are relative to the store's ``folder``)."""
    return os.path.normpath(root if os.path.isabs(root) else os.path.join(folder, root))


def _is_relative(paths: pd.Series) -> np.ndarray:
    return ((paths != "") & ~paths.str.startswith(os.sep)).to_numpy(dtype=bool)


def resolve_paths(paths, datasets, kinds, roots: Mapping[str, str], folder: str,
                  fallback_roots: Mapping[str, str] | None = None, fallback_folder: str | None = None) -> np.ndarray:
    """``(N,)`` object array of absolute paths for stored ``paths`` (see the module docstring);
    ``""`` stays ``""`` (a skipped synthetic image has no file). ``fallback_roots`` /
    ``fallback_folder``: where roots and store-relative paths were when last written, used when
    the store's current ``folder`` does not hold them (the store file was copied alone)."""
    series = pd.Series(np.asarray(paths, dtype=object)).astype(str)
    out = series.to_numpy(dtype=object).copy()
    relative = _is_relative(series)
    if not relative.any():
        return out
    datasets = np.asarray(datasets, dtype=object)
    real = np.asarray(kinds, dtype=object) == "real"
    prefix = np.full(len(out), folder.rstrip(os.sep) + os.sep, dtype=object)
    in_root = np.zeros(len(out), dtype=bool)
    for dataset, root in roots.items():
        base = root_dir(root, folder)
        other = (fallback_roots or {}).get(dataset)
        if not os.path.isdir(base) and other and os.path.isdir(other):
            base = other
        rows = real & (datasets == dataset)
        prefix[rows], in_root = base.rstrip(os.sep) + os.sep, in_root | rows
    if fallback_folder and fallback_folder != folder:
        _store_relative_fallback(out, relative & ~in_root, prefix, folder, fallback_folder)
    out[relative] = prefix[relative] + out[relative]
    return out


def _store_relative_fallback(paths: np.ndarray, rows: np.ndarray, prefix: np.ndarray, folder: str,
                             fallback_folder: str) -> None:
    """Point ``prefix[rows]`` at ``fallback_folder`` for the paths whose first folder is missing
    from ``folder`` but present in ``fallback_folder``."""
    if not rows.any():
        return
    first = pd.Series(paths[rows]).str.split("/", n=1).str[0].to_numpy(dtype=object)
    for name in set(first):
        if not os.path.exists(os.path.join(folder, name)) and os.path.exists(os.path.join(fallback_folder, name)):
            where = np.flatnonzero(rows)[first == name]
            prefix[where] = fallback_folder.rstrip(os.sep) + os.sep


def stored_paths(paths, datasets, kinds, roots: Mapping[str, str], folder: str) -> np.ndarray:
    """Inverse of :func:`resolve_paths`: absolute ``paths`` in their stored, relative form where
    one applies (real images below their dataset's root; synthetic ones below the store's folder)."""
    series = pd.Series(np.asarray(paths, dtype=object)).astype(str)
    out = series.to_numpy(dtype=object).copy()
    datasets = np.asarray(datasets, dtype=object)
    real = np.asarray(kinds, dtype=object) == "real"
    absolute = (series != "").to_numpy(dtype=bool) & ~_is_relative(series)
    targets = [(~real, folder)] + [(real & (datasets == d), root_dir(r, folder)) for d, r in roots.items()]
    for rows, target in targets:
        rows = rows & absolute
        for base in dict.fromkeys((target, os.path.realpath(target))):
            prefix = base.rstrip(os.sep) + os.sep
            below = rows & series.str.startswith(prefix).to_numpy(dtype=bool)
            out[below] = series[below].str.slice(len(prefix)).to_numpy(dtype=object)
            rows = rows & ~below
    return out


def _under(path: str, folder: str) -> str | None:
    """``path`` relative to ``folder`` when it lies below it, else None."""
    folder = folder.rstrip(os.sep) + os.sep
    return path[len(folder):] if path.startswith(folder) else None


def dataset_root(paths) -> str | None:
    """The deepest folder holding every one of the absolute ``paths`` (None when there are none)."""
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in paths if p})
    if not folders:
        return None
    return os.path.commonpath(folders)


def stored_root(root: str, folder: str) -> str:
    """How a dataset root is recorded: relative to the store's ``folder`` when inside it, else absolute."""
    root = os.path.normpath(os.path.abspath(root))
    if root == folder:
        return "."
    rel = _under(root, folder)
    return root if rel is None else rel.replace(os.sep, "/")
