"""The pieces of ingest and the local runner that overlaps them (the resume rule and
:func:`~swsa_store.ingest.embed_store` are in :mod:`swsa_store.ingest`).

The pieces, as in clip-retrieval: a *reader* (:class:`ImageReader`, a torch Dataset that decodes and
preprocesses images, failures returned as values, not raised), an *embedder* (:class:`Embedder`, the
backbone's forward pass, autocast on GPU) and a *writer* (:func:`~swsa_store.row_writer.write_embedded_batches`
on an :class:`~swsa_store.row_writer.EmbeddingRowWriter`).

The local runner (:func:`run_ingest`) keeps the CPU on decoding, resizing and the forward pass:

* a pool of threads, one per core, decodes and resizes the images of the next batches (Pillow
  releases the GIL in both) while the calling thread runs the forward passes — on a GPU at the same
  time, on the CPU on the cores its intra-op threads leave free, else between forward passes
  (:class:`ForwardGate`: a decoder that takes a core from those threads stalls them all);
* the backbone's transform is split at its ``ToTensor`` (:func:`pixel_plan`): after the PIL steps
  (resize, crop), ``ToTensor`` and ``Normalize`` are done in numpy on the decoding thread — the same
  float32 operations, so the model's input, and so every embedding, is bit-identical, without torch's
  per-image operations, whose intra-op thread team stalls while the decoders hold the cores (on two
  busy cores they cost as much as the forward pass at 224 px);
* durable writes (checksums, HDF5, ``fsync``) run on one writer thread, in batch order, as group
  commits (:class:`GroupCommits`): each commit takes every embedded batch waiting for it — all their
  rows, one ``fsync``, all their flags, one ``fsync`` — so when an ``fsync`` is slower than a forward
  pass (a fast GPU, a network disk) batches share it instead of each waiting for its own, and when
  writes are fast each batch is its own commit. A batch's rows are durable before its flags, and
  batches become durable in order. The forward pass waits for the writer only while
  :data:`WRITE_BACKLOG_BYTES` of embedded batches are not yet durable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm

from swsa_store.catalog import resolve_path
from swsa_store.row_writer import EmbeddedBatch, EmbeddingRowWriter, write_embedded_batches
from swsa_store.samples import read_image
from swsa_store.schema import DONE_FAILED, DONE_WRITTEN

__all__ = [
    "BATCHES_AHEAD",
    "Embedder",
    "ForwardGate",
    "GroupCommits",
    "ImageReader",
    "PixelPlan",
    "available_cores",
    "collate_items",
    "pixel_plan",
    "report_durable",
    "run_ingest",
    "WRITE_BACKLOG_BYTES",
]

#: Batches read ahead of the forward pass (each ``batch_size`` float32 model inputs; on the CPU the
#: decoders mostly wait for the forward pass, so this matters for GPU runs).
BATCHES_AHEAD = 2
#: Bytes of embedded batches not yet durable (waiting for the writer thread, or in its commit) past
#: which the forward pass waits for the writer; one batch may always wait. It bounds the memory those
#: batches hold (the features as the model returned them: 64 images of 512-d float32 are 128 KiB, so
#: about 2,000 such batches; patch tokens are far larger, so fewer), and so the size of one commit.
WRITE_BACKLOG_BYTES = 256 << 20


@dataclass(frozen=True)
class PixelPlan:
    """A backbone transform split at its ``ToTensor``: the PIL steps before it, then ``ToTensor`` and
    ``Normalize`` (or none) done in numpy — no torch operation per image, so no intra-op thread team
    that a decoding thread can stall.

    ``mean`` and ``std`` ``(C, 1, 1)`` float32 (None without ``Normalize``) are the values
    ``Normalize`` computes with; ``tensor_steps`` are the transform's own steps after the PIL ones,
    applied to an image that is not RGB."""

    pil_steps: tuple[Callable, ...]
    tensor_steps: tuple[Callable, ...]
    mean: np.ndarray | None
    std: np.ndarray | None

    def pixels(self, image: Image.Image) -> np.ndarray:
        """``image`` as the model's input ``(3, H, W)`` float32: the PIL steps, then per element what
        ``ToTensor`` (to float32, ``/ 255``) and ``Normalize`` (``- mean``, ``/ std``) compute, each
        operation rounded to float32 as in torch, so the values are bit-identical."""
        for step in self.pil_steps:
            image = step(image)
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            for step in self.tensor_steps:
                image = step(image)
            return image.numpy()
        values = np.asarray(image).transpose(2, 0, 1).astype(np.float32, order="C")
        values /= np.float32(255)
        if self.mean is not None:
            values -= self.mean
            values /= self.std
        return values


def pixel_plan(transform: Callable) -> PixelPlan | None:
    """``transform`` split for :class:`PixelPlan`, when it is a ``Compose`` of PIL steps, then
    ``ToTensor`` (torchvision's, or the ``MaybeToTensor`` of timm or open_clip), then at most a
    ``Normalize`` whose std has no zero, and torch's default dtype is float32; None otherwise (the
    reader then applies ``transform`` as it is)."""
    if type(transform) is not transforms.Compose or torch.get_default_dtype() != torch.float32:
        return None
    steps = list(transform.transforms)
    to_tensor = [i for i, step in enumerate(steps) if type(step) in _to_tensor_types()]
    if len(to_tensor) != 1:
        return None
    after = steps[to_tensor[0] + 1:]
    if len(after) > 1 or (after and type(after[0]) is not transforms.Normalize):
        return None
    mean = std = None
    if after:  # as torchvision's normalize: float32 tensors of the given values, one per channel
        mean = torch.as_tensor(after[0].mean, dtype=torch.float32).numpy().reshape(-1, 1, 1)
        std = torch.as_tensor(after[0].std, dtype=torch.float32).numpy().reshape(-1, 1, 1)
        if (std == 0).any():
            return None
    return PixelPlan(pil_steps=tuple(steps[: to_tensor[0]]), tensor_steps=tuple(steps[to_tensor[0]:]),
                     mean=mean, std=std)


def _to_tensor_types() -> tuple[type, ...]:
    """The ``ToTensor`` steps that turn a PIL image into ``to_tensor(image)``: torchvision's, and the
    ``MaybeToTensor`` of timm and of open_clip — looked up among the loaded modules, since a transform
    that holds one was built by its package."""
    types = [transforms.ToTensor]
    for module in ("timm.data.transforms", "open_clip.transform"):
        if module in sys.modules:
            types.append(sys.modules[module].MaybeToTensor)
    return tuple(types)


class ImageReader(Dataset):
    """Decodes and preprocesses catalogued images; a failure is returned, never raised.

    Item: ``(image_id, pixels or None, reason)``: pixels ``(3, H, W)``, the transform's tensor, or with a
    ``plan`` (:func:`pixel_plan` of the transform) the same values as a float32 numpy array.
    """

    def __init__(self, image_ids: Sequence[int], paths: Sequence[str], transform: Callable,
                 store_path: str | os.PathLike, plan: PixelPlan | None = None):
        self.image_ids = list(map(int, image_ids))
        self.paths = list(paths)
        self.transform = transform
        self.store_path = store_path
        self.plan = plan

    def with_plan(self, plan: PixelPlan | None) -> "ImageReader":
        """The same images read with ``plan``."""
        return ImageReader(self.image_ids, self.paths, self.transform, self.store_path, plan)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        try:
            image = read_image(resolve_path(self.store_path, self.paths[index]))
            return image_id, self.transform(image) if self.plan is None else self.plan.pixels(image), ""
        except Exception as error:  # recorded as a skip by the runner
            return image_id, None, str(error).splitlines()[0] if str(error) else type(error).__name__


def collate_items(items):
    """One batch from :class:`ImageReader` items ``[(image_id, pixels or None, reason)]``:
    ``(ids (B,) int64, ok (B,) bool, batch (ok.sum(), 3, H, W) float or None, reasons [B])`` — only the
    decoded images are stacked (the reader's failures are kept as ``ok`` False and their reason)."""
    ids = np.array([item[0] for item in items], dtype=np.int64)
    ok = [item[1] is not None for item in items]
    decoded = [item[1] for item in items if item[1] is not None]
    if not decoded:
        batch = None
    elif isinstance(decoded[0], np.ndarray):  # read with a PixelPlan
        batch = torch.from_numpy(np.stack(decoded))
    else:
        batch = torch.stack(decoded)
    reasons = [item[2] for item in items]
    return ids, np.array(ok, dtype=bool), batch, reasons


class Embedder:
    """The forward pass of a loaded backbone: ``(B, 3, H, W)`` → ``(B, D)`` float32 numpy."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu", autocast: bool | None = None):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.autocast = self.device.type == "cuda" if autocast is None else autocast

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, enabled=self.autocast):
            features = self.model(batch)
        if isinstance(features, tuple):  # a PatchTokenModel: (pooled (B, D), patch tokens (B, P, D'))
            return tuple(f.float().cpu().numpy() for f in features)
        return features.float().cpu().numpy()


def available_cores() -> int:
    """The cores this process may run on: the default number of decoding threads."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class ForwardGate:
    """How many decoding threads may work while a forward pass runs: ``slots`` (None: any number).

    A CPU forward pass keeps ``torch.get_num_threads()`` cores busy with its intra-op threads, a team
    that meets at a barrier after each operation: a decoding thread that takes a core from one of
    them stalls the whole team, which costs more than the decode itself. So on the CPU only the
    cores left over (``available_cores() - torch threads``, often none) decode during a forward
    pass, and every core decodes between forward passes; with a GPU forward pass the cores are free
    (``slots`` None). A decode under way when a forward pass starts finishes.
    """

    def __init__(self, slots: int | None):
        self.slots = slots
        self._state = threading.Condition()
        self._forward_running = False
        self._decoding = 0

    @classmethod
    def for_device(cls, device: torch.device) -> "ForwardGate":
        """The gate for a forward pass on ``device``."""
        if device.type != "cpu":
            return cls(None)
        return cls(max(0, available_cores() - torch.get_num_threads()))

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """A forward pass's span."""
        with self._state:
            self._forward_running = True
        try:
            yield
        finally:
            with self._state:
                self._forward_running = False
                self._state.notify_all()

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """One image's decode: it starts once the gate lets it."""
        with self._state:
            while self._forward_running and self.slots is not None and self._decoding >= self.slots:
                self._state.wait()
            self._decoding += 1
        try:
            yield
        finally:
            with self._state:
                self._decoding -= 1
                self._state.notify_all()


class _ThreadedReads:
    """The items of each batch of ``positions``, read by ``reader`` on a pool of ``threads`` threads,
    :data:`BATCHES_AHEAD` batches ahead of the consumer, each image once ``gate`` lets it. A context
    manager: leaving it cancels the reads not started."""

    def __init__(self, reader: ImageReader, positions: list[list[int]], threads: int, gate: ForwardGate):
        self.reader, self.positions, self.gate = reader, positions, gate
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="swsa-decode")

    def __enter__(self) -> "_ThreadedReads":
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, position: int):
        with self.gate.decoding():
            return self.reader[position]

    def __iter__(self) -> Iterator[list]:
        pending: deque[list[Future]] = deque()
        submitted = 0
        for _ in self.positions:
            while submitted < len(self.positions) and len(pending) <= BATCHES_AHEAD:
                pending.append([self.pool.submit(self._read, p) for p in self.positions[submitted]])
                submitted += 1
            yield [future.result() for future in pending.popleft()]


