"""The sweep: every task × candidate × validation source AUROC, computed with batched arrays.

For each candidate backbone (streamed one at a time) and each dataset's tasks at once:

* real validation: kNN scores of the shared real validation images against every task's
  bank (:func:`swsa_engine.core.knn.knn_score_gathered`), AUROC one-vs-rest (all out-classes
  together, or the task's ``rest_groups`` only: :func:`~swsa_engine.run.task_groups.rest_mask`) and
  per out-class (:func:`~swsa_engine.core.cube.grouped_auroc`), whose minimum is one-vs-closest;
* synthetic validation per source: held-out normals against the source's anomalies, each scored
  without the bank rows the validation protocol names (:mod:`swsa_engine.core.protocol`; by
  default leak-free: a held-out normal without itself, an anomaly without its parents), AUROC over all anomalies and
  over the ``N`` hardest (the ``N`` with the lowest anomaly score, per candidate).

This module reads the store's inputs and fills the cube; the scoring passes are
:func:`swsa_engine.run.knn_sweep.score_group` (kNN), :func:`swsa_engine.run.detector_sweep.score_group_detector`
(every other detector) and :func:`swsa_engine.run.group_scoring.score_group_imported` (imported
scores). The result is an :class:`~swsa_engine.core.cube.AurocCube`, saved in the store's
``/results/cube`` (:func:`swsa_engine.run.cube_io.save_cube`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from swsa_store import StoreError, open_store
from swsa_store.locks import writes_store
from swsa_store.references import REFERENCES_TABLE, read_references
from swsa_store.schema import DONE_TODO, DONE_WRITTEN

from swsa_engine.core.cube import AurocCube
from swsa_engine.core.detectors import KnnDetector, candidate_name, parse_detector
from swsa_engine.core.ensemble_pass import with_ensembles
from swsa_engine.core.ensembles import check_normalisation
from swsa_engine.core.protocol import DEFAULT_PROTOCOL, check_protocol
from swsa_engine.core.validation import finite_rows
from swsa_engine.run.cube_io import SCORES_RESULT, save_cube, save_scores
from swsa_engine.run.cube_layout import CubeLayout, ScoreLayout
from swsa_engine.run.detector_sweep import ReferenceLog, detector_features, score_group_detector
from swsa_engine.run.em_mv_pass import run_em_mv_pass
from swsa_engine.run.group_scoring import score_group_imported, timed_stage
from swsa_engine.run.knn_sweep import score_group
from swsa_engine.run.task_groups import TaskGroup, build_task_groups
from swsa_engine.run.text_prior import TextPrior

log = logging.getLogger(__name__)

CANDIDATE_COLUMNS = ["name", "feature", "detector", "n_params", "feature_dim", "weights_kind", "family"]


def candidate_info(store, entries: list[tuple[str, str, object]]) -> pd.DataFrame:
    """One row per candidate: ``entries`` are (candidate name, feature source, detector or None)."""
    rows = []
    for name, feature, detector in entries:
        if detector is None:  # imported scores
            rows.append({"name": name, "feature": feature, "detector": "imported", "n_params": 0, "feature_dim": 0,
                         "weights_kind": "imported", "family": "imported"})
            continue
        config = store.embedding_attrs(feature).get("config", {})
        rows.append({
            "name": name, "feature": feature, "detector": detector.label,
            "n_params": int(config.get("n_params", 0) or 0),
            "feature_dim": int(config.get("feature_dim", 0) or 0),
            "weights_kind": str(config.get("weights_kind", "unknown")),
            "family": str(config.get("family", "")),
        })
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


@dataclass
class _SweepInputs:
    """What :func:`run_sweep` reads from the store before it scores."""

    images: pd.DataFrame
    tasks: pd.DataFrame
    members: pd.DataFrame
    held: list[str]  # feature sources with embeddings
    names: list[str]  # the feature sources and imported score sets to score
    detectors: list
    entries: list[tuple[str, str, object]]  # (candidate name, feature source, detector or None)
    info: pd.DataFrame  # candidate_info of entries
    n_images: int
    largest_matrix: int  # elements of the largest embedding matrix to read
    references: pd.DataFrame | None  # the abnormal-reference split
    reference_attrs: dict | None


def _read_sweep_inputs(store_path, backbones, detectors, k: int, references) -> _SweepInputs:
    """The catalog, tasks and candidates of :func:`run_sweep`; one-line errors for missing sources."""
    with open_store(store_path) as store:
        images = store.images(columns=["image_id", "kind", "status", "task_id", "parent_ids"])
        tasks, members = store.tasks(), store.task_members()
        held, imported = store.backbones(), store.score_sets()
        names = list(backbones) if backbones else held + [n for n in imported if n not in held]
        if not names:
            raise StoreError(f"store {store_path} holds no embeddings; run `swsa embed --store {store_path} --backbone NAME`")
        unknown = [n for n in names if n not in held and n not in imported]
        if unknown:
            raise StoreError(f"store {store_path} has no embeddings or imported scores {unknown}; held: {held + imported}")
        detectors = [parse_detector(d) if isinstance(d, str) else d for d in (detectors or [KnnDetector(k, "l2")])]
        entries = [(candidate_name(n, d), n, d) for n in names if n in held for d in detectors]
        entries += [(n, n, None) for n in names if n not in held]
        info = candidate_info(store, entries)
        n_images = store.n_images
        matrix_sizes = [store.file["embeddings"][n]["features"].size for n in names if n in held]
        if references is None:
            references = (read_references(store), store.table_attrs(REFERENCES_TABLE))
    references, reference_attrs = references
    return _SweepInputs(images, tasks, members, held, names, detectors, entries, info, n_images,
                        max(matrix_sizes, default=0), references, reference_attrs)


@dataclass
class _SweepRun:
    """What :func:`run_sweep` carries from one feature source to the next: the groups every
    candidate is scored on, the cube being filled (``layout``) and the running totals."""

    store_path: str | os.PathLike
    groups: list[TaskGroup]
    layout: CubeLayout
    entries: list[tuple[str, str, object]]  # (candidate name, feature source, detector or None)
    hardest: tuple[int, ...]
    device: str
    priors: list  # per group: its text prior (text_prior.TextPrior.for_group) or None
    reference_log: ReferenceLog
    protocol: str = DEFAULT_PROTOCOL  # the validation protocol (swsa_engine.core.protocol)
    allow_self_validation: bool = False
    exact_scores: bool = False  # kNN: every kept score refined to float64 brute force
    scores: ScoreLayout | None = None  # the per-image scores being kept (run_sweep(keep_scores=True))
    skips: list = field(default_factory=list)  # (task_id, candidate, reason)
    read_seconds: float = 0.0
    knn_flops: float = 0.0
    refine_flops: float = 0.0
    refined_scores: int = 0
    stage_seconds: dict = field(default_factory=dict)  # seconds per stage of the scoring passes

    def __post_init__(self):
        self.column_of = {entry[0]: c for c, entry in enumerate(self.entries)}

    def score_imported(self, name: str, n_images: int) -> None:
        """Fill the column of the imported score set ``name``: no kNN, the AUROCs of the given scores."""
        c = self.column_of[name]
        with open_store(self.store_path) as store:
            table, complete, _ = store.score_set(name)
        for g, group in enumerate(self.groups):
            result = score_group_imported(table, complete, n_images, group, self.layout.base_sources, hardest=self.hardest)
            self.put(g, group, c, result)

    def put(self, g: int, group: TaskGroup, column: int, result: dict) -> None:
        """Write one candidate's AUROCs (and scores, when kept) for the ``g``-th group."""
        self.layout.put(g, group, column, result)
        if self.scores is not None:
            self.scores.put(g, column, result)

    def read_features(self, name: str, usable_images: np.ndarray, buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings ``name`` (N, D), read into ``buffer``, and their usable rows (N,) bool;
        rows still to embed are an error."""
        read_started = time.perf_counter()
        with open_store(self.store_path) as store:
            done = store.done_mask(name)
            features = store.embeddings(name, buffer=buffer)
        self.read_seconds += time.perf_counter() - read_started
        pending = np.flatnonzero(usable_images & (done == DONE_TODO))
        if pending.size:
            raise StoreError(
                f"embeddings {name!r} are incomplete: {pending.size} images still to embed; "
                f"run `swsa embed --store {self.store_path} --backbone {name}` to finish"
            )
        return features, usable_images & (done == DONE_WRITTEN) & finite_rows(features)

    def score_candidate(self, name: str, detector, features: np.ndarray, usable: np.ndarray) -> None:
        """Fill the column of (feature source ``name``, ``detector``) for every group."""
        c = self.column_of[candidate_name(name, detector)]
        candidate = self.entries[c][0]
        prepared, usable_rows, missing = detector_features(self.store_path, name, detector, features, usable)
        if missing:  # a patch detector on a backbone embedded without patch tokens
            self.skips += [(int(t), candidate, missing) for group in self.groups for t in group.task_ids]
            return
        sources = self.layout.base_sources
        for g, group in enumerate(self.groups):
            if isinstance(detector, KnnDetector):
                result = score_group(prepared, usable_rows, group, sources, k=detector.k, hardest=self.hardest, device=self.device,
                                     exact_scores=self.exact_scores,
                                     protocol=self.protocol)
            else:
                result = score_group_detector(prepared, usable_rows, group, sources, detector, hardest=self.hardest,
                                              device=self.device, prior=self.priors[g], protocol=self.protocol,
                                              allow_self_validation=self.allow_self_validation)
                self.reference_log.add(candidate, detector, group.task_ids, result.get("references"))
            self.put(g, group, c, result)
            self.skips += [(t, candidate, reason) for t, reason in result["skips"]]
            self.knn_flops += result["knn_flops"]
            self.refine_flops += result.get("refine_flops", 0.0)
            self.refined_scores += result.get("refined_scores", 0)
            for stage_name, seconds in result.get("stage_seconds", {}).items():
                self.stage_seconds[stage_name] = self.stage_seconds.get(stage_name, 0.0) + seconds

    def cube(self, inputs: _SweepInputs, k: int, started: float, text_prior) -> AurocCube:
        """The filled cube, its config recording the settings, the time spent and the kNN work."""
        layout = self.layout
        return AurocCube(
            tasks=layout.tasks[["task_id", "dataset", "normal_class"]], candidates=inputs.info, sources=layout.sources,
            real=layout.real, synthetic=layout.synthetic, per_class=layout.per_class, class_names=layout.class_names,
            skips=pd.DataFrame(self.skips, columns=["task_id", "candidate", "reason"]), self_validated=layout.self_validated,
            scores=None if self.scores is None else self.scores.scores,
            config={"k": k, "detectors": [d.label for d in inputs.detectors], "hardest": list(self.hardest),
                    "protocol": self.protocol, "allow_self_validation": self.allow_self_validation,
                    "exact_scores": self.exact_scores,
                    "base_sources": layout.base_sources, "device": self.device,
                    "seconds": round(time.perf_counter() - started, 3), "read_seconds": round(self.read_seconds, 3),
                    "knn_flops": self.knn_flops, "refine_flops": self.refine_flops, "refined_scores": self.refined_scores,
                    "stage_seconds": {"read": round(self.read_seconds, 3),
                                      **{k: round(v, 3) for k, v in self.stage_seconds.items()}},
                    **({"text_prior": {"model": text_prior.model, "prompt_set": "paper", "score": "sigmoid(s*(cos(z,t_a)-cos(z,t_n))), "
                                       "prompt ensembles"}} if text_prior is not None else {}),
                    **self.reference_log.config(inputs.reference_attrs if inputs.references is not None else None)},
        )


@writes_store("swsa score", when="save")
def run_sweep(
    store_path: str | os.PathLike,
    *,
    backbones: list[str] | None = None,
    k: int = 3,
    hardest: tuple[int, ...] = (10, 5),
    device: str = "cpu",
    progress: bool = True,
    save: bool = True,
    task_ids: list[int] | np.ndarray | None = None,
    detectors: list | None = None,
    references: tuple[pd.DataFrame, dict] | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    allow_self_validation: bool = False,
    keep_scores: bool = True,
    ensembles: bool = True,
    em_mv: bool = False,
    ensemble_normalisation: str = "rank",
    wait: float | None = 0.0,
    exact_scores: bool = False,
) -> AurocCube:
    """Score every task with every candidate backbone of the store and return the AUROC cube.

    Candidates are the store's embedding matrices (kNN score) and its imported score sets
    (:mod:`swsa_store.scores`), or the ``backbones`` named. Embeddings are read one at a time. A (task, candidate) cell that cannot be
    scored (k larger than the usable support, an image whose embedding failed) is NaN and
    listed in ``cube.skips``. Rows not yet embedded are an error: finish ``swsa embed`` first.
    ``detectors`` (default: kNN with ``k`` on squared L2) are applied to every embedding matrix:
    each (embedding, detector) pair is one candidate (:func:`swsa_engine.core.detectors.candidate_name`).
    kNN detectors are scored by :func:`swsa_engine.run.knn_sweep.score_group`, every other detector by
    :func:`swsa_engine.run.detector_sweep.score_group_detector`; the store's abnormal-reference split
    (``swsa split-refs``) feeds NAGL and is left out of every candidate's synthetic validation set.
    ``references`` (``(table, attrs)`` of :func:`swsa_store.references.make_references`) is a split
    used instead of the store's, e.g. one made in memory without writing the store.
    ``protocol`` names which bank rows each synthetic validation query is scored without
    (:data:`swsa_engine.core.protocol.PROTOCOLS`: ``"leak-free"``, the default, leaves out every
    query's origins — a held-out normal itself, an anomaly its parents; ``"paper"`` only the
    held-out normal itself); it is stored as ``cube.config["protocol"]``. Detectors with abnormal
    references are not validated on their references' generator nor on anomalies sharing parents
    with them (``cube.self_validated`` marks the cells left out) unless ``allow_self_validation``.
    ``task_ids`` restricts the sweep to those tasks. ``cube.config`` records the time spent
    reading embeddings and scoring, and the kNN floating-point operations.

    ``keep_scores`` (default True) keeps every candidate's per-image scores as ``cube.scores``
    (:class:`~swsa_engine.core.score_cube.ScoreCube`), saved beside the cube as the result
    ``"scores"`` (:func:`~swsa_engine.run.cube_io.save_scores`); they take
    ``T × C × (Q + W) × 8`` bytes (Q real test images, W synthetic queries of the widest task),
    logged and stored as ``cube.config["scores_bytes"]``: a few MB for the ELPV demo. Without
    them, strategies that read scores (model centrality) give no pick, and there are no ensembles.
    ``exact_scores`` refines every kept kNN score to its float64 brute-force value (by default
    only the scores an AUROC depends on are; the rest are float32 within ~1e-5 relative): exported
    bundles then reproduce the kept scores to ~1e-12; the AUROCs are the same either way.
    ``ensembles`` (default True, needs ``keep_scores``) appends the ensembles of
    :func:`swsa_engine.core.ensemble_pass.with_ensembles` as candidates of family ``"ensemble"``, each
    member's scores normalised by ``ensemble_normalisation`` (``"rank"``, the default, or ``"zscore"``:
    :func:`swsa_engine.core.ensembles.normalise_scores`), recorded as ``cube.config["ensemble_normalisation"]``.
    With ``save`` the whole call holds the store's writer lock (:func:`swsa_store.locks.writes_store`):
    another writer makes it fail at once, or wait ``wait`` seconds (None: as long as it takes).
    ``em_mv`` (default False: about 0.25 s per task and candidate) adds Goix's EM/MV criteria of
    every candidate (:func:`swsa_engine.run.em_mv_pass.run_em_mv_pass`), the ``em``/``mv`` strategies' input.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    check_protocol(protocol)
    check_normalisation(ensemble_normalisation)
    started = time.perf_counter()
    inputs = _read_sweep_inputs(store_path, backbones, detectors, k, references)
    tasks = inputs.tasks
    if task_ids is not None:
        tasks = tasks[tasks["task_id"].isin(np.asarray(task_ids))]
    groups = build_task_groups(inputs.images, tasks, inputs.members, inputs.references)
    if not groups:
        raise ValueError(f"store {store_path} has no scoreable tasks; see `swsa info --store {store_path}`")
    layout = CubeLayout.of(groups, tasks, len(inputs.entries), hardest)
    text_prior = TextPrior.from_store(store_path) if any(d.text_prior for d in inputs.detectors) else None
    priors = [text_prior.for_group(g) for g in groups] if text_prior is not None else [None] * len(groups)
    run = _SweepRun(store_path, groups, layout, inputs.entries, hardest, device, priors, ReferenceLog(), protocol,
                    bool(allow_self_validation), bool(exact_scores),
                    scores=ScoreLayout.of(groups, layout, [e[0] for e in inputs.entries]) if keep_scores else None)
    usable_images = (inputs.images["status"] == "ok").to_numpy()
    buffer = np.empty(inputs.largest_matrix, dtype=np.float32)  # one matrix at a time, reused
    for name in tqdm(inputs.names, desc="score", unit="source", disable=not progress):
        if name not in inputs.held:  # imported scores: no kNN, the AUROCs of the given scores
            run.score_imported(name, inputs.n_images)
            continue
        features, usable = run.read_features(name, usable_images, buffer)
        for detector in inputs.detectors:
            run.score_candidate(name, detector, features, usable)
        del features
    del buffer  # the largest embedding matrix: freed before the ensembles need their memory
    cube = run.cube(inputs, k, started, text_prior)
    return _finish(cube, store_path, started, keep_scores=keep_scores, ensembles=ensembles,
                   ensemble_normalisation=ensemble_normalisation, em_mv=em_mv, save=save, progress=progress)


