"""The HDF5 store: one file holds the catalog, the tasks, every backbone's embeddings and the
scoring results. Its layout, column tables and schema version are in :mod:`swsa_store.schema`;
durable row writes of the ingest loop in :mod:`swsa_store.row_writer`.

Crash safety. Two kinds of writes exist and each is safe against SIGKILL at any moment:

* *Row writes* (ingest, :class:`~swsa_store.row_writer.EmbeddingRowWriter`) only touch raw
  bytes of datasets whose storage was allocated when they were created (contiguous layout,
  early allocation), so HDF5 metadata never changes while rows are written. A batch's feature
  rows are written and ``fsync``-ed before its ``done`` flags are set and ``fsync``-ed: a row
  is never marked done before it is durable.
* *Structural edits* (new catalog rows, new tasks, a new embedding matrix, results) run in
  :func:`edit_store`, which works on a copy of the file and atomically renames it over the
  original on success. A killed edit leaves the original untouched.

One process writes at a time: every writer takes the store's lock (:func:`swsa_store.locks.store_lock`,
an exclusive ``flock`` on ``<store>.lock`` naming its holder) before its work starts; edits inside
a command that holds it re-enter it. Readers open without HDF5 file locking so that ``swsa info``
works during an ingest. Embedding rows carry CRC32 checksums (``checksum``, see
:mod:`swsa_store.row_writer`) that ``swsa verify`` checks; image paths are stored relative
(:mod:`swsa_store.paths`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd

from swsa_store.locks import store_lock
from swsa_store.paths import (ABS_ROOTS_ATTR, NEXT_ID_ATTR, ROOTS_ATTR, WRITTEN_FROM_ATTR, read_roots, resolve_paths,
                              root_dir, store_folder, stored_paths)
from swsa_store.schema import (
    SCHEMA_VERSION, SKIP_COLUMNS, StoreError, TextEmbeddings, allocate_filled, check_schema, empty_images_table,
    empty_skips, fsync_dir, fsync_path, grow_rows, open_h5, read_contiguous, read_table, save_result, swsa_version,
    utc_now, write_table,
)
from swsa_store.tasks import empty_members_table, empty_tasks_table

__all__ = ["SCHEMA_VERSION", "Store", "StoreError", "create_store", "edit_store", "open_store", "writer_lock"]


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

    def images(self, columns: list[str] | None = None, *, raw_paths: bool = False) -> pd.DataFrame:
        """The catalog: one row per image, ``image_id`` equal to the row's position
        (``columns``: only those columns). ``path`` is absolute (stored relative to the dataset's
        root or the store's folder, :mod:`swsa_store.paths`); ``raw_paths``: as stored."""
        table = self._table("images", columns)
        if table is None:
            table = empty_images_table()
            return table if columns is None else table[[c for c in columns if c in table]]
        if "path" in table and not raw_paths and len(table):
            rows = table if {"dataset", "kind"} <= set(table) else self._table("images", ["dataset", "kind"])
            attrs = self.table_attrs("images")
            table["path"] = resolve_paths(table["path"].to_numpy(), rows["dataset"].to_numpy(), rows["kind"].to_numpy(),
                                          read_roots(attrs), store_folder(self.path), read_roots(attrs, ABS_ROOTS_ATTR),
                                          attrs.get(WRITTEN_FROM_ATTR))
        return table

    def dataset_roots(self) -> dict[str, str]:
        """``{dataset: root}`` as recorded (absolute, or relative to the store's folder)."""
        return read_roots(self.table_attrs("images"))

    def tasks(self) -> pd.DataFrame:
        table = self._table("tasks")
        return empty_tasks_table() if table is None else table

    def task_members(self) -> pd.DataFrame:
        table = self._table("task_members")
        return empty_members_table() if table is None else table

    def skips(self) -> pd.DataFrame:
        table = self._table("skips")
        return empty_skips() if table is None else table

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
            whole = read_contiguous(self.file, features, out)
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

    def replace_images(self, table: pd.DataFrame, roots: dict[str, str] | None = None) -> None:
        """Replace the catalog with ``table`` (absolute or stored paths), keeping its attributes:
        ``roots`` updates the recorded dataset roots, paths are stored relative where they can be
        and ``next_image_id`` never goes down (image ids are never reused)."""
        self._require_writable()
        attrs = {k: v for k, v in self.table_attrs("images").items() if k not in ("columns", "n_rows")}
        merged = {**read_roots(attrs), **(roots or {})}
        folder = store_folder(self.path)
        table = table.copy()
        table["path"] = stored_paths(table["path"].to_numpy(), table["dataset"].to_numpy(), table["kind"].to_numpy(),
                                     merged, folder)
        known = read_roots(attrs, ABS_ROOTS_ATTR)  # keep a recorded place that exists over one that does not
        absolute = {d: root_dir(r, folder) if d in (roots or {}) or os.path.isdir(root_dir(r, folder)) or d not in known
                    else known[d] for d, r in merged.items()}
        attrs[ROOTS_ATTR] = json.dumps(merged, sort_keys=True)
        attrs[ABS_ROOTS_ATTR] = json.dumps(absolute, sort_keys=True)
        attrs[WRITTEN_FROM_ATTR] = folder
        attrs[NEXT_ID_ATTR] = max(int(attrs.get(NEXT_ID_ATTR, 0)), len(table))
        write_table(self.file, "images", table, attrs)

    def append_skips(self, rows: pd.DataFrame) -> None:
        """Add skip rows, keeping every distinct reason of a (stage, image_id, task_id, backbone) —
        several may apply to one image, task or class — and each identical row once (a re-run adds none)."""
        self._require_writable()
        table = pd.concat([self.skips(), rows[list(SKIP_COLUMNS)]], ignore_index=True)
        keys = table[list(SKIP_COLUMNS)].astype({"reason": str})
        self.replace_table("skips", table[~keys.duplicated(keep="first")].reset_index(drop=True))

    def create_embeddings(self, name: str, feature_dim: int, attrs: dict, dtype: str = "float32") -> None:
        """Allocate ``/embeddings/<name>`` for every catalogued image (NaN rows, done = 0)."""
        self._require_writable()
        group = self.file.require_group("embeddings").create_group(name)
        allocate_filled(group, "features", (self.n_images, int(feature_dim)), np.dtype(dtype), np.nan)
        allocate_filled(group, "done", (self.n_images,), np.dtype(np.uint8), 0)
        allocate_filled(group, "checksum", (self.n_images,), np.dtype(np.uint32), 0)
        for key, value in attrs.items():
            group.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value

    def create_patches(self, name: str, n_patches: int, patch_dim: int, attrs: dict) -> None:
        """Allocate ``/patches/<name>``: ``tokens`` ``(N, n_patches, patch_dim)`` float16, chunked one
        image per chunk and allocated early (so row writes touch raw bytes only), NaN; ``done`` = 0."""
        self._require_writable()
        group = self.file.require_group("patches").create_group(name)
        shape = (self.n_images, int(n_patches), int(patch_dim))
        allocate_filled(group, "tokens", shape, np.dtype(np.float16), np.nan, chunks=(1,) + shape[1:])
        allocate_filled(group, "done", (self.n_images,), np.dtype(np.uint8), 0)
        allocate_filled(group, "checksum", (self.n_images,), np.dtype(np.uint32), 0)
        for key, value in attrs.items():
            group.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value

    def grow_embeddings(self, n_rows: int) -> None:
        """Give every embedding matrix ``n_rows`` rows (after the catalog grew), keeping written rows."""
        self._require_writable()
        for name in self.patch_sets():
            group = self.file["patches"][name]
            if group["tokens"].shape[0] < n_rows:  # one image per chunk, as create_patches lays them out
                grow_rows(group, "tokens", n_rows, chunks=(1,) + group["tokens"].shape[1:])
        for name in self.backbones():
            group = self.file["embeddings"][name]
            if group["features"].shape[0] < n_rows:
                grow_rows(group, "features", n_rows)

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


# --------------------------------------------------------------------------- opening


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
    file = open_h5(path, "r")
    try:
        check_schema(file, path)
    except Exception:
        file.close()
        raise
    return Store(path, file, writable=False)


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, *, wait: float | None = 0.0) -> Iterator[None]:
    """The store's writer lock (:func:`swsa_store.locks.store_lock`): exclusive, re-entrant in a
    process, failing at once (or after ``wait`` seconds) when another process holds it."""
    with store_lock(path, wait=wait):
        yield


def create_store(path: str | os.PathLike, *, exist_ok: bool = True) -> Path:
    """Create an empty store at ``path`` (atomically). Existing stores are left as they are."""
    path = Path(path)
    if path.exists():
        if not exist_ok:
            raise StoreError(f"store {path} already exists")
        with open_store(path):
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(path):
        if path.exists():  # made by the writer we waited for
            return path
        tmp = path.with_name(f".{path.name}.creating.{os.getpid()}")
        with h5py.File(tmp, "w") as file:
            file.attrs["schema_version"] = SCHEMA_VERSION
            file.attrs["swsa_version"] = swsa_version()
            file.attrs["created_utc"] = utc_now()
            write_table(file, "skips", empty_skips())
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_dir(path)
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
    with store_lock(path):
        tmp = path.with_name(f".{path.name}.edit.{os.getpid()}")
        shutil.copyfile(path, tmp)
        try:
            file = open_h5(tmp, "r+")
            try:
                check_schema(file, path)
                store = Store(path, file, writable=True)
                yield store
                file.attrs["swsa_version"] = swsa_version()
            finally:
                file.close()
            if compact:
                tmp = _compact(tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_dir(path)
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
