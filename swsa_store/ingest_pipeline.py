"""The pieces of ingest and the local runner that overlaps them (the resume rule and
:func:`~swsa_store.ingest.embed_store` are in :mod:`swsa_store.ingest`).

The pieces, as in clip-retrieval: a *reader* (:class:`ImageReader`, a torch Dataset that decodes and
preprocesses images, failures returned as values, not raised), an *embedder* (:class:`Embedder`, the
backbone's forward pass, autocast on GPU) and a *writer* (:func:`write_embedded_batch` on an
:class:`~swsa_store.row_writer.EmbeddingRowWriter`).

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
* durable writes (checksums, HDF5, ``fsync``) run on one writer thread, in batch order, so a batch's
  rows are still durable before its flags while the next batch is embedded.
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
from swsa_store.row_writer import EmbeddingRowWriter
from swsa_store.samples import read_image
from swsa_store.schema import DONE_FAILED, DONE_WRITTEN, StoreError

__all__ = [
    "BATCHES_AHEAD",
    "Embedder",
    "ForwardGate",
    "ImageReader",
    "PixelPlan",
    "available_cores",
    "collate_items",
    "pixel_plan",
    "run_ingest",
    "write_embedded_batch",
]

#: Batches read ahead of the forward pass (each ``batch_size`` float32 model inputs; on the CPU the
#: decoders mostly wait for the forward pass, so this matters for GPU runs).
BATCHES_AHEAD = 2
#: Written batches that may wait for the writer thread before the forward pass waits for it.
WRITES_AHEAD = 2


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


def write_embedded_batch(
    writer: EmbeddingRowWriter,
    ids: np.ndarray,
    ok: np.ndarray,
    features: np.ndarray | None,
    reasons: list[str],
    failures: list[tuple[int, str]],
) -> np.ndarray:
    """Write one embedded batch durably — the one write step of the local and the Ray path.

    ``ids`` ``(B,)`` sorted image ids, ``ok`` ``(B,)`` bool (decoded), ``features``
    ``(ok.sum(), D)`` float32 for the decoded images (None when none decoded), ``reasons``
    ``(B,)`` failure reasons. Undecodable images and non-finite rows are written as failed
    (NaN rows) and appended to ``failures`` as ``(image_id, reason)``. Returns the ``(B,)``
    uint8 done status written. With a patch writer (``writer.patches``), ``features`` is the
    pair ``(pooled (ok.sum(), D), tokens (ok.sum(), P, D'))`` and both are written (float16).
    """
    tokens = None
    if isinstance(features, tuple):  # (pooled, patch tokens) from a PatchTokenModel
        features, tokens = features
    dim = writer.features.shape[1]
    rows = np.full((len(ids), dim), np.nan, dtype=np.float32)
    status = np.where(ok, DONE_WRITTEN, DONE_FAILED).astype(np.uint8)
    reasons = list(reasons)
    if features is not None:
        if features.shape[1] != dim:
            raise StoreError(
                f"backbone produced {features.shape[1]}-d features but the store's matrix "
                f"{writer.name!r} is {dim}-d; embed under another name"
            )
        rows[ok] = features
        finite = np.isfinite(rows).all(axis=1)
        bad = ok & ~finite
        for i in np.flatnonzero(bad):
            reasons[i] = "non-finite embedding (NaN or inf in the backbone's output)"
        status[bad] = DONE_FAILED
    patch_rows = None
    if getattr(writer, "patches", None) is not None:
        patch_rows = np.full((len(ids),) + writer.patches.shape[1:], np.nan, dtype=np.float16)
        if features is not None:
            if tokens is None or tokens.shape[1:] != writer.patches.shape[1:]:
                got = "no patch tokens" if tokens is None else f"patch tokens of shape {tokens.shape[1:]}"
                raise StoreError(f"backbone produced {got} but the store's patches {writer.name!r} are "
                                 f"{writer.patches.shape[1:]}; embed under another name")
            with np.errstate(over="ignore"):
                patch_rows[ok] = tokens.astype(np.float16)
            bad = (status == DONE_WRITTEN) & ~np.isfinite(patch_rows).all(axis=(1, 2))
            for i in np.flatnonzero(bad):
                reasons[i] = "non-finite patch tokens (NaN, inf, or beyond float16's range 65504)"
            status[bad] = DONE_FAILED
    if patch_rows is None:
        writer.write(ids, rows, status)
    else:
        writer.write(ids, rows, status, patch_rows)
    for i in np.flatnonzero(status == DONE_FAILED):
        failures.append((int(ids[i]), reasons[i]))
    return status


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
    thread (see the module). ``after_batch(k)`` is called on this
    thread once batch ``k`` is durable. Returns ``(rows written, rows failed, [(image_id, reason), ...])``.
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
              dynamic_ncols=True) as bar, reads, ThreadPoolExecutor(1, thread_name_prefix="swsa-write") as write_pool:
        writes: deque[tuple[int, int, Future]] = deque()

        def finish() -> None:
            index, rows, future = writes.popleft()
            status = future.result()
            counts["written"] += int((status == DONE_WRITTEN).sum())
            counts["failed"] += int((status == DONE_FAILED).sum())
            bar.update(rows)
            if after_batch is not None:
                after_batch(index)

        for index, items in enumerate(reads):
            ids, ok, batch, reasons = collate_items(items)
            if batch is not None and pin:
                batch = batch.pin_memory()
            with gate.forward():
                features = embedder(batch) if batch is not None else None
            writes.append((index, len(ids), write_pool.submit(write_embedded_batch, writer, ids, ok, features,
                                                              reasons, failures)))
            while writes and (writes[0][2].done() or len(writes) > WRITES_AHEAD):
                finish()
        while writes:
            finish()
    return counts["written"], counts["failed"], failures
