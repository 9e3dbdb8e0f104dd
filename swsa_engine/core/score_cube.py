"""The score cube: every candidate's per-image anomaly scores behind an AUROC cube, as arrays.

A sweep (:func:`swsa_engine.run.sweep.run_sweep`) computes, for each task and candidate, anomaly
scores of the task's real test images and of its synthetic validation queries, and reduces them
to AUROCs (:class:`~swsa_engine.core.cube.AurocCube`). :class:`ScoreCube` keeps those scores, so
that label-free strategies that look at scores (model centrality) and ensembles of candidates
(:mod:`swsa_engine.core.ensemble_pass`) can be computed without scoring again.

Invariant (``tests/test_score_cube.py``): :func:`score_aurocs` of a sweep's score cube gives the
AUROC cube's ``real``, ``per_class`` and ``synthetic`` arrays exactly — one-vs-rest over
``real_in_rest``, one-vs-closest the minimum over the out-class groups, synthetic per base
source and over its ``N`` hardest anomalies (the ``N`` lowest scores).

Memory: ``real_scores`` and ``synthetic_scores`` are float64, ``T × C × (Q + W) × 8`` bytes
(``Q`` the most real test images of a task, ``W`` the most synthetic validation queries of a
task): the ELPV demo (2 tasks, ~50 candidates, Q ≈ 2 600, W ≈ 400) holds about 2.5 MB; 100 tasks ×
40 candidates × (5 000 + 1 000) images about 190 MB. :attr:`ScoreCube.nbytes` says it.

Pure arrays: no I/O (``swsa_engine.run.cube_io.save_scores`` / ``load_scores`` store it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from swsa_engine.core.cube import grouped_auroc, hard_source_name
from swsa_engine.core.metrics import UndefinedMetricWarning, auroc

__all__ = ["ScoreCube", "score_aurocs", "two_part_auroc", "synthetic_column_parts", "SCORE_ARRAYS"]

#: the arrays of a score cube, in the order of :meth:`ScoreCube.to_arrays`
SCORE_ARRAYS = ("task_ids", "real_ids", "real_label", "real_in_rest", "real_group", "group_names", "real_scores",
                "synthetic_ids", "synthetic_part", "synthetic_scores")


@dataclass
class ScoreCube:
    """Per-image scores of T tasks × C candidates (the AUROC cube's tasks and candidates, same order).

    task_ids : (T,) int64
    candidates : (C,) candidate names
    sources : (V,) the base synthetic sources (no ``@hardN``), the AUROC cube's order
    real_ids : (T, Q) int64 image ids of each task's real test images, -1 padded
    real_label : (T, Q) int8: -1 padding, 0 normal, 1 anomaly
    real_in_rest : (T, Q) bool: the image takes part in the one-vs-rest AUROC
    real_group : (T, Q) int64: an anomaly's group index into ``group_names[t]``, -1 otherwise
    group_names : (T, G) object, "" padded
    real_scores : (T, C, Q) float64 (NaN: padding, or an image / candidate not scored)
    synthetic_ids : (T, W) int64 ids of the synthetic validation queries, -1 padded
    synthetic_part : (T, W) int8: 0 held-out normal, ``v + 1`` an anomaly of ``sources[v]``, -1 padding
    synthetic_scores : (T, C, W) float64 under the cube's protocol (NaN: padding / not scored)
    """

    task_ids: np.ndarray
    candidates: list
    sources: list
    real_ids: np.ndarray
    real_label: np.ndarray
    real_in_rest: np.ndarray
    real_group: np.ndarray
    group_names: np.ndarray
    real_scores: np.ndarray
    synthetic_ids: np.ndarray
    synthetic_part: np.ndarray
    synthetic_scores: np.ndarray

    def __post_init__(self):
        self.task_ids = np.asarray(self.task_ids, dtype=np.int64)
        self.candidates, self.sources = [str(c) for c in self.candidates], [str(s) for s in self.sources]
        n_tasks, n_candidates = len(self.task_ids), len(self.candidates)
        expected = {
            "real_ids": (n_tasks, None), "real_label": (n_tasks, None), "real_in_rest": (n_tasks, None),
            "real_group": (n_tasks, None), "group_names": (n_tasks, None), "real_scores": (n_tasks, n_candidates, None),
            "synthetic_ids": (n_tasks, None), "synthetic_part": (n_tasks, None),
            "synthetic_scores": (n_tasks, n_candidates, None),
        }
        width = {"real": np.shape(self.real_ids)[-1] if np.ndim(self.real_ids) == 2 else None,
                 "synthetic": np.shape(self.synthetic_ids)[-1] if np.ndim(self.synthetic_ids) == 2 else None}
        for name, shape in expected.items():
            got = np.shape(getattr(self, name))
            last = None if name == "group_names" else width["synthetic" if name.startswith("synthetic") else "real"]
            want = shape[:-1] + (last if last is not None else (got[-1] if got else None),)
            if len(got) != len(want) or got != want:
                raise ValueError(f"ScoreCube.{name} must have shape {want} (T={n_tasks} tasks, C={n_candidates} "
                                 f"candidates), got {got}")

    @property
    def nbytes(self) -> int:
        """Bytes held by the score arrays (``T × C × (Q + W) × 8``)."""
        return int(self.real_scores.nbytes + self.synthetic_scores.nbytes)

    @property
    def real_pool(self) -> np.ndarray:
        """(T, Q) bool: each task's real test images (unlabelled pool of the label-free strategies)."""
        return self.real_label >= 0

    @property
    def synthetic_pool(self) -> np.ndarray:
        """(T, W) bool: each task's synthetic validation queries."""
        return self.synthetic_part >= 0

    def take(self, rows: np.ndarray) -> "ScoreCube":
        """The score cube of tasks ``rows`` (indices into the task axis)."""
        rows = np.asarray(rows)
        return ScoreCube(self.task_ids[rows], self.candidates, self.sources, self.real_ids[rows], self.real_label[rows],
                         self.real_in_rest[rows], self.real_group[rows], self.group_names[rows], self.real_scores[rows],
                         self.synthetic_ids[rows], self.synthetic_part[rows], self.synthetic_scores[rows])

    def without_source(self, source: str) -> "ScoreCube":
        """This score cube as if ``source`` had never been generated: its anomalies become padding
        (part -1, score NaN) and the later sources' parts move down by one."""
        if source not in self.sources:
            raise ValueError(f"unknown synthetic source {source!r}; the score cube holds: {', '.join(self.sources)}")
        v = self.sources.index(source) + 1
        dropped = self.synthetic_part == v
        part = np.where(self.synthetic_part > v, self.synthetic_part - 1, self.synthetic_part).astype(np.int8)
        part[dropped] = -1
        values = np.where(dropped[:, None, :], np.nan, self.synthetic_scores)
        ids = np.where(dropped, -1, self.synthetic_ids)
        return ScoreCube(self.task_ids, self.candidates, [s for s in self.sources if s != source], self.real_ids,
                         self.real_label, self.real_in_rest, self.real_group, self.group_names, self.real_scores,
                         ids, part, values)

    def with_candidates(self, names: list[str], real_scores: np.ndarray, synthetic_scores: np.ndarray) -> "ScoreCube":
        """This score cube with candidates ``names`` appended: ``real_scores`` (T, K, Q), ``synthetic_scores`` (T, K, W)."""
        return ScoreCube(self.task_ids, self.candidates + list(names), self.sources, self.real_ids, self.real_label,
                         self.real_in_rest, self.real_group, self.group_names,
                         np.concatenate([self.real_scores, real_scores], axis=1), self.synthetic_ids, self.synthetic_part,
                         np.concatenate([self.synthetic_scores, synthetic_scores], axis=1))

    def to_arrays(self) -> tuple[dict, dict]:
        """``(arrays, attrs)``: :data:`SCORE_ARRAYS` (``group_names`` as an object array) and the
        JSON-able ``candidates`` and ``sources``."""
        arrays = {name: getattr(self, name) for name in SCORE_ARRAYS}
        arrays["real_in_rest"] = self.real_in_rest.astype(np.uint8)
        arrays["group_names"] = np.asarray(self.group_names).astype(object)
        attrs = {"candidates": list(self.candidates), "sources": list(self.sources),
                 "description": "score cube: real_scores (task, candidate, real image), synthetic_scores (task, "
                                "candidate, synthetic query)"}
        return arrays, attrs

    @classmethod
    def from_arrays(cls, arrays: dict, attrs: dict) -> "ScoreCube":
        """The score cube from the flat form of :meth:`to_arrays` (strings decoded, attrs from JSON)."""
        return cls(
            task_ids=np.asarray(arrays["task_ids"], dtype=np.int64), candidates=list(attrs["candidates"]),
            sources=list(attrs["sources"]), real_ids=np.asarray(arrays["real_ids"], dtype=np.int64),
            real_label=np.asarray(arrays["real_label"], dtype=np.int8),
            real_in_rest=np.asarray(arrays["real_in_rest"], dtype=bool),
            real_group=np.asarray(arrays["real_group"], dtype=np.int64),
            group_names=np.asarray(arrays["group_names"]).astype(object),
            real_scores=np.asarray(arrays["real_scores"], dtype=np.float64),
            synthetic_ids=np.asarray(arrays["synthetic_ids"], dtype=np.int64),
            synthetic_part=np.asarray(arrays["synthetic_part"], dtype=np.int8),
            synthetic_scores=np.asarray(arrays["synthetic_scores"], dtype=np.float64),
        )


def synthetic_column_parts(synth: np.ndarray, synthetic_part: np.ndarray, n_sources: int,
                           hardest: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The two parts of every synthetic column of a cube, in its order (each base source, then each
    source's ``N`` hardest anomalies — the ``N`` lowest scores — for ``N`` in ``hardest``):
    ``(normal_scores, normal_mask, anomaly_scores, anomaly_mask)`` for a two-part metric such as
    :func:`two_part_auroc`. ``synth`` (T, C, W) scores, ``synthetic_part`` (T, W)."""
    part = synthetic_part[:, None, :]
    ok = np.isfinite(synth)
    normal_mask = (part == 0) & ok
    columns, hard_columns = [], []
    for v in range(n_sources):
        anomaly_mask = (part == v + 1) & ok
        columns.append((synth, normal_mask, synth, anomaly_mask))
        ordered = np.sort(np.where(anomaly_mask, synth, np.inf), axis=2)
        for n in hardest:
            hard = ordered[..., :n]
            hard_columns.append((synth, normal_mask, np.where(np.isfinite(hard), hard, 0.0), np.isfinite(hard)))
    return columns + hard_columns


def two_part_auroc(normal, normal_mask, anomaly, anomaly_mask) -> np.ndarray:
    """(...) AUROC of ``normal`` (..., A) against ``anomaly`` (..., B) scores over their masks (True =
    included); NaN where undefined (no normals or no anomalies), without a warning. Every pass
    computes its synthetic AUROCs (per source and over the hardest N) with it."""
    scores = np.concatenate([np.where(normal_mask, normal, 0.0), np.where(anomaly_mask, anomaly, 0.0)], axis=-1)
    labels = np.concatenate([np.zeros(normal.shape, bool), np.ones(anomaly.shape, bool)], axis=-1)
    mask = np.concatenate([normal_mask, anomaly_mask], axis=-1)
    if scores.shape[-1] == 0:
        return np.full(scores.shape[:-1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # a source absent for a task: NaN
        return auroc(scores, labels, mask=mask)


def score_aurocs(scores: ScoreCube, hardest: tuple[int, ...] = (10, 5), candidates: np.ndarray | None = None) -> dict:
    """Every AUROC of the candidates from their scores, as the sweep computes them.

    Returns ``real`` (T, C, 2) (one-vs-rest over ``real_in_rest``; one-vs-closest the minimum of
    ``per_class``), ``per_class`` (T, C, G) and ``synthetic`` (T, C, V × (1 + len(hardest))): each
    base source, then each source's ``N`` hardest anomalies (its ``N`` lowest scores) for ``N`` in
    ``hardest`` (the order of :func:`~swsa_engine.core.cube.hard_source_name` columns), and
    ``sources`` their names. ``candidates``: indices of the candidates to compute (default all).
    A score that is NaN leaves that image out of that candidate's AUROCs.
    """
    index = np.arange(len(scores.candidates)) if candidates is None else np.asarray(candidates)
    real_scores = scores.real_scores[:, index]
    synth = scores.synthetic_scores[:, index]
    finite = np.isfinite(real_scores)
    label = np.where(finite, scores.real_label[:, None, :], -1).astype(np.int8)
    filled = np.where(finite, real_scores, 0.0)
    n_tasks, n_candidates, n_real = real_scores.shape
    real = np.full((n_tasks, n_candidates, 2), np.nan)
    if n_real:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            real[..., 0] = auroc(filled, label == 1, mask=(label >= 0) & scores.real_in_rest[:, None, :])
    n_groups = scores.group_names.shape[1]
    groups = np.broadcast_to(scores.real_group[:, None, :], label.shape)
    per_class = grouped_auroc(filled.reshape(-1, n_real), label.reshape(-1, n_real), groups.reshape(-1, n_real),
                              n_groups).reshape(n_tasks, n_candidates, n_groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        real[..., 1] = np.nanmin(per_class, axis=2) if n_groups else np.nan
    every = [two_part_auroc(*parts) for parts in synthetic_column_parts(synth, scores.synthetic_part, len(scores.sources),
                                                                        hardest)]
    n_columns = len(scores.sources) * (1 + len(hardest))
    synthetic = np.stack(every, axis=2) if every else np.full((n_tasks, n_candidates, n_columns), np.nan)
    names = list(scores.sources) + [hard_source_name(s, n) for s in scores.sources for n in hardest]
    return {"real": real, "per_class": per_class, "synthetic": synthetic, "sources": names}
