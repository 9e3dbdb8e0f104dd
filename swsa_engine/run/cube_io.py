"""Cube I/O: an :class:`~swsa_engine.core.cube.AurocCube` written to and read from a store's results.

A cube is saved as the result ``name`` of the store (``<store>.results/<name>.h5``, written
atomically by :func:`swsa_store.schema.save_result`): its arrays as datasets, its tables and
config as JSON attributes (:meth:`AurocCube.to_arrays`). Reading needs no scoring pass, so
reports and applications load cubes from here. The sweep's per-image scores
(:class:`~swsa_engine.core.score_cube.ScoreCube`) are the result :data:`SCORES_RESULT` beside the
cube (:func:`save_scores`, :func:`load_scores`); :func:`load_cube` attaches them as ``cube.scores``
when they belong to the cube (same tasks and candidates, and the cube says it kept them).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from swsa_store import StoreError, open_store
from swsa_store.schema import save_result

from swsa_engine.core.cube import CUBE_RESULT, AurocCube
from swsa_engine.core.em_mv import EM_MV_ARRAYS, EM_MV_KEY, join_em_mv, split_em_mv
from swsa_engine.core.score_cube import SCORE_ARRAYS, ScoreCube

__all__ = ["save_cube", "load_cube", "stored_results", "save_scores", "load_scores", "SCORES_RESULT"]

log = logging.getLogger(__name__)

#: the result name of the kNN / detector sweep's score cube (beside :data:`~swsa_engine.core.cube.CUBE_RESULT`)
SCORES_RESULT = "scores"

_STRING_ARRAYS = ("dataset", "normal_class", "class_names")
_NUMBER_ARRAYS = ("task_id", "real", "synthetic", "per_class")


def save_cube(cube: AurocCube, store_path: str | os.PathLike, name: str = CUBE_RESULT) -> None:
    """Write ``cube`` as the result ``name`` of the store at ``store_path`` (replacing an older one)."""
    arrays, attrs = cube.to_arrays()
    attrs["config"], criteria = split_em_mv(attrs["config"])  # EM/MV (T, C) arrays: datasets, not attributes
    save_result(store_path, name, {**arrays, **criteria}, attrs)


def load_cube(store_path: str | os.PathLike, name: str = CUBE_RESULT) -> AurocCube:
    """The cube saved as the result ``name`` of the store at ``store_path`` (one-line StoreError if absent)."""
    with open_store(store_path) as store:
        group = store.result_group(name)
        attrs = {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v for k, v in group.attrs.items()}
        arrays = {key: group[key][...] for key in _NUMBER_ARRAYS}
        if "self_validated" in group:  # cubes from before self-validation was marked have none: all False
            arrays["self_validated"] = group["self_validated"][...]
        arrays.update({key: group[key].asstr()[...].astype(object) for key in _STRING_ARRAYS})
        criteria = {f"{EM_MV_KEY}_{n}": group[f"{EM_MV_KEY}_{n}"][...] for n in EM_MV_ARRAYS if f"{EM_MV_KEY}_{n}" in group}
    attrs["config"] = join_em_mv(attrs["config"], criteria)  # cubes without EM/MV: unchanged
    cube = AurocCube.from_arrays(arrays, attrs)
    if name == CUBE_RESULT and cube.config.get("scores_result") == SCORES_RESULT \
            and SCORES_RESULT in stored_results(store_path):
        scores = load_scores(store_path)
        if list(scores.candidates) == cube.candidate_names and np.array_equal(scores.task_ids, cube.tasks["task_id"]):
            cube.scores = scores
        else:
            log.warning("the store's %r result does not match its cube (tasks or candidates differ); "
                        "re-run `swsa score` to keep per-image scores", SCORES_RESULT)
    return cube


def save_scores(scores: ScoreCube, store_path: str | os.PathLike, name: str = SCORES_RESULT) -> None:
    """Write the score cube ``scores`` as the result ``name`` of the store at ``store_path``."""
    arrays, attrs = scores.to_arrays()
    save_result(store_path, name, arrays, attrs)


def load_scores(store_path: str | os.PathLike, name: str = SCORES_RESULT) -> ScoreCube:
    """The score cube saved as the result ``name``; a store without it is a one-line StoreError."""
    if name not in stored_results(store_path):
        raise StoreError(f"store {store_path} holds no per-image scores ({name!r}); re-run `swsa score --store "
                         f"{store_path}` (scores are kept by default) to compute them")
    with open_store(store_path) as store:
        group = store.result_group(name)
        attrs = {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v for k, v in group.attrs.items()}
        arrays = {key: group[key].asstr()[...].astype(object) if key == "group_names" else group[key][...]
                  for key in SCORE_ARRAYS}
    return ScoreCube.from_arrays(arrays, attrs)


def stored_results(store_path: str | os.PathLike) -> list[str]:
    """The names of the results (cubes and others) the store at ``store_path`` holds, sorted."""
    with open_store(store_path) as store:
        return store.results()
