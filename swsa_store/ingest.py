"""Ingest: embed every catalogued image with one backbone into the store, resumably.

The pieces are passed into a runner (as in clip-retrieval): a *reader* (a torch Dataset that
decodes and preprocesses images, failures returned as values, not raised), an *embedder* (the
backbone's forward pass, autocast on GPU) and a *writer* (:class:`~swsa_store.row_writer.EmbeddingRowWriter`);
they and the local runner, which overlaps decoding, the forward pass and the writes, are in
:mod:`swsa_store.ingest_pipeline` (re-exported here).

Resume rule: the images to embed are cut into fixed batches (``batch_size`` consecutive ids of
the sorted list of usable images). A batch's rows are made durable before they are flagged
done, so after a SIGKILL a rerun recomputes exactly the batches that are not fully done, with
the same composition as an uninterrupted run — and therefore the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from swsa_store.ingest_pipeline import Embedder, ImageReader, collate_items, run_ingest
from swsa_store.models.backbones import create_backbone, patch_token_model
from swsa_store.locks import store_lock
from swsa_store.row_writer import EmbeddingRowWriter, backfill_checksums
from swsa_store.schema import DONE_WRITTEN, StoreError
from swsa_store.store import edit_store, open_store

__all__ = [
    "Embedder", "ImageReader", "IngestReport", "collate_items", "embed_store", "embedding_name", "fixed_batches",
    "run_ingest",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestReport:
    backbone: str
    total: int
    already_done: int
    written: int
    failed: int
    failures: tuple[tuple[int, str], ...]


def fixed_batches(usable_ids: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cut the sorted usable ids into consecutive batches — identical on every run."""
    ids = np.sort(np.asarray(usable_ids, dtype=np.int64))
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def embed_store(
    store_path: str | os.PathLike,
    backbone: str,
    *,
    weights: str | None = None,
    weights_dir: str | None = None,
    allow_download: bool = False,
    image_size: int | None = None,
    name: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    max_batches: int | None = None,
    runner: Callable | None = None,
    patch_tokens: bool = False,
    preprocess: dict | str | None = None,
) -> IngestReport:
    """Embed every usable catalogued image with ``backbone`` into ``/embeddings/<name>``.

    ``name`` defaults to the backbone name. Rows already done are skipped; a store that holds
    ``name`` made with other weights or preprocessing is an error (embed under another name).
    ``max_batches`` stops after that many batches (to test interruption). ``runner`` replaces
    :func:`run_ingest` (same arguments and result), e.g. the Ray runner of :mod:`.distributed`.
    ``patch_tokens`` also stores the backbone's patch tokens ``(N, P, D')`` float16 in
    ``/patches/<name>`` (see :func:`~swsa_store.models.backbones.patch_token_model`), from the same
    forward pass and with the same resume rule; pooled rows are unchanged by it.
    ``preprocess``: overrides of the backbone's preprocessing (:mod:`swsa_store.models.preprocessing`), stored
    with the embeddings like the resolved values they give.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    name = name or embedding_name(backbone)
    if "/" in name:
        raise ValueError(f"embedding name {name!r} must not contain '/'; pass another --name")
    with store_lock(store_path):  # before any work: a second writer is refused at once
        return _embed_locked(store_path, backbone, name, weights=weights, weights_dir=weights_dir,
                             allow_download=allow_download, image_size=image_size, batch_size=batch_size,
                             num_workers=num_workers, device=device, dtype=dtype, progress=progress,
                             max_batches=max_batches, runner=runner, patch_tokens=patch_tokens, preprocess=preprocess)


def _embed_locked(store_path, backbone: str, name: str, *, weights, weights_dir, allow_download, image_size,
                  batch_size, num_workers, device, dtype, progress, max_batches, runner, patch_tokens,
                  preprocess) -> IngestReport:
    """:func:`embed_store`'s work, under the store's writer lock."""
    with open_store(store_path) as store:
        images = store.images()
        existing_attrs = store.embedding_attrs(name) if name in store.backbones() else None
        existing_patch_attrs = store.patch_attrs(name) if name in store.patch_sets() else None
    if len(images) == 0:
        raise StoreError(f"store {store_path} has no images; run `swsa catalog` first")
    loaded = create_backbone(backbone, weights=weights, weights_dir=weights_dir, allow_download=allow_download,
                             image_size=image_size, device=device, preprocess=preprocess)
    model = _prepare_matrices(store_path, name, loaded, batch_size=batch_size, dtype=dtype, patch_tokens=patch_tokens,
                              existing_attrs=existing_attrs, existing_patch_attrs=existing_patch_attrs)
    usable = images.loc[images["status"] == "ok", "image_id"].to_numpy()
    with EmbeddingRowWriter(store_path, name, patches=patch_tokens) as writer:
        batches, already = _batches_to_embed(writer, usable, batch_size, patch_tokens=patch_tokens,
                                             max_batches=max_batches)
        writer.rows_before, writer.rows_total = already, len(usable)
        todo_ids = np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)
        paths = images["path"].to_numpy()[todo_ids]
        reader = ImageReader(todo_ids, paths, loaded.transform, store_path)
        embedder = Embedder(model, device=device)
        if batches:
            log.info("embedding %d images with %s (%d already done)", len(todo_ids), name, already)
        written, failed, failures = (runner or run_ingest)(
            reader, embedder, writer, batches, num_workers=num_workers, progress=progress, description=f"embed {name}"
        )
    if failures:
        _record_failures(store_path, name, failures)
    return IngestReport(name, len(usable), already, written, failed, tuple(failures))


def _prepare_matrices(store_path: str | os.PathLike, name: str, loaded, *, batch_size: int, dtype: str,
                      patch_tokens: bool, existing_attrs: dict | None, existing_patch_attrs: dict | None) -> torch.nn.Module:
    """Create the store's matrices ``name`` (and patches), or check that those held fit ``loaded``.

    Returns the module to run: ``loaded.model``, or with ``patch_tokens`` its
    :class:`~swsa_store.models.backbones.PatchTokenModel`.
    """
    attrs = _embedding_attrs(loaded, batch_size=batch_size, dtype=dtype)
    model = loaded.model
    if patch_tokens:
        model, patch_attrs = patch_token_model(loaded)
        patch_attrs["embedding_config"] = attrs["config"]
        if existing_patch_attrs is not None:
            _check_patch_compatible(name, existing_patch_attrs, patch_attrs)
    if existing_attrs is not None:
        _check_compatible(name, existing_attrs, attrs)
    new_patches = patch_tokens and existing_patch_attrs is None
    if existing_attrs is None or new_patches or _lacks_checksums(store_path, name):
        with edit_store(store_path) as store:
            if existing_attrs is None:
                store.create_embeddings(name, loaded.feature_dim, attrs, dtype=dtype)
            if new_patches:
                store.create_patches(name, patch_attrs["n_patches"], patch_attrs["patch_dim"], patch_attrs)
            backfill_checksums(store.file["embeddings"][name], "features")  # a matrix from before checksums
            if name in store.patch_sets():
                backfill_checksums(store.file["patches"][name], "tokens")
    return model


def _lacks_checksums(store_path, name: str) -> bool:
    """Whether the matrix (or patch tokens) ``name`` was written before rows carried checksums."""
    with open_store(store_path) as store:
        groups = [store.file["embeddings"][name]] if name in store.backbones() else []
        groups += [store.file["patches"][name]] if name in store.patch_sets() else []
        return any("checksum" not in g for g in groups)


def _batches_to_embed(writer: EmbeddingRowWriter, usable: np.ndarray, batch_size: int, *, patch_tokens: bool,
                      max_batches: int | None) -> tuple[list[np.ndarray], int]:
    """The fixed batches not fully done (failed rows are retried), and how many usable rows are done.

    Only whole fixed batches are redone, so a resumed run embeds the same compositions as an
    uninterrupted one (the module's resume rule).
    """
    writer.reset_failed()
    done = writer.done[...]
    if patch_tokens:  # a row is done when its pooled features and its patch tokens are
        done = np.where(writer.patch_done[...] == DONE_WRITTEN, done, 0)
    batches = [b for b in fixed_batches(usable, batch_size) if (done[b] != DONE_WRITTEN).any()]
    already = int((done[usable] == DONE_WRITTEN).sum())
    if max_batches is not None:
        batches = batches[:max_batches]
    return batches, already


def _record_failures(store_path: str | os.PathLike, name: str, failures: list[tuple[int, str]]) -> None:
    """Append ``(image_id, reason)`` failures to the store's skips, as stage ``embed`` of ``name``."""
    with edit_store(store_path) as store:
        store.append_skips(pd.DataFrame(
            [{"stage": "embed", "image_id": i, "task_id": -1, "backbone": name, "reason": r} for i, r in failures]
        ))


def embedding_name(backbone: str) -> str:
    """The store name of a backbone's embeddings: HDF5 paths cannot hold '/' (``timm/x`` → ``timm-x``)."""
    return backbone.replace("/", "-")


def _embedding_attrs(loaded, *, batch_size: int, dtype: str) -> dict:
    import timm

    attrs = dict(loaded.attrs())
    attrs.update({
        "dtype": dtype,
        "batch_size": batch_size,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    })
    attrs.setdefault("torch_version", torch.__version__)
    attrs.setdefault("timm_version", timm.__version__)
    flat = {}
    for key, value in attrs.items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value)
        elif isinstance(value, str) or value is None:  # str subclasses (TorchVersion) confuse h5py
            value = "" if value is None else str(value)
        flat[key] = value
    flat["config"] = json.dumps(attrs, default=str, sort_keys=True)
    return flat


# settings that change the numbers: a matrix is only resumed with the same ones
_IDENTITY_KEYS = ("weights_kind", "weights_sha256", "preprocess", "feature_dim", "timm_name", "dtype")


_PATCH_IDENTITY_KEYS = ("token_source", "layer", "grid", "n_patches", "patch_dim", "dtype")


def _check_patch_compatible(name: str, existing: dict, new: dict) -> None:
    for key in _PATCH_IDENTITY_KEYS:
        if key in existing and existing[key] != new[key]:
            raise StoreError(
                f"the store already holds patch tokens {name!r} made with {key}={existing[key]!r}, "
                f"not {new[key]!r}; embed under another name (--name) to keep both"
            )


def _check_compatible(name: str, existing: dict, new: dict) -> None:
    old_cfg = existing.get("config", {})
    new_cfg = json.loads(new["config"])
    differing = [k for k in _IDENTITY_KEYS if k in old_cfg and k in new_cfg and old_cfg[k] != new_cfg[k]]
    if differing:
        key = differing[0]
        raise StoreError(
            f"the store already holds embeddings {name!r} made with {key}={old_cfg[key]!r}, "
            f"not {new_cfg[key]!r}; embed under another name (--name) to keep both"
        )
