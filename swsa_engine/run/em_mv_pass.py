"""The EM/MV pass: Goix's Excess-Mass and Mass-Volume criteria of every candidate of a sweep.

Goix, "How to Evaluate the Quality of Unsupervised Anomaly Detection Algorithms?", ICML 2016
Workshop on Anomaly Detection (arXiv:1607.01152). For each task and each single candidate
(feature source × detector), his protocol for high-dimensional data (:mod:`swsa_engine.core.em_mv`):
``m`` = 50 random subsets of ``d'`` = 5 features; on each subset the candidate's detector is fitted
on the task's bank (its support images) restricted to the subset and scores the task's unlabelled
real test images and ``U`` points uniform in the test images' bounding box; EM and MV of those
scores (volumes in standardised units), averaged over the subsets. Label-free: the pass reads the
test images' features, never their labels (NAGL's abnormal references, synthetic anomalies that
are part of that detector, are its only other input).

The subsets and uniform samples are drawn per (task, feature source) from
``numpy.random.default_rng([seed, task_id, crc32(feature source)])`` and shared by every detector
on that feature source (common random numbers, as Goix's benchmark scores all algorithms on the
same draws): the criteria do not depend on the order of tasks or candidates.

Not scored, each with its reason in the record's ``skipped``: ensembles (their members live in
different feature spaces: no single box), imported score sets (no detector to refit), detectors
of patch tokens or with CLIP's text prior, PCA keeping at least ``d'`` axes (exact on a
``d'``-feature subset), PyOD's transductive models (ECOD, COPOD: one query per call, ``m × U``
calls per task), and a task whose bank is too small for the detector.

Cost grows with tasks × candidates × ``m`` × (test images + ``U``). Measured on a two-core machine
shared with other jobs (CPU time about equal to wall time): the ELPV demo's cube (2 tasks, 150 test
images and 60 support images per task, 50 single candidates of which 40 are scored) takes 20.9 s
with the defaults (``m`` = 50, ``U`` = 2,000; 87 s with ``U`` = 10,000), i.e. about 0.25 s per task
and candidate, most of it in the kNN and Mahalanobis scoring of the uniform samples; the digits
demo's cube (10 tasks, 899 test images per task, 10 candidates scored) takes 64 s. Hence opt-in:
``swsa score --em-mv`` (``run_sweep(em_mv=True)``); the ELPV demo turns it on, the quick digits demo
does not. ``m`` and ``U`` were chosen for time alone, never by looking at real labels.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zlib

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from swsa_store import open_store
from swsa_store.references import read_references
from swsa_store.schema import DONE_WRITTEN

from swsa_engine.core.cube import AurocCube
from swsa_engine.core.detectors import parse_detector
from swsa_engine.core.em_mv import (EM_MV_KEY, SUBSET_DRAWS, SUBSET_FEATURES, UNIFORM_SAMPLES, FeatureBoxes,
                                    draw_feature_boxes, em_mv_record, subsampled_em_mv, uniform_in_boxes,
                                    unsupported_reason)
from swsa_engine.core.ensemble_pass import ENSEMBLE_FAMILY
from swsa_engine.run.task_groups import TaskGroup, build_task_groups

__all__ = ["run_em_mv_pass", "EmMvSettings"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmMvSettings:
    """Goix's protocol: ``draws`` feature subsets (m) of ``subset_features`` features (d') each,
    ``uniform_samples`` (U) points per subset, drawn from ``seed``."""

    draws: int = SUBSET_DRAWS
    subset_features: int = SUBSET_FEATURES
    uniform_samples: int = UNIFORM_SAMPLES
    seed: int = 0

    def __post_init__(self):
        for name in ("draws", "subset_features", "uniform_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"EM/MV {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"EM/MV seed must be an integer >= 0, got {self.seed!r}")

    def rng(self, task_id: int, feature: str) -> np.random.Generator:
        """The generator of one (task, feature source): its subsets, then its uniform samples."""
        return np.random.default_rng([int(self.seed), int(task_id), zlib.crc32(feature.encode("utf-8"))])


@dataclasses.dataclass
class _Criteria:
    """The (T, C) arrays being filled, the cube's task rows and the skips."""

    em: np.ndarray
    mv: np.ndarray
    em_undefined: np.ndarray
    row_of_task: dict
    skipped: list = dataclasses.field(default_factory=list)  # [candidate, reason]


