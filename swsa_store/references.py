"""Abnormal references: a seeded share of each task's synthetic anomalies held apart from validation.

The normal–abnormal guided detector (NAGL's idea, :class:`swsa_engine.core.detectors.NaglDetector`)
compares a query with the task's normal support *and* with some abnormal references. Those come
from the task's own synthetic anomalies of one chosen source: an image is a reference when a
seeded hash of ``(seed, task_id, image_id)`` falls below ``share``. The choice is made per image,
so adding or removing other synthetic images can never change which images are references, and
the same store, source, share and seed always give the same split.

The split is stored as the table ``/abnormal_references`` (columns ``task_id, image_id, source``;
attributes ``source, share, seed, rule``). :func:`swsa_engine.run.task_groups.build_task_groups` removes
those images from every task's synthetic validation set, for every candidate, and checks that
references and validation images never overlap.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from swsa_store.hashing import hash_uniform
from swsa_store.locks import writes_store
from swsa_store.schema import read_table
from swsa_store.store import edit_store

REFERENCES_TABLE = "abnormal_references"
REFERENCE_COLUMNS = ("task_id", "image_id", "source")
_RULE = "image is a reference when hash_uniform(seed, task_id, image_id) < share (splitmix64 chain)"


def choose_references(task_ids: np.ndarray, image_ids: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """``(N,)`` bool: which of the synthetic images ``(task_ids[i], image_ids[i])`` are references."""
    return hash_uniform(seed, task_ids, image_ids) < share


def make_references(images: pd.DataFrame, source: str, share: float, seed: int = 0,
                    store_path: str | os.PathLike = "STORE") -> tuple[pd.DataFrame, dict]:
    """The split :func:`split_references` writes, computed from an images table (``image_id,
    kind, status, task_id``) without writing it: ``(table (task_id, image_id, source), attrs)``.
    Only images whose status is ``ok`` are considered; ``store_path`` names the store in errors."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) < 1.0:
        raise ValueError(f"share must be a number in (0, 1), got {share!r}; e.g. --share 0.25 keeps 75% of each "
                         "task's anomalies for validation")
    synthetic = images[images["kind"] != "real"]
    held = sorted(synthetic["kind"].unique())
    if source not in held:
        raise ValueError(f"store {store_path} holds no synthetic anomalies of source {source!r} (held: "
                         f"{', '.join(held) or 'none'}); run `swsa synth --store {store_path} --method ...` first "
                         "or pick a held source")
    chosen = synthetic[(synthetic["kind"] == source) & (synthetic["status"] == "ok") & (synthetic["task_id"] >= 0)]
    task_ids = chosen["task_id"].to_numpy(dtype=np.int64)
    image_ids = chosen["image_id"].to_numpy(dtype=np.int64)
    keep = choose_references(task_ids, image_ids, float(share), int(seed))
    table = pd.DataFrame({"task_id": task_ids[keep], "image_id": image_ids[keep],
                          "source": np.full(int(keep.sum()), source, dtype=object)})
    return table, {"source": source, "share": float(share), "seed": int(seed), "rule": _RULE}


@writes_store("swsa split-refs")
def split_references(store_path: str | os.PathLike, source: str, share: float, seed: int = 0, *,
                     wait: float | None = 0.0) -> pd.DataFrame:
    """Hold apart a ``share`` of every task's synthetic anomalies of ``source`` as abnormal references.

    The whole call holds the store's writer lock (:func:`swsa_store.locks.writes_store`): another
    writer makes it fail at once, or wait ``wait`` seconds (None: as long as it takes).

    Writes (replacing any earlier split) the table ``/abnormal_references`` with one row per
    reference (``task_id, image_id, source``) and the attributes ``source, share, seed, rule``
    (:func:`make_references`); returns the table. Only images whose status is ``ok`` are considered.
    """
    with edit_store(store_path) as store:
        images = store.images(columns=["image_id", "kind", "status", "task_id"])
        table, attrs = make_references(images, source, share, seed, store_path)
        store.replace_table(REFERENCES_TABLE, table, attrs)
    return table


def read_references(store) -> pd.DataFrame | None:
    """The stored split of an open store (``task_id, image_id, source``), or None when there is none."""
    if REFERENCES_TABLE not in store.file:
        return None
    return read_table(store.file[REFERENCES_TABLE])
