"""The HDF5 store: one file holds the catalog, the tasks, every backbone's embeddings and the
scoring results.

Layout (schema version :data:`SCHEMA_VERSION`)::

    /                      attrs: schema_version, swsa_version, created_utc
    /images/<column>       the catalog, one 1-D dataset per column (see catalog.IMAGE_COLUMNS)
    /tasks/<column>        one row per task (see tasks.TASK_COLUMNS)
    /task_members/<column> (task_id, image_id, role) rows: which image plays which part in a task
    /skips/<column>        recorded skips: (stage, image_id, task_id, backbone, reason)
    /embeddings/<name>/features   (N, D) rows indexed by image id, NaN until written
    /embeddings/<name>/done       (N,) uint8: 0 to do, 1 durably written, 2 failed (see skips)
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

Crash safety. Two kinds of writes exist and each is safe against SIGKILL at any moment:

* *Row writes* (ingest) only touch raw bytes of datasets whose storage was allocated when they
  were created (contiguous layout, early allocation), so HDF5 metadata never changes while
  rows are written. A batch's feature rows are written and ``fsync``-ed before its ``done``
  flags are set and ``fsync``-ed: a row is never marked done before it is durable.
* *Structural edits* (new catalog rows, new tasks, a new embedding matrix, results) run in
  :func:`edit_store`, which works on a copy of the file and atomically renames it over the
  original on success. A killed edit leaves the original untouched.

One process writes at a time: writers hold an exclusive ``flock`` on ``<store>.lock``.
Readers open without HDF5 file locking so that ``swsa info`` works during an ingest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import h5py
import numpy as np
import pandas as pd

SCHEMA_VERSION = 1

DONE_TODO = 0
DONE_WRITTEN = 1
DONE_FAILED = 2

SKIP_COLUMNS = ("stage", "image_id", "task_id", "backbone", "reason")


class StoreError(RuntimeError):
    """A store that cannot be used as asked (missing, newer schema, locked, inconsistent)."""


def _swsa_version() -> str:
    try:
        from importlib.metadata import version

        return version("swsa")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


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


def _empty_skips() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "stage": pd.Series([], dtype=object),
            "image_id": pd.Series([], dtype=np.int64),
            "task_id": pd.Series([], dtype=np.int64),
            "backbone": pd.Series([], dtype=object),
            "reason": pd.Series([], dtype=object),
        }
    )


# --------------------------------------------------------------------------- the store


class TextEmbeddings(NamedTuple):
    """One prompt set read from ``/text/<model>/<set>``."""

    strings: np.ndarray  # (U,) object
    embeddings: np.ndarray  # (U, D) float32, L2-normalised
    table: pd.DataFrame  # rows referencing ``strings`` (e.g. task_id, template, side, row)
    attrs: dict


def _read_contiguous(file: h5py.File, dataset: h5py.Dataset, out: np.ndarray | None = None) -> np.ndarray | None:
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


class Store:
    """A handle on an HDF5 store. Get one from :func:`open_store` or :func:`edit_store`.

    Reading methods return pandas DataFrames (tables) and numpy arrays (embeddings).
    """

    def __init__(self, path: str | os.PathLike, file: h5py.File, writable: bool):
        self.path = Path(path)
        self.file = file
        self.writable = writable
        self._result_files: list[h5py.File] = []

    # ---- life cycle
    def close(self) -> None:
        for handle in self._result_files:
            if handle.id.valid:
                handle.close()
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, writable={self.writable})"

    @property
    def files_dir(self) -> Path:
        """Folder beside the store for files it owns (rendered and synthetic images)."""
        return self.path.with_name(self.path.name + ".files")

    # ---- tables
    def _table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame | None:
        return read_table(self.file[name], columns) if name in self.file else None

    def images(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The catalog: one row per image, ``image_id`` equal to the row's position
        (``columns``: only those columns)."""
        from swsa_store.catalog import empty_images_table

        table = self._table("images", columns)
        if table is None:
            table = empty_images_table()
            return table if columns is None else table[[c for c in columns if c in table]]
        return table

    def tasks(self) -> pd.DataFrame:
        from swsa_store.tasks import empty_tasks_table

        table = self._table("tasks")
        return empty_tasks_table() if table is None else table

    def task_members(self) -> pd.DataFrame:
        from swsa_store.tasks import empty_members_table

        table = self._table("task_members")
        return empty_members_table() if table is None else table

    def skips(self) -> pd.DataFrame:
        table = self._table("skips")
        return _empty_skips() if table is None else table

    def table_attrs(self, name: str) -> dict:
        return dict(self.file[name].attrs) if name in self.file else {}

    @property
    def n_images(self) -> int:
        return int(self.file["images"].attrs["n_rows"]) if "images" in self.file else 0

    # ---- embeddings
    def backbones(self) -> list[str]:
        """Names of the embedding matrices held, sorted."""
        return sorted(self.file["embeddings"]) if "embeddings" in self.file else []

    def _embedding_group(self, name: str) -> h5py.Group:
        if name not in self.backbones():
            held = ", ".join(self.backbones()) or "none"
            raise StoreError(
                f"store {self.path} has no embeddings named {name!r} (held: {held}); "
                f"run `swsa embed --store {self.path} --backbone {name}` first"
            )
        return self.file["embeddings"][name]

    def embedding_attrs(self, name: str) -> dict:
        """Self-describing attributes of one embedding matrix (config decoded from JSON)."""
        attrs = dict(self._embedding_group(name).attrs)
        if "config" in attrs:
            attrs["config"] = json.loads(attrs["config"])
        return attrs

    def done_mask(self, name: str) -> np.ndarray:
        """``(N,)`` uint8: 0 to do, 1 written, 2 failed."""
        return self._embedding_group(name)["done"][...]

    # ---- patch tokens (swsa embed --patch-tokens)
    def patch_sets(self) -> list[str]:
        """Names of the embeddings that also hold patch tokens, sorted."""
        return sorted(self.file["patches"]) if "patches" in self.file else []

    def _patch_group(self, name: str) -> h5py.Group:
        if name not in self.patch_sets():
            backbone = self.embedding_attrs(name).get("backbone") or name  # raises if no embeddings `name`
            raise StoreError(
                f"embeddings {name} were made without patch tokens; "
                f"run swsa embed --store {self.path} --backbone {backbone} --patch-tokens"
            )
        return self.file["patches"][name]

    def patch_attrs(self, name: str) -> dict:
        """Self-describing attributes of one patch-token array (grid, layer, dtype, config decoded)."""
        attrs = {k: json.loads(v) if isinstance(v, str) and v[:1] in ("[", "{") else v
                 for k, v in self._patch_group(name).attrs.items()}
        return attrs

    def patch_done_mask(self, name: str) -> np.ndarray:
        """``(N,)`` uint8 done flags of the patch tokens of ``name``: 0 to do, 1 written, 2 failed."""
        return self._patch_group(name)["done"][...]

    def patches(self, name: str, image_ids: np.ndarray | None = None) -> np.ndarray:
        """``(N, P, D')`` (or ``(len(image_ids), P, D')``) float16 patch tokens; rows not done are NaN."""
        tokens = self._patch_group(name)["tokens"]
        if image_ids is None:
            return tokens[...]
        ids = np.asarray(image_ids, dtype=np.int64)
        unique_ids, inverse = np.unique(ids, return_inverse=True)
        rows = tokens[unique_ids] if len(unique_ids) else np.empty((0,) + tokens.shape[1:], dtype=tokens.dtype)
        return rows[inverse.reshape(-1)]

    def embeddings(self, name: str, image_ids: np.ndarray | None = None, *, buffer: np.ndarray | None = None) -> np.ndarray:
        """``(N, D)`` (or ``(len(image_ids), D)``) float32 features; rows not done are NaN.

        ``buffer``: a float32 array of at least ``N * D`` elements that the whole matrix is read
        into (its leading elements, returned as an ``(N, D)`` view), so that reading one matrix
        after another reuses memory instead of faulting in fresh pages each time.
        """
        features = self._embedding_group(name)["features"]
        if image_ids is None:
            out = None
            if buffer is not None:
                if buffer.dtype != np.float32 or not buffer.flags.c_contiguous or buffer.size < features.size:
                    raise ValueError(f"buffer must be a C-contiguous float32 array of at least {features.size} elements "
                                     f"for embeddings {name!r} {features.shape}; got {buffer.dtype} with {buffer.size}")
                out = buffer.reshape(-1)[: features.size].reshape(features.shape)
            whole = _read_contiguous(self.file, features, out)
            if whole is not None:
                return whole
            if out is None:
                return features[...].astype(np.float32, copy=False)
            features.read_direct(out)
            return out
        ids = np.asarray(image_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        unique_ids, inverse = np.unique(sorted_ids, return_inverse=True)
        rows = features[unique_ids] if len(unique_ids) else np.empty((0, features.shape[1]))
        out = np.empty((len(ids), features.shape[1]), dtype=np.float32)
        out[order] = rows[inverse]
        return out

    # ---- imported scores
    def score_sets(self) -> list[str]:
        """Names of the imported score candidates (see :mod:`swsa_store.scores`)."""
        return sorted(self.file["scores"]) if "scores" in self.file else []

    def score_set(self, name: str) -> tuple[pd.DataFrame, np.ndarray, dict]:
        """``(task_id, image_id, score)`` rows, the ids of the tasks they fully cover, and attrs."""
        if name not in self.score_sets():
            raise StoreError(f"store {self.path} holds no imported scores named {name!r}; held: {self.score_sets()}")
        group = self.file["scores"][name]
        table = pd.DataFrame({key: group[key][...] for key in ("task_id", "image_id", "score")})
        return table, group["complete_task_ids"][...], dict(group.attrs)

    def write_score_set(self, name: str, task_id, image_id, score, complete_task_ids, attrs: dict) -> None:
        self._require_writable()
        scores = self.file.require_group("scores")
        if name in scores:
            del scores[name]
        group = scores.create_group(name)
        group.create_dataset("task_id", data=np.asarray(task_id, dtype=np.int64))
        group.create_dataset("image_id", data=np.asarray(image_id, dtype=np.int64))
        group.create_dataset("score", data=np.asarray(score, dtype=np.float64))
        group.create_dataset("complete_task_ids", data=np.asarray(complete_task_ids, dtype=np.int64))
        for key, value in attrs.items():
            group.attrs[key] = value

    # ---- results
    @property
    def results_dir(self) -> Path:
        """Folder beside the store holding one HDF5 file per result (``<name>.h5``): saving a
        result writes a small file atomically instead of rewriting the (possibly huge) store."""
        return self.path.with_name(self.path.name + ".results")

    def results(self) -> list[str]:
        inside = set(self.file["results"]) if "results" in self.file else set()
        beside = {p.stem for p in self.results_dir.glob("*.h5")} if self.results_dir.is_dir() else set()
        return sorted(inside | beside)

    def result_group(self, name: str) -> h5py.Group:
        """``results/<name>``: its file beside the store, else (stores written before 0.1) inside it."""
        side = self.results_dir / f"{name}.h5"
        if side.is_file():
            handle = h5py.File(side, "r")
            self._result_files.append(handle)
            return handle["result"]
        if name not in self.results():
            raise StoreError(
                f"store {self.path} holds no results named {name!r}; run `swsa score --store {self.path}` first"
            )
        return self.file["results"][name]

    # ---- text embeddings (CLIP prompts; see swsa_store.models.clip)
    def text_models(self) -> list[str]:
        """Names of the CLIP models with text embeddings, sorted."""
        return sorted(self.file["text"]) if "text" in self.file else []

    def text_sets(self, model: str) -> list[str]:
        """Prompt sets embedded for ``model``, sorted."""
        return sorted(self.file["text"][model]) if model in self.text_models() else []

    def text_embeddings(self, model: str, prompt_set: str) -> "TextEmbeddings":
        """One prompt set of one model: strings, ``(U, D)`` embeddings, row table and attrs."""
        if prompt_set not in self.text_sets(model):
            held = {m: self.text_sets(m) for m in self.text_models()} or "none"
            raise StoreError(
                f"store {self.path} has no text embeddings {model}/{prompt_set} (held: {held}); "
                f"run `swsa embed-text --store {self.path} --model ...` first"
            )
        group = self.file["text"][model][prompt_set]
        attrs = {k: json.loads(v) if isinstance(v, str) and v[:1] in ("[", "{") else v for k, v in group.attrs.items()}
        table = read_table(group["table"]) if "table" in group else pd.DataFrame()
        return TextEmbeddings(group["strings"].asstr()[...].astype(object),
                              group["embeddings"][...].astype(np.float32, copy=False), table, attrs)

    # ---- structural edits (only inside edit_store)
    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only; use swsa_store.edit_store(path)")

    def replace_table(self, name: str, table: pd.DataFrame, attrs: dict | None = None) -> None:
        self._require_writable()
        write_table(self.file, name, table, attrs)

    def append_skips(self, rows: pd.DataFrame) -> None:
        """Add skip rows, keeping one row per (stage, image_id, task_id, backbone); rows about no
        image and no task (a skipped class, a bad index line) are kept one per distinct reason."""
        self._require_writable()
        table = pd.concat([self.skips(), rows[list(SKIP_COLUMNS)]], ignore_index=True)
        # several classes of one dataset may be skipped at once: their rows differ only by reason
        general = (table["image_id"].to_numpy() < 0) & (table["task_id"].to_numpy() < 0)
        detail = pd.Series(np.where(general, table["reason"].astype(str).to_numpy(dtype=object), ""), index=table.index)
        keep = ~pd.concat([table[["stage", "image_id", "task_id", "backbone"]], detail.rename("detail")],
                          axis=1).duplicated(keep="last")
        self.replace_table("skips", table[keep].reset_index(drop=True))

    def create_embeddings(self, name: str, feature_dim: int, attrs: dict, dtype: str = "float32") -> None:
        """Allocate ``/embeddings/<name>`` for every catalogued image (NaN rows, done = 0)."""
        self._require_writable()
        group = self.file.require_group("embeddings").create_group(name)
        _allocate(group, "features", (self.n_images, int(feature_dim)), np.dtype(dtype), np.nan)
        _allocate(group, "done", (self.n_images,), np.dtype(np.uint8), 0)
        for key, value in attrs.items():
            group.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value

    def create_patches(self, name: str, n_patches: int, patch_dim: int, attrs: dict) -> None:
        """Allocate ``/patches/<name>``: ``tokens`` ``(N, n_patches, patch_dim)`` float16, chunked one
        image per chunk and allocated early (so row writes touch raw bytes only), NaN; ``done`` = 0."""
        self._require_writable()
        group = self.file.require_group("patches").create_group(name)
        shape = (self.n_images, int(n_patches), int(patch_dim))
        _allocate(group, "tokens", shape, np.dtype(np.float16), np.nan, chunks=(1,) + shape[1:])
        _allocate(group, "done", (self.n_images,), np.dtype(np.uint8), 0)
        for key, value in attrs.items():
            group.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value

    def grow_embeddings(self, n_rows: int) -> None:
        """Give every embedding matrix ``n_rows`` rows (after the catalog grew), keeping written rows."""
        self._require_writable()
        for name in self.patch_sets():
            group = self.file["patches"][name]
            if group["tokens"].shape[0] < n_rows:  # one image per chunk, as create_patches lays them out
                _grow_rows(group, "tokens", n_rows, chunks=(1,) + group["tokens"].shape[1:])
        for name in self.backbones():
            group = self.file["embeddings"][name]
            if group["features"].shape[0] < n_rows:
                _grow_rows(group, "features", n_rows)

    def write_text_embeddings(self, model: str, prompt_set: str, strings, embeddings: np.ndarray,
                              table: pd.DataFrame | None = None, attrs: dict | None = None) -> None:
        """Replace ``/text/<model>/<prompt_set>`` with ``strings`` (U,), ``embeddings`` (U, D),
        an optional row ``table`` (columns referencing string rows) and JSON-able ``attrs``."""
        self._require_writable()
        strings = np.asarray(list(strings), dtype=object)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(strings):
            raise StoreError(f"text embeddings must be (len(strings), D), got {embeddings.shape} for {len(strings)} strings")
        if "/" in model or "/" in prompt_set:
            raise StoreError(f"text model and prompt set names must not contain '/': {model!r}, {prompt_set!r}")
        parent = self.file.require_group("text").require_group(model)
        if prompt_set in parent:
            del parent[prompt_set]
        group = parent.create_group(prompt_set)
        group.create_dataset("strings", data=strings, dtype=h5py.string_dtype("utf-8"))
        group.create_dataset("embeddings", data=embeddings)
        if table is not None:
            write_table(group, "table", table)
        for key, value in (attrs or {}).items():
            group.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value

    def write_result(self, name: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        """Replace result ``name`` with ``arrays`` (strings allowed) and JSON-able ``attrs``
        (see :func:`save_result`)."""
        self._require_writable()
        save_result(self.path, name, arrays, attrs)


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
        _fsync_path(tmp)
        os.replace(tmp, final)
        _fsync_dir(folder)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def _allocate(group: h5py.Group, name: str, shape: tuple, dtype: np.dtype, fill: float,
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


def _grow_rows(group: h5py.Group, name: str, n_rows: int, chunks: tuple | None = None) -> None:
    """Replace ``group[name]`` (N, ...) and ``group["done"]`` (N,) by copies with ``n_rows`` rows:
    the first N rows as they were, the new ones NaN with done = 0 (to embed).

    Written under ``<name>_new`` / ``done_new`` first and copied in blocks of about 64 MiB (a
    patch-token set does not fit in memory), then moved over the old names.
    """
    old, old_done = group[name], group["done"]
    shape = (n_rows,) + old.shape[1:]
    _allocate(group, f"{name}_new", shape, old.dtype, np.nan, chunks=chunks)
    _allocate(group, "done_new", (n_rows,), np.dtype(np.uint8), 0)
    block = max(1, (64 << 20) // max(1, int(np.prod(shape[1:])) * old.dtype.itemsize))
    for lo in range(0, old.shape[0], block):
        hi = min(lo + block, old.shape[0])
        group[f"{name}_new"][lo:hi] = old[lo:hi]
    group["done_new"][: old_done.shape[0]] = old_done[...]
    del group[name], group["done"]
    group.move(f"{name}_new", name)
    group.move("done_new", "done")


# --------------------------------------------------------------------------- opening


def _check_schema(file: h5py.File, path: Path) -> None:
    version = file.attrs.get("schema_version")
    if version is None:
        raise StoreError(f"{path} is an HDF5 file but not an swsa store (no schema_version attribute)")
    if int(version) > SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {int(version)}, newer than this swsa understands "
            f"({SCHEMA_VERSION}); upgrade swsa (pip install -U swsa)"
        )


def _open_h5(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode, locking=False if mode == "r" else True)
    except OSError as error:
        raise StoreError(f"cannot open store {path}: {str(error).splitlines()[0]}") from None


def open_store(path: str | os.PathLike, mode: str = "r") -> Store:
    """Open an existing store, read-only by default (``mode="r"``).

    For structural changes use :func:`edit_store`; for new stores :func:`create_store`.
    """
    path = Path(path)
    if mode != "r":
        raise ValueError(
            f"open_store supports mode='r' only, got {mode!r}; edit a store with "
            "swsa_store.edit_store(path) (atomic), create one with swsa_store.create_store(path)"
        )
    if not path.exists():
        raise StoreError(f"store {path} does not exist; create it with `swsa catalog ... --store {path}`")
    file = _open_h5(path, "r")
    try:
        _check_schema(file, path)
    except Exception:
        file.close()
        raise
    return Store(path, file, writable=False)


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive, non-blocking writer lock for the store at ``path``."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"store {path} is being written by another process (lock {lock_path}); "
                "wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_path(path.parent if path.parent != Path("") else Path("."))


def create_store(path: str | os.PathLike, *, exist_ok: bool = True) -> Path:
    """Create an empty store at ``path`` (atomically). Existing stores are left as they are."""
    path = Path(path)
    if path.exists():
        if not exist_ok:
            raise StoreError(f"store {path} already exists")
        with open_store(path):
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.creating.{os.getpid()}")
    with h5py.File(tmp, "w") as file:
        file.attrs["schema_version"] = SCHEMA_VERSION
        file.attrs["swsa_version"] = _swsa_version()
        file.attrs["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        write_table(file, "skips", _empty_skips())
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_dir(path)
    return path


@contextlib.contextmanager
def edit_store(path: str | os.PathLike, *, compact: bool = False) -> Iterator[Store]:
    """Structural edit: yields a writable :class:`Store` on a copy, renamed over ``path`` on success.

    On an exception (or SIGKILL) the original file is unchanged. ``compact=True`` rewrites the
    copy object by object so space freed by replaced datasets is returned.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"store {path} does not exist; create it with `swsa catalog ... --store {path}`")
    with writer_lock(path):
        tmp = path.with_name(f".{path.name}.edit.{os.getpid()}")
        shutil.copyfile(path, tmp)
        try:
            file = _open_h5(tmp, "r+")
            try:
                _check_schema(file, path)
                store = Store(path, file, writable=True)
                yield store
                file.attrs["swsa_version"] = _swsa_version()
            finally:
                file.close()
            if compact:
                tmp = _compact(tmp)
            _fsync_path(tmp)
            os.replace(tmp, path)
            _fsync_dir(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _compact(path: Path) -> Path:
    """Copy every object of ``path`` into a fresh file (HDF5 does not reuse freed space)."""
    compacted = path.with_name(path.name + ".compact")
    with h5py.File(path, "r") as source, h5py.File(compacted, "w") as target:
        for key, value in source.attrs.items():
            target.attrs[key] = value
        for name in source:
            source.copy(source[name], target, name=name)
    os.unlink(path)
    return compacted


# --------------------------------------------------------------------------- row writes


class EmbeddingRowWriter:
    """Writes embedding rows of one matrix in place, durably, for the ingest loop.

    Use as a context manager while holding :func:`writer_lock`. Each :meth:`write` call
    makes its rows durable (``fsync``) before flagging them done, then makes the flags durable.
    """

    def __init__(self, path: str | os.PathLike, name: str, patches: bool = False):
        self.path = Path(path)
        self.name = name
        self.file = _open_h5(self.path, "r+")
        _check_schema(self.file, self.path)
        group = self.file["embeddings"][name]
        self.features = group["features"]
        self.done = group["done"]
        # patch tokens of the same images (swsa embed --patch-tokens): (N, P, D') float16
        self.patches = self.file["patches"][name]["tokens"] if patches else None
        self.patch_done = self.file["patches"][name]["done"] if patches else None
        self._fd = self.file.id.get_vfd_handle()

    def _sync(self) -> None:
        self.file.flush()
        os.fsync(self._fd)

    def write(self, image_ids: np.ndarray, rows: np.ndarray, status: np.ndarray,
              patch_rows: np.ndarray | None = None) -> None:
        """Store ``rows`` ``(B, D)`` for ``image_ids`` ``(B,)`` (sorted, unique) and set their
        done flags to ``status`` ``(B,)`` (1 written, 2 failed) — rows first, flags second.
        A writer opened with ``patches=True`` needs ``patch_rows`` ``(B, P, D')`` too; they are
        made durable with the rows, and their flags are set with the rows' flags."""
        ids = np.asarray(image_ids, dtype=np.int64)
        if (patch_rows is None) != (self.patches is None):
            raise StoreError(f"writer of {self.name!r} was opened with patches={self.patches is not None} "
                             f"but got patch_rows={'None' if patch_rows is None else 'an array'}; pass both or neither")
        for lo, hi in _contiguous_runs(ids):
            self.features[ids[lo] : ids[hi - 1] + 1] = rows[lo:hi].astype(self.features.dtype, copy=False)
            if self.patches is not None:
                self.patches[ids[lo] : ids[hi - 1] + 1] = patch_rows[lo:hi].astype(self.patches.dtype, copy=False)
        self._sync()
        for lo, hi in _contiguous_runs(ids):
            self.done[ids[lo] : ids[hi - 1] + 1] = status[lo:hi].astype(np.uint8)
            if self.patch_done is not None:
                self.patch_done[ids[lo] : ids[hi - 1] + 1] = status[lo:hi].astype(np.uint8)
        self._sync()

    def reset_failed(self) -> None:
        """Failed rows (2) become to-do (0) so a rerun tries them again."""
        for flags in (self.done, self.patch_done):
            if flags is None:
                continue
            done = flags[...]
            if (done == DONE_FAILED).any():
                done[done == DONE_FAILED] = DONE_TODO
                flags[...] = done
                self._sync()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> "EmbeddingRowWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _contiguous_runs(sorted_ids: np.ndarray) -> list[tuple[int, int]]:
    """Positions ``[lo, hi)`` of runs of consecutive integers in ``sorted_ids``."""
    if len(sorted_ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_ids) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(sorted_ids)]])
    return list(zip(starts.tolist(), ends.tolist()))
