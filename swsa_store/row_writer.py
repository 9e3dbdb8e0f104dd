"""Durable row writes of the ingest loop: embedding (and patch-token) rows written in place.

Row writes only touch raw bytes of datasets whose storage was allocated when they were
created (:func:`swsa_store.schema.allocate_filled`: contiguous layout or fixed chunks, early
allocation), so HDF5 metadata never changes while rows are written. A batch's feature rows are
written and ``fsync``-ed before its ``done`` flags are set and ``fsync``-ed: a row is never
marked done before it is durable.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from swsa_store.schema import DONE_FAILED, DONE_TODO, StoreError, check_schema, open_h5

__all__ = ["EmbeddingRowWriter"]


class EmbeddingRowWriter:
    """Writes embedding rows of one matrix in place, durably, for the ingest loop.

    Use as a context manager while holding :func:`swsa_store.store.writer_lock`. Each :meth:`write` call
    makes its rows durable (``fsync``) before flagging them done, then makes the flags durable.
    """

    def __init__(self, path: str | os.PathLike, name: str, patches: bool = False):
        self.path = Path(path)
        self.name = name
        self.file = open_h5(self.path, "r+")
        check_schema(self.file, self.path)
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
