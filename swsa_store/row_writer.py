"""Durable row writes of the ingest loop: embedding (and patch-token) rows written in place.

Row writes only touch raw bytes of datasets whose storage was allocated when they were
created (:func:`swsa_store.schema.allocate_filled`: contiguous layout or fixed chunks, early
allocation), so HDF5 metadata never changes while rows are written. A batch's feature rows are
written and ``fsync``-ed before its ``done`` flags are set and ``fsync``-ed: a row is never
marked done before it is durable. Several batches may be written as one *group commit*
(:meth:`EmbeddingRowWriter.write_group`, as databases do): all their rows, one ``fsync``, all their
flags, one ``fsync`` — so a slow ``fsync`` is paid once per group, not once per batch.

Each written row carries a checksum: ``checksum`` ``(N,)`` uint32 beside ``done`` holds the CRC32
of the row's bytes as written (:func:`row_checksums`), computed from the rows in memory and made
durable with them, so ``swsa verify`` can tell a row changed on disk since (a flipped byte). The
writer reports its progress in ``<store>.progress`` (:func:`swsa_store.locks.write_progress`)
after every commit: ``rows_done`` of ``rows_total``.

:func:`write_embedded_batches` turns what the forward pass gave (:class:`EmbeddedBatch`) into rows
and done flags (undecodable images and non-finite rows failed) and commits them: the one write step
of the local and the Ray ingest path.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from swsa_store.locks import write_progress
from swsa_store.schema import (DONE_FAILED, DONE_TODO, DONE_WRITTEN, StoreError, allocate_filled, check_schema,
                               open_h5)

__all__ = ["EmbeddingRowWriter", "RowBatch", "EmbeddedBatch", "write_embedded_batches",
           "row_checksums", "backfill_checksums", "CHECK_BLOCK_ROWS"]

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


@dataclass(frozen=True)
class RowBatch:
    """One batch of rows to commit: ``image_ids`` ``(B,)`` int64 (sorted, unique), ``rows`` ``(B, D)``,
    ``status`` ``(B,)`` uint8 done flags (1 written, 2 failed), and for a patch writer ``patch_rows``
    ``(B, P, D')``."""

    image_ids: np.ndarray
    rows: np.ndarray
    status: np.ndarray
    patch_rows: np.ndarray | None = None


@dataclass(frozen=True)
class EmbeddedBatch:
    """A batch as the forward pass left it: ``ids`` ``(B,)`` sorted image ids, ``ok`` ``(B,)`` bool
    (decoded), ``features`` ``(ok.sum(), D)`` float32 for the decoded images — or the pair ``(pooled
    (ok.sum(), D), patch tokens (ok.sum(), P, D'))`` of a patch-token model, or None when none
    decoded — and ``reasons`` ``[B]`` why an image failed ("" when it did not)."""

    ids: np.ndarray
    ok: np.ndarray
    features: np.ndarray | tuple[np.ndarray, np.ndarray] | None
    reasons: list[str]

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays (what it holds in memory until written)."""
        arrays = self.features if isinstance(self.features, tuple) else (self.features,)
        return self.ids.nbytes + self.ok.nbytes + sum(a.nbytes for a in arrays if a is not None)


class EmbeddingRowWriter:
    """Writes embedding rows of one matrix in place, durably, for the ingest loop.

    Use as a context manager while holding :func:`swsa_store.store.writer_lock`. Each :meth:`write_group`
    call (one commit; :meth:`write` commits one batch) makes its rows durable (``fsync``) before
    flagging them done, then makes the flags durable.
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
        done flags to ``status`` ``(B,)`` (1 written, 2 failed) — rows first, flags second: a group
        commit of one batch (:meth:`write_group`). A writer opened with ``patches=True`` needs
        ``patch_rows`` ``(B, P, D')`` too; they are made durable with the rows, and their flags are
        set with the rows' flags."""
        self.write_group([RowBatch(np.asarray(image_ids, dtype=np.int64), rows, status, patch_rows)])

    def write_group(self, batches: Sequence[RowBatch]) -> None:
        """Commit ``batches`` together: every batch's rows (checksums, patch rows) written, one
        flush + ``fsync``; then every batch's done flags, one flush + ``fsync``; then one progress
        report. A failure before the second ``fsync`` returns leaves no flag of the group durable
        (rows of earlier commits are untouched: rows are written in place, by image id)."""
        batches = [self._checked(batch) for batch in batches]
        for batch in batches:
            self._write_rows(batch)
        self._sync()
        for batch in batches:
            for lo, hi in _contiguous_runs(batch.image_ids):
                where = slice(batch.image_ids[lo], batch.image_ids[hi - 1] + 1)
                self.done[where] = batch.status[lo:hi]
                if self.patch_done is not None:
                    self.patch_done[where] = batch.status[lo:hi]
        self._sync()
        self.rows_written += sum(len(batch.image_ids) for batch in batches)
        if self.rows_total is not None:
            write_progress(self.path, stage="embed", name=self.name, rows_done=self.rows_before + self.rows_written,
                           rows_total=self.rows_total)

    def _checked(self, batch: RowBatch) -> RowBatch:
        """``batch`` in the store's dtypes, or a :class:`StoreError` when its patch rows do not
        match how the writer was opened."""
        if (batch.patch_rows is None) != (self.patches is None):
            raise StoreError(f"writer of {self.name!r} was opened with patches={self.patches is not None} but got "
                             f"patch_rows={'None' if batch.patch_rows is None else 'an array'}; pass both or neither")
        patch_rows = None if batch.patch_rows is None else batch.patch_rows.astype(self.patches.dtype, copy=False)
        return RowBatch(np.asarray(batch.image_ids, dtype=np.int64), batch.rows.astype(self.features.dtype, copy=False),
                        np.asarray(batch.status).astype(np.uint8, copy=False), patch_rows)

    def _write_rows(self, batch: RowBatch) -> None:
        """Write ``batch``'s rows, patch rows and their checksums in place (not synced, no flag)."""
        sums = row_checksums(batch.rows) if self.checksum is not None else None
        patch_sums = row_checksums(batch.patch_rows) if self.patch_checksum is not None else None
        for lo, hi in _contiguous_runs(batch.image_ids):
            where = slice(batch.image_ids[lo], batch.image_ids[hi - 1] + 1)
            self.features[where] = batch.rows[lo:hi]
            if sums is not None:
                self.checksum[where] = sums[lo:hi]
            if self.patches is not None:
                self.patches[where] = batch.patch_rows[lo:hi]
                if patch_sums is not None:
                    self.patch_checksum[where] = patch_sums[lo:hi]

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


def write_embedded_batches(writer: EmbeddingRowWriter, batches: Sequence[EmbeddedBatch],
                           failures: list[tuple[int, str]]) -> list[np.ndarray]:
    """Write embedded ``batches`` durably as one group commit (:meth:`EmbeddingRowWriter.write_group`).

    Undecodable images and non-finite rows are written as failed (NaN rows); once the commit is
    durable they are appended to ``failures`` as ``(image_id, reason)``. Returns each batch's
    ``(B,)`` uint8 done status as written. With a patch writer (``writer.patches``), each batch's
    ``features`` is the pair (pooled, patch tokens) and both are written (tokens in float16).
    A batch whose features do not fit the store's matrix raises :class:`StoreError` before
    anything of the group is written.
    """
    prepared = [_embedded_rows(writer, batch) for batch in batches]
    writer.write_group([rows for rows, _ in prepared])
    for rows, reasons in prepared:
        failures.extend((int(rows.image_ids[i]), reasons[i]) for i in np.flatnonzero(rows.status == DONE_FAILED))
    return [rows.status for rows, _ in prepared]


def _embedded_rows(writer: EmbeddingRowWriter, batch: EmbeddedBatch) -> tuple[RowBatch, list[str]]:
    """The rows, status and patch rows to write for ``batch``, and each image's failure reason."""
    features, tokens = batch.features if isinstance(batch.features, tuple) else (batch.features, None)
    dim = writer.features.shape[1]
    rows = np.full((len(batch.ids), dim), np.nan, dtype=np.float32)
    status = np.where(batch.ok, DONE_WRITTEN, DONE_FAILED).astype(np.uint8)
    reasons = list(batch.reasons)
    if features is not None:
        if features.shape[1] != dim:
            raise StoreError(f"backbone produced {features.shape[1]}-d features but the store's matrix "
                             f"{writer.name!r} is {dim}-d; embed under another name")
        rows[batch.ok] = features
        _fail(batch.ok & ~np.isfinite(rows).all(axis=1), status, reasons,
              "non-finite embedding (NaN or inf in the backbone's output)")
    patch_rows = None if writer.patches is None else _patch_rows(writer, batch, tokens, status, reasons)
    return RowBatch(np.asarray(batch.ids, dtype=np.int64), rows, status, patch_rows), reasons


def _patch_rows(writer: EmbeddingRowWriter, batch: EmbeddedBatch, tokens: np.ndarray | None, status: np.ndarray,
                reasons: list[str]) -> np.ndarray:
    """``(B, P, D')`` float16 patch rows of ``batch`` (NaN where not decoded); rows not finite in
    float16 are failed in ``status`` and ``reasons``."""
    shape = writer.patches.shape[1:]
    patch_rows = np.full((len(batch.ids),) + shape, np.nan, dtype=np.float16)
    if batch.features is None:
        return patch_rows
    if tokens is None or tokens.shape[1:] != shape:
        got = "no patch tokens" if tokens is None else f"patch tokens of shape {tokens.shape[1:]}"
        raise StoreError(f"backbone produced {got} but the store's patches {writer.name!r} are {shape}; "
                         "embed under another name")
    with np.errstate(over="ignore"):
        patch_rows[batch.ok] = tokens.astype(np.float16)
    _fail((status == DONE_WRITTEN) & ~np.isfinite(patch_rows).all(axis=(1, 2)), status, reasons,
          "non-finite patch tokens (NaN, inf, or beyond float16's range 65504)")
    return patch_rows


def _fail(bad: np.ndarray, status: np.ndarray, reasons: list[str], reason: str) -> None:
    """Mark the rows ``bad`` ``(B,)`` bool failed in ``status``, with ``reason``."""
    status[bad] = DONE_FAILED
    for i in np.flatnonzero(bad):
        reasons[i] = reason


def _contiguous_runs(sorted_ids: np.ndarray) -> list[tuple[int, int]]:
    """Positions ``[lo, hi)`` of runs of consecutive integers in ``sorted_ids``."""
    if len(sorted_ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_ids) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(sorted_ids)]])
    return list(zip(starts.tolist(), ends.tolist()))