def _candidate_plan(candidates: pd.DataFrame, settings: EmMvSettings) -> tuple[dict, list]:
    """``({feature source: [(column, candidate name, detector)]}, [[candidate, reason]])``: the
    candidates EM/MV applies to, grouped by feature source, and why the others are left out."""
    missing = [c for c in ("name", "feature", "detector") if c not in candidates]
    if missing:
        raise ValueError(f"the cube's candidates have no {', '.join(missing)} column: it is not a detector sweep's "
                         "cube (or it is too old); re-run `swsa score` before computing EM/MV")
    plan, skipped = {}, []
    family = candidates["family"].astype(str) if "family" in candidates else pd.Series([""] * len(candidates))
    for column, (name, feature, label) in enumerate(zip(candidates["name"], candidates["feature"], candidates["detector"])):
        if family.iloc[column] == ENSEMBLE_FAMILY:
            skipped.append([name, "an ensemble of candidates in different feature spaces: no single box to sample"])
            continue
        if label == "imported":
            skipped.append([name, "imported scores: no detector to refit on feature subsets"])
            continue
        detector = parse_detector(str(label))
        reason = unsupported_reason(detector, settings.draws, settings.subset_features, settings.uniform_samples)
        if reason:
            skipped.append([name, reason])
            continue
        plan.setdefault(str(feature), []).append((column, str(name), detector))
    return plan, skipped


def _read_groups(store_path, task_ids: np.ndarray) -> tuple[list[TaskGroup], np.ndarray]:
    """The task groups of the cube's tasks (banks, test images, abnormal references) and the
    catalog's usable rows (N,) bool."""
    with open_store(store_path) as store:
        images = store.images(columns=["image_id", "kind", "status", "task_id", "parent_ids"])
        tasks, members, references = store.tasks(), store.task_members(), read_references(store)
    groups = build_task_groups(images, tasks[tasks["task_id"].isin(task_ids)], members, references)
    return groups, (images["status"] == "ok").to_numpy()