class _LoaderReads:
    """The items of each batch of ``positions``, read by ``num_workers`` DataLoader worker processes."""

    def __init__(self, reader: ImageReader, positions: list[list[int]], num_workers: int):
        self.loader = DataLoader(reader, batch_sampler=positions, num_workers=num_workers, collate_fn=list,
                                 persistent_workers=False)

    def __enter__(self) -> "_LoaderReads":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __iter__(self) -> Iterator[list]:
        return iter(self.loader)


class GroupCommits:
    """Embedded batches written durably on one writer thread, in the order submitted, as group commits.

    Each commit takes every batch waiting (:func:`~swsa_store.row_writer.write_embedded_batches`: all
    their rows, one ``fsync``, all their flags, one ``fsync``). :meth:`submit` returns at once unless
    ``backlog_bytes`` (:data:`WRITE_BACKLOG_BYTES`) of batches are embedded and not yet durable; then
    it waits for a commit. After a failed commit nothing more is written; :meth:`raise_failure`
    raises its error. A context manager: leaving it commits the batches submitted (unless a commit
    failed) and ends the thread.
    """

    def __init__(self, writer: EmbeddingRowWriter, failures: list[tuple[int, str]],
                 backlog_bytes: int = WRITE_BACKLOG_BYTES):
        self.writer, self.failures, self.backlog_bytes = writer, failures, backlog_bytes
        self._state = threading.Condition()
        self._waiting: list[tuple[int, EmbeddedBatch]] = []  # submitted, not taken by a commit yet
        self._durable: list[tuple[int, np.ndarray]] = []  # (index, status (B,)) committed, not taken by durable()
        self._pending_bytes = 0  # of the batches submitted and not yet durable
        self._error: Exception | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._commit_loop, name="swsa-write", daemon=True)

    def __enter__(self) -> "GroupCommits":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, index: int, batch: EmbeddedBatch) -> None:
        """Queue batch number ``index`` (in any order: :meth:`durable` reports batches in the order they
        were committed); dropped once a commit has failed."""
        with self._state:
            while (self._pending_bytes and self._pending_bytes + batch.nbytes > self.backlog_bytes
                   and self._error is None):
                self._state.wait()
            if self._error is None:
                self._waiting.append((index, batch))
                self._pending_bytes += batch.nbytes
                self._state.notify_all()

    def durable(self) -> list[tuple[int, np.ndarray]]:
        """``[(index, status (B,))]`` of the batches made durable since the last call, in order."""
        with self._state:
            taken, self._durable = self._durable, []
        return taken

    def raise_failure(self) -> None:
        """Raise the error of a failed commit, if one failed."""
        with self._state:
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Wait until every batch submitted is durable (or a commit failed) and the thread ends."""
        with self._state:
            self._closing = True
            self._state.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _commit_loop(self) -> None:
        while True:
            with self._state:
                while not self._waiting and not self._closing:
                    self._state.wait()
                group, self._waiting = self._waiting, []
            if not group:
                return
            try:
                statuses = write_embedded_batches(self.writer, [batch for _, batch in group], self.failures)
            except Exception as error:  # raised on the calling thread by raise_failure()
                with self._state:
                    self._error = error
                    self._state.notify_all()
                return
            with self._state:
                self._durable += [(index, status) for (index, _), status in zip(group, statuses)]
                self._pending_bytes -= sum(batch.nbytes for _, batch in group)
                self._state.notify_all()


def run_ingest(
    reader: ImageReader,
    embedder: Embedder,
    writer: EmbeddingRowWriter,
    batches: list[np.ndarray],
    *,
    num_workers: int = 0,
    decode_threads: int | None = None,
    progress: bool = True,
    description: str = "embed",
    after_batch: Callable[[int], None] | None = None,
) -> tuple[int, int, list[tuple[int, str]]]:
    """Embed ``batches`` (arrays of image ids of ``reader``) and write them, in order.

    Images are read by ``decode_threads`` threads (default :func:`available_cores`; on the CPU
    mostly between forward passes, see :class:`ForwardGate`), or with ``num_workers`` > 0 by that many
    DataLoader worker processes; the forward pass runs on this thread and the writes on a writer
    thread as group commits (:class:`GroupCommits`). ``after_batch(k)`` is called on this thread,
    once per batch and in order, after batch ``k``'s commit is durable. A failed commit's error is
    raised here once the batches committed before it are reported. Returns ``(rows written, rows
    failed, [(image_id, reason), ...])``.
    """
    reader = reader.with_plan(pixel_plan(reader.transform))
    position = {image_id: i for i, image_id in enumerate(reader.image_ids)}
    positions = [[position[int(i)] for i in batch] for batch in batches]
    gate = ForwardGate.for_device(embedder.device)
    reads = (_LoaderReads(reader, positions, num_workers) if num_workers > 0
             else _ThreadedReads(reader, positions, decode_threads or available_cores(), gate))
    pin = embedder.device.type == "cuda"
    failures: list[tuple[int, str]] = []
    counts = {"written": 0, "failed": 0}
    with tqdm(total=sum(len(b) for b in batches), desc=description, unit="img", disable=not progress,
              dynamic_ncols=True) as bar, reads, GroupCommits(writer, failures) as commits:
        for index, items in enumerate(reads):
            ids, ok, batch, reasons = collate_items(items)
            if batch is not None and pin:
                batch = batch.pin_memory()
            with gate.forward():
                features = embedder(batch) if batch is not None else None
            commits.submit(index, EmbeddedBatch(ids, ok, features, reasons))
            report_durable(commits, counts, bar, after_batch)
        commits.close()
        report_durable(commits, counts, bar, after_batch)
    return counts["written"], counts["failed"], failures


def report_durable(commits: GroupCommits, counts: dict[str, int], bar: tqdm,
                   after_batch: Callable[[int], None] | None) -> None:
    """Account for the batches ``commits`` made durable since the last call, in commit order: add
    their rows to ``counts`` (``"written"``, ``"failed"``), advance ``bar``, call ``after_batch(k)``
    for each; then raise a failed commit's error (the batches before it reported first)."""
    for index, status in commits.durable():
        counts["written"] += int((status == DONE_WRITTEN).sum())
        counts["failed"] += int((status == DONE_FAILED).sum())
        bar.update(len(status))
        if after_batch is not None:
            after_batch(index)
    commits.raise_failure()
