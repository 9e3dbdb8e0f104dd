"""The store's file format: schema version, done flags, column tables, the catalog's columns and
the low-level HDF5 steps that :mod:`swsa_store.store` builds on.

Layout (schema version :data:`SCHEMA_VERSION`)::

    /                      attrs: schema_version, swsa_version, created_utc
    /images/<column>       the catalog, one 1-D dataset per column (:data:`IMAGE_COLUMNS`)
    /tasks/<column>        one row per task (see tasks.TASK_COLUMNS)
    /task_members/<column> (task_id, image_id, role) rows: which image plays which part in a task
    /skips/<column>        recorded skips: (stage, image_id, task_id, backbone, reason)
    /embeddings/<name>/features   (N, D) rows indexed by image id, NaN until written
    /embeddings/<name>/done       (N,) uint8: 0 to do, 1 durably written, 2 failed (see skips)
    /embeddings/<name>/checksum   (N,) uint32 CRC32 of each written row's bytes (row_writer.row_checksums)
                                  attrs: model, weights source and hash, preprocessing, versions
    /patches/<name>/tokens        (N, P, D') float16 patch tokens of embedding <name> (``swsa embed
                                  --patch-tokens``): ViT patch tokens or a CNN stage's feature map,
                                  chunked one image per chunk, NaN until written
    /patches/<name>/done          (N,) uint8, as for embeddings; attrs: token source, layer, grid,
                                  n_patches, patch_dim, dtype, bytes_per_image, the embedding's config
    /scores/<name>/...     imported anomaly scores (task_id, image_id, score) of one candidate
    /results/<name>/...    arrays written by the engine (the AUROC cube), with attrs
    /text/<model>/<set>/   text embeddings of one CLIP model's prompt set: strings (U,), embeddings
                           (U, D) L2-normalised, table/<column> rows mapping (task_id, template,
                           side) to a string; attrs: model, logit scale, normalisation

Results live beside the store, one file each (:func:`save_result`). This module opens no store
(see :mod:`swsa_store.store`) and imports no other swsa module.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import pandas as pd

__all__ = [
    "DONE_FAILED", "DONE_TODO", "DONE_WRITTEN", "IMAGE_COLUMNS", "INT_IMAGE_COLUMNS", "SCHEMA_VERSION",
    "SKIP_COLUMNS", "StoreError", "TextEmbeddings", "allocate_filled", "check_schema", "empty_images_table",
    "empty_skips", "fsync_dir", "fsync_path", "grow_rows", "open_h5", "read_contiguous", "read_table",
    "save_result", "swsa_version", "utc_now", "write_table",
]

#: The store layout this version writes (and the newest it reads).
SCHEMA_VERSION = 1

#: Done flags of ``/embeddings/<name>/done`` and ``/patches/<name>/done``: to do, durably written, failed.
DONE_TODO = 0
DONE_WRITTEN = 1
DONE_FAILED = 2

#: Columns of the ``/skips`` table.
SKIP_COLUMNS = ("stage", "image_id", "task_id", "backbone", "reason")


class StoreError(RuntimeError):
    """A store that cannot be used as asked (missing, newer schema, locked, inconsistent)."""


def swsa_version() -> str:
    """The installed swsa version, ``"0+unknown"`` when running from a source tree that is not installed."""
    try:
        return importlib.metadata.version("swsa")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second (a store's ``created_utc``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the catalog's columns

#: Columns of ``/images`` (see :mod:`swsa_store.catalog` for their meaning), in order.
IMAGE_COLUMNS = (
    "image_id", "dataset", "class_name", "split", "kind", "path", "sha256", "status",
    "skip_reason", "width", "height", "task_id", "parent_ids", "params", "seed", "source_index", "defect",
)
#: The integer columns of :data:`IMAGE_COLUMNS` (the others are strings).
INT_IMAGE_COLUMNS = ("image_id", "width", "height", "task_id", "seed", "source_index")


def empty_images_table() -> pd.DataFrame:
    """A catalog with no rows: :data:`IMAGE_COLUMNS` with their dtypes."""
    return pd.DataFrame(
        {c: pd.Series([], dtype=np.int64 if c in INT_IMAGE_COLUMNS else object) for c in IMAGE_COLUMNS}
    )


# --------------------------------------------------------------------------- column tables


def write_table(parent: h5py.Group, name: str, table: pd.DataFrame, attrs: dict | None = None) -> None:
    """Write ``table`` as group ``name`` with one 1-D dataset per column (replacing any old one).

    Object / string columns become UTF-8 variable-length strings; bool, int and float columns
    keep their numpy dtype. Column order is kept in the ``columns`` attribute.
    """
    if name in parent:
        del parent[name]
    group = parent.create_group(name)
    for column in table.columns:
        values = table[column].to_numpy()
        if values.dtype.kind in "OUS" or pd.api.types.is_string_dtype(table[column]):
            data = np.array(["" if v is None else str(v) for v in values], dtype=object)
            categories, codes = np.unique(data.astype(str), return_inverse=True) if len(data) else (np.empty(0, str), np.empty(0, int))
            if len(data) >= 1000 and len(categories) * 8 <= len(data):
                # few distinct strings (roles, kinds, classes, groups): store codes + categories,
                # which reads an order of magnitude faster than one string per row
                dset = group.create_dataset(column, data=codes.astype(np.int32))
                dset.attrs["encoding"] = "categorical"
                group.create_dataset(f"__categories__{column}", data=categories.astype(object), dtype=h5py.string_dtype("utf-8"))
            else:
                group.create_dataset(column, data=data, dtype=h5py.string_dtype("utf-8"))
        else:
            group.create_dataset(column, data=values)
    group.attrs["columns"] = json.dumps(list(map(str, table.columns)))
    group.attrs["n_rows"] = len(table)
    for key, value in (attrs or {}).items():
        group.attrs[key] = value


def read_table(group: h5py.Group, columns: list[str] | None = None) -> pd.DataFrame:
    """Inverse of :func:`write_table`; ``columns`` reads only those (decoding strings is the slow
    part of reading a large catalog)."""
    stored = json.loads(group.attrs["columns"])
    columns = stored if columns is None else [c for c in columns if c in stored]
    data: dict[str, Any] = {}
    for column in columns:
        dset = group[column]
        if dset.attrs.get("encoding") == "categorical":
            categories = group[f"__categories__{column}"].asstr()[...].astype(object)
            data[column] = categories[dset[...]] if len(categories) else np.empty(0, dtype=object)
        elif h5py.check_string_dtype(dset.dtype) is not None:
            data[column] = dset.asstr()[...].astype(object)
        else:
            data[column] = dset[...]
    return pd.DataFrame(data, columns=columns)


def empty_skips() -> pd.DataFrame:
    """A skips table with no rows: :data:`SKIP_COLUMNS` with their dtypes."""
    return pd.DataFrame(
        {
            "stage": pd.Series([], dtype=object),
            "image_id": pd.Series([], dtype=np.int64),
            "task_id": pd.Series([], dtype=np.int64),
            "backbone": pd.Series([], dtype=object),
            "reason": pd.Series([], dtype=object),
        }
    )


# --------------------------------------------------------------------------- reading


class TextEmbeddings(NamedTuple):
    """One prompt set read from ``/text/<model>/<set>``."""

    strings: np.ndarray  # (U,) object
    embeddings: np.ndarray  # (U, D) float32, L2-normalised
    table: pd.DataFrame  # rows referencing ``strings`` (e.g. task_id, template, side, row)
    attrs: dict


def read_contiguous(file: h5py.File, dataset: h5py.Dataset, out: np.ndarray | None = None) -> np.ndarray | None:
    """The whole of an unfiltered, contiguous little-endian float32 dataset, read straight from
    the file with ``readinto`` (several times faster than h5py's read of GB-sized matrices);
    None where the layout does not allow it (chunked, compressed, in memory, not yet written)."""
    if dataset.chunks is not None or dataset.compression is not None or dataset.dtype != np.dtype("<f4"):
        return None
    offset = dataset.id.get_offset()
    if offset is None or file.driver not in ("sec2", "stdio") or dataset.size == 0:
        return None
    if file.mode != "r":
        file.flush()  # what h5py wrote must be on disk before the file is read around it
    out = np.empty(dataset.shape, dtype=np.float32) if out is None else out
    view = memoryview(out).cast("B")
    with open(file.filename, "rb", buffering=0) as handle:
        handle.seek(offset)
        done = 0
        while done < view.nbytes:
            got = handle.readinto(view[done:])
            if not got:
                return None  # shorter than HDF5 says: let h5py read (and report) it
            done += got
    return out


# --------------------------------------------------------------------------- results beside the store


def save_result(store_path: str | os.PathLike, name: str, arrays: dict[str, np.ndarray], attrs: dict) -> Path:
    """Write result ``name`` of the store at ``store_path`` to ``<store>.results/<name>.h5``.

    Written to a temporary file, fsynced, then renamed over the old one: a reader sees the old
    result or the new one, never a partial one, and the store itself is not touched.
    """
    if not name or "/" in name or name.startswith("."):
        raise StoreError(f"result name {name!r} must be a plain file name (no '/', not starting with '.')")
    folder = Path(store_path).with_name(Path(store_path).name + ".results")
    folder.mkdir(exist_ok=True)
    final = folder / f"{name}.h5"
    tmp = folder / f".{name}.h5.{os.getpid()}.tmp"
    try:
        with h5py.File(tmp, "w") as handle:
            group = handle.create_group("result")
            for key, value in arrays.items():
                value = np.asarray(value)
                if value.dtype.kind in "OU":
                    group.create_dataset(key, data=value.astype(object), dtype=h5py.string_dtype("utf-8"))
                else:
                    group.create_dataset(key, data=value)
            for key, value in attrs.items():
                group.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_dir(folder)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


# --------------------------------------------------------------------------- low-level HDF5 steps


def allocate_filled(group: h5py.Group, name: str, shape: tuple, dtype: np.dtype, fill: float,
                    chunks: tuple | None = None) -> h5py.Dataset:
    """A dataset whose storage is allocated and filled now, so row writes later touch raw bytes
    only (no HDF5 metadata) — the basis of crash-safe ingest. Contiguous, or ``chunks`` (no
    filters: every chunk is allocated at creation, its address fixed)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunks is not None:
        dcpl.set_chunk(tuple(int(c) for c in chunks))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    dcpl.set_fill_value(np.array(fill, dtype=dtype))
    return group.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)


