"""Durable row writes of the ingest loop: embedding (and patch-token) rows written in place.

Row writes only touch raw bytes of datasets whose storage was allocated when they were
created (:func:`swsa_store.schema.allocate_filled`: contiguous layout or fixed chunks, early
allocation), so HDF5 metadata never changes while rows are written. A batch's feature rows are
written and ``fsync``-ed before its ``done`` flags are set and ``fsync``-ed: a row is never
marked done before it is durable.

Each written row carries a checksum: ``checksum`` ``(N,)`` uint32 beside ``done`` holds the CRC32
of the row's bytes as written (:func:`row_checksums`), computed from the rows in memory and made
durable with them, so ``swsa verify`` can tell a row changed on disk since (a flipped byte). The
writer reports its progress in ``<store>.progress`` (:func:`swsa_store.locks.write_progress`)
after every batch: ``rows_done`` of ``rows_total``.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import h5py
import numpy as np

from swsa_store.locks import write_progress
from swsa_store.schema import DONE_FAILED, DONE_TODO, StoreError, allocate_filled, check_schema, open_h5

__all__ = ["EmbeddingRowWriter", "row_checksums", "backfill_checksums", "CHECK_BLOCK_ROWS"]

#: Rows read at a time when checksums are computed from a file (backfill, verify).
CHECK_BLOCK_ROWS = 4096


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """``(B,)`` uint32 CRC32 of each row of ``rows`` ``(B, ...)`` — its bytes in its own dtype."""
    flat = np.ascontiguousarray(rows).reshape(len(rows), -1)
    return np.fromiter((zlib.crc32(row) for row in flat), dtype=np.uint32, count=len(flat))


def backfill_checksums(group: h5py.Group, data_name: str) -> bool:
    """Give ``group`` (an embedding or patch-token group written before checksums) its ``checksum``
    dataset, computed from the rows as they are now; False when it already has one."""
    if "checksum" in group:
        return False
    data = group[data_name]
    sums = allocate_filled(group, "checksum", (data.shape[0],), np.dtype(np.uint32), 0)
    done = group["done"][...]
    for lo in range(0, data.shape[0], CHECK_BLOCK_ROWS):
        hi = min(lo + CHECK_BLOCK_ROWS, data.shape[0])
        block = row_checksums(data[lo:hi])
        sums[lo:hi] = np.where(done[lo:hi] != DONE_TODO, block, 0).astype(np.uint32)
    return True


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
        self.checksum = group["checksum"] if "checksum" in group else None  # stores written before checksums
        self.patch_checksum = (self.file["patches"][name]["checksum"]
                               if patches and "checksum" in self.file["patches"][name] else None)
        self._fd = self.file.id.get_vfd_handle()
        #: progress reported after every write: rows flagged (this run + ``rows_before``) of ``rows_total``
        self.rows_before, self.rows_total, self.rows_written = 0, None, 0

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
        rows = rows.astype(self.features.dtype, copy=False)
        patch_rows = None if patch_rows is None else patch_rows.astype(self.patches.dtype, copy=False)
        sums = row_checksums(rows)
        patch_sums = None if patch_rows is None else row_checksums(patch_rows)
        for lo, hi in _contiguous_runs(ids):
            where = slice(ids[lo], ids[hi - 1] + 1)
            self.features[where] = rows[lo:hi]
            if self.checksum is not None:
                self.checksum[where] = sums[lo:hi]
            if self.patches is not None:
                self.patches[where] = patch_rows[lo:hi]
                if self.patch_checksum is not None:
                    self.patch_checksum[where] = patch_sums[lo:hi]
        self._sync()
        for lo, hi in _contiguous_runs(ids):
            self.done[ids[lo] : ids[hi - 1] + 1] = status[lo:hi].astype(np.uint8)
            if self.patch_done is not None:
                self.patch_done[ids[lo] : ids[hi - 1] + 1] = status[lo:hi].astype(np.uint8)
        self._sync()
        self.rows_written += len(ids)
        if self.rows_total is not None:
            write_progress(self.path, stage="embed", name=self.name, rows_done=self.rows_before + self.rows_written,
                           rows_total=self.rows_total)

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