def _read_features(store_path, feature: str, usable_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings ``feature`` (N, D) float32 and their usable rows (N,) bool (done, finite)."""
    with open_store(store_path) as store:
        done = store.done_mask(feature)
        features = store.embeddings(feature)
    return features, usable_images & (done == DONE_WRITTEN) & np.isfinite(features).all(axis=1)


def _subset_rows(features: np.ndarray, ids: np.ndarray, boxes: FeatureBoxes) -> np.ndarray:
    """(m, len(ids), d) float64: rows ``ids`` of ``features`` restricted to each subset's columns."""
    return features[ids][:, boxes.columns].astype(np.float64).transpose(1, 0, 2)


def _prepared(detector, rows: np.ndarray) -> np.ndarray:
    """``rows`` (m, N, d) as ``detector`` compares them (its ``prepare``, e.g. unit rows for cosine)."""
    draws, count, width = rows.shape
    return detector.prepare(rows.reshape(-1, width)).reshape(draws, count, width)


def _task_ids_of(group: TaskGroup, t: int, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Task ``t``'s usable test images, bank (support) and abnormal references, as image ids."""
    test = group.real_ids[group.real_label[t] >= 0]
    bank, abnormal = group.support[t], group.abnormal[t]
    return tuple(ids[(ids >= 0) & usable[np.maximum(ids, 0)]] for ids in (test, bank, abnormal))


def _score_task(features, usable, group: TaskGroup, t: int, feature: str, members: list, settings: EmMvSettings,
                out: _Criteria) -> None:
    """Fill task ``group.task_ids[t]``'s criteria of the candidates ``members`` on ``feature``."""
    task_id = int(group.task_ids[t])
    test, bank, abnormal = _task_ids_of(group, t, usable)
    if len(test) < 2:
        out.skipped += [[name, f"task {task_id}: fewer than two usable test images"] for _, name, _ in members]
        return
    rng = settings.rng(task_id, feature)
    boxes = draw_feature_boxes(features[test].astype(np.float64), settings.draws, settings.subset_features, rng)
    points = np.concatenate([_subset_rows(features, test, boxes),
                             uniform_in_boxes(boxes, settings.uniform_samples, rng)], axis=1)
    bank_rows, abnormal_rows = _subset_rows(features, bank, boxes), _subset_rows(features, abnormal, boxes)
    row = out.row_of_task[task_id]
    for column, name, detector in members:
        if len(bank) < detector.min_bank(False) or len(abnormal) < detector.min_abnormal:
            out.skipped.append([name, f"task {task_id}: {len(bank)} bank rows and {len(abnormal)} abnormal references "
                                      f"are too few for {detector.label}; {detector.bank_hint}"])
            continue
        extra = {}
        if detector.needs_abnormal:
            extra = {"abnormal": _prepared(detector, abnormal_rows), "abnormal_mask": np.ones(abnormal_rows.shape[:2], bool)}
        scores = detector.score_tasks(_prepared(detector, points), np.ones(points.shape[:2], bool),
                                      _prepared(detector, bank_rows), np.ones(bank_rows.shape[:2], bool), None,
                                      task_ids=np.full(settings.draws, task_id), **extra)
        if not np.isfinite(scores).all():
            out.skipped.append([name, f"task {task_id}: {detector.label} gave non-finite scores on a feature subset"])
            continue
        em, mv, undefined = subsampled_em_mv(scores[:, None, : len(test)], scores[:, None, len(test):], boxes.volume)
        out.em[row, column], out.mv[row, column], out.em_undefined[row, column] = em[0], mv[0], undefined[0]


def run_em_mv_pass(store_path: str | os.PathLike, cube: AurocCube, *, settings: EmMvSettings | None = None,
                   progress: bool = True) -> AurocCube:
    """``cube`` with Goix's EM and MV criteria of its candidates in ``config["em_mv"]``.

    ``store_path``: the store the cube was scored from (its embeddings, tasks and references).
    Returns a copy of ``cube`` (same arrays and scores) whose config holds the record of
    :func:`swsa_engine.core.em_mv.em_mv_record`: ``em`` and ``mv`` (T, C) (NaN for the
    candidates left out, each with its reason in ``skipped``), ``em_undefined_draws`` (the subsets
    where EM was undefined: no uniform sample in a level set of mass above 0.9), and the settings
    and seconds spent. The strategies ``em`` (higher is better) and ``mv`` (lower is better) of
    :mod:`swsa_engine.core.selection` pick by them; :func:`swsa_engine.run.cube_io.save_cube` stores them.
    """
    settings = settings or EmMvSettings()
    started = time.perf_counter()
    task_ids = cube.tasks["task_id"].to_numpy(dtype=np.int64)
    shape = (len(task_ids), len(cube.candidates))
    plan, skipped = _candidate_plan(cube.candidates, settings)
    row_of_task = {int(task_id): row for row, task_id in enumerate(task_ids)}
    out = _Criteria(np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape), row_of_task, skipped)
    groups, usable_images = _read_groups(store_path, task_ids) if plan else ([], None)
    for feature, members in tqdm(plan.items(), desc="EM/MV", unit="source", disable=not progress):
        features, usable = _read_features(store_path, feature, usable_images)
        for group in groups:
            for t in range(len(group.task_ids)):
                _score_task(features, usable, group, t, feature, members, settings, out)
    seconds = round(time.perf_counter() - started, 3)
    undefined = int(out.em_undefined.sum())
    if undefined:
        log.info("EM was undefined on %d of the subsets scored (no uniform sample in a level set of mass above 0.9); "
                 "each candidate's EM is its mean over the other subsets", undefined)
    record = em_mv_record(task_ids, cube.candidate_names, out.em, out.mv, out.em_undefined, skipped=out.skipped,
                          settings={**dataclasses.asdict(settings), "seconds": seconds,
                                    "reference": "Goix 2016, arXiv:1607.01152: feature sub-sampling, standardised volumes"})
    return dataclasses.replace(cube, config={**cube.config, EM_MV_KEY: record})