def grow_rows(group: h5py.Group, name: str, n_rows: int, chunks: tuple | None = None) -> None:
    """Replace ``group[name]`` (N, ...), ``group["done"]`` (N,) (and ``group["checksum"]``) by copies with ``n_rows`` rows:
    the first N rows as they were, the new ones NaN with done = 0 (to embed).

    Written under ``<name>_new`` / ``done_new`` first and copied in blocks of about 64 MiB (a
    patch-token set does not fit in memory), then moved over the old names.
    """
    old, old_done = group[name], group["done"]
    shape = (n_rows,) + old.shape[1:]
    allocate_filled(group, f"{name}_new", shape, old.dtype, np.nan, chunks=chunks)
    allocate_filled(group, "done_new", (n_rows,), np.dtype(np.uint8), 0)
    block = max(1, (64 << 20) // max(1, int(np.prod(shape[1:])) * old.dtype.itemsize))
    for lo in range(0, old.shape[0], block):
        hi = min(lo + block, old.shape[0])
        group[f"{name}_new"][lo:hi] = old[lo:hi]
    group["done_new"][: old_done.shape[0]] = old_done[...]
    del group[name], group["done"]
    group.move(f"{name}_new", name)
    group.move("done_new", "done")
    if "checksum" in group:  # per-row CRC32 (swsa_store.row_writer): new rows 0 until written
        old_sums = group["checksum"][...]
        allocate_filled(group, "checksum_new", (n_rows,), np.dtype(np.uint32), 0)
        group["checksum_new"][: len(old_sums)] = old_sums
        del group["checksum"]
        group.move("checksum_new", "checksum")


def check_schema(file: h5py.File, path: Path) -> None:
    """:class:`StoreError` unless ``file`` is an swsa store of a schema this version reads."""
    version = file.attrs.get("schema_version")
    if version is None:
        raise StoreError(f"{path} is an HDF5 file but not an swsa store (no schema_version attribute)")
    if int(version) > SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {int(version)}, newer than this swsa understands "
            f"({SCHEMA_VERSION}); upgrade swsa (pip install -U swsa)"
        )


def open_h5(path: Path, mode: str) -> h5py.File:
    """``h5py.File(path, mode)`` (HDF5 file locking only for writers); a one-line :class:`StoreError` on failure."""
    try:
        return h5py.File(path, mode, locking=False if mode == "r" else True)
    except OSError as error:
        raise StoreError(f"cannot open store {path}: {str(error).splitlines()[0]}") from None


def fsync_path(path: Path) -> None:
    """Make the bytes of file ``path`` durable (``fsync``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entry of ``path`` in its folder durable (``fsync`` of the folder, after a rename)."""
    fsync_path(path.parent if path.parent != Path("") else Path("."))