def _finish(cube: AurocCube, store_path, started: float, *, keep_scores: bool, ensembles: bool,
            ensemble_normalisation: str, em_mv: bool, save: bool, progress: bool) -> AurocCube:
    """The passes after scoring (ensembles, EM/MV), each timed into ``config["stage_seconds"]``, then saving."""
    stages = cube.config["stage_seconds"]
    if keep_scores:
        with timed_stage(stages, "ensembles"):
            cube = with_ensembles(cube, cube.scores, normalisation=ensemble_normalisation) if ensembles else cube
        cube.config.update({"scores_result": SCORES_RESULT, "scores_bytes": cube.scores.nbytes})
        log.info("per-image scores: %.1f MB", cube.scores.nbytes / 2**20)
    cube.config["ensembles_built"] = bool(keep_scores and ensembles)
    cube.config["ensemble_normalisation"] = ensemble_normalisation
    if em_mv:
        cube = run_em_mv_pass(store_path, cube, progress=progress)
        stages["em_mv"] = cube.config["em_mv"]["settings"]["seconds"]
    cube.config["seconds"] = round(time.perf_counter() - started, 3)  # everything but saving
    if save:
        with timed_stage(stages, "save"):  # in the returned cube only
            if keep_scores:
                save_scores(cube.scores, store_path)
            save_cube(cube, store_path)
    return cube
