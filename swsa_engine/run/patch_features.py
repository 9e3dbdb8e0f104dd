"""Patch tokens of a store, as the patch-level residual detector scores them.

``swsa embed --patch-tokens`` writes ``/patches/<name>`` (``(N, P, D')`` float16);
:func:`load_patch_features` reads it for :class:`swsa_engine.core.detectors.PatchDetector`.
"""

from __future__ import annotations

import numpy as np

from swsa_store.schema import DONE_WRITTEN
from swsa_store.store import open_store

__all__ = ["load_patch_features"]


def load_patch_features(store_path, name: str, image_ids: np.ndarray | None = None, *, with_done: bool = False):
    """``(N, P, D')`` float16 patch tokens of embedding ``name`` (rows indexed by image id; rows
    not done are NaN), or ``(len(image_ids), P, D')`` for ``image_ids``. ``with_done=True``
    returns ``(tokens, done)`` with ``done`` ``(N,)`` (or ``(len(image_ids),)``) bool: the rows
    whose tokens are written — mask the others out of ``score_tasks``.

    Raises :class:`~swsa_store.store.StoreError` (one line, naming the ``swsa embed --patch-tokens``
    command) when ``name`` was embedded without patch tokens.
    """
    with open_store(store_path) as store:
        tokens = store.patches(name, image_ids)
        done = store.patch_done_mask(name)
    if image_ids is not None:
        done = done[np.asarray(image_ids, dtype=np.int64)]
    rows_done = done == DONE_WRITTEN
    if not rows_done.all():
        tokens[~rows_done] = np.nan
    return (tokens, rows_done) if with_done else tokens
