"""A bundle's detector refitted on its stored arrays, ready to score: :func:`fit_scorer`.

:mod:`swsa_engine.run.bundle_detector` says how each family is rebuilt (``BUNDLE_FAMILIES``); the
scorers here do it. Every scorer scores rows as the sweep scored the task's real test images
against the same bank: the same detector, the same task id (so the same drawn references), the
same float64 arithmetic (``tests/test_bundle_families.py``, ``tests/test_bundle_patch.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from swsa_engine.core.detectors import Detector
from swsa_engine.core.detectors.pyod import pyod_estimator
from swsa_engine.core.patch_maps import patch_score_maps
from swsa_engine.run.bundle import Bundle
from swsa_engine.run.bundle_detector import reference_slots

__all__ = ["BundleScorer", "PyodScorer", "PatchScorer", "fit_scorer"]


class BundleScorer:
    """A bundle's detector refitted on its bank: ``score(rows)`` (N, D) → (N,) float64.

    The generic form keeps the prepared bank and scores each call through ``score_tasks`` with
    one task (the bundle's task id, so drawn references are the sweep's); closed-form fits
    (Mahalanobis, PCA) are recomputed from the bank per call, which costs an S x S
    eigendecomposition, far below embedding the images."""

    def __init__(self, bundle: Bundle, detector: Detector):
        self.detector = detector
        self.task_ids = np.array([bundle.task_id])
        self.bank = detector.prepare(bundle.bank)[None]
        self.bank_mask = bundle.bank_mask[None]
        self.extra = {}
        if detector.needs_abnormal:
            abnormal = detector.prepare(bundle.abnormal)
            self.extra = {"abnormal": abnormal[None], "abnormal_mask": np.ones((1, len(abnormal)), dtype=bool)}

    def score(self, rows: np.ndarray) -> np.ndarray:
        """(N,) float64 scores of rows (N, D) (patch detectors: (N, P, D')) against the bank."""
        if len(rows) == 0:
            return np.empty(0)
        queries = self.detector.prepare(rows)[None]
        nothing_left_out = np.full(queries.shape[:2], -1, dtype=np.int64)  # new images are not in the bank
        return self.detector.score_tasks(queries, np.ones(queries.shape[:2], dtype=bool), self.bank, self.bank_mask,
                                         nothing_left_out, task_ids=self.task_ids, **self.extra)[0]


class PyodScorer(BundleScorer):
    """A PyOD model fitted once, at load, on the bundle's usable bank rows (float64, bank order),
    as :class:`~swsa_engine.core.detectors.PyodDetector` fits it for a task's real test images in
    the sweep; transductive models (ECOD, COPOD) score one image at a time, as there."""

    def __init__(self, bundle: Bundle, detector: Detector):
        super().__init__(bundle, detector)
        rows = self.bank[0][self.bank_mask[0]].astype(np.float64)
        self.estimator = pyod_estimator(detector.model, dict(detector.settings)).fit(rows)
        self.one_at_a_time = detector.spec.transductive

    def score(self, rows: np.ndarray) -> np.ndarray:
        queries = np.asarray(rows, dtype=np.float64)
        if len(queries) == 0:
            return np.empty(0)
        if self.one_at_a_time:
            return np.array([float(self.estimator.decision_function(queries[i : i + 1])[0]) for i in range(len(queries))])
        return np.asarray(self.estimator.decision_function(queries), dtype=np.float64).reshape(len(queries))


class PatchScorer(BundleScorer):
    """The patch-level residual over the bundle's patch bank (S, P, D') float16; :meth:`maps`
    gives each image's per-patch anomaly map (:func:`swsa_engine.core.patch_maps.patch_score_maps`)
    against the references the score uses."""

    def __init__(self, bundle: Bundle, detector: Detector):
        super().__init__(bundle, detector)
        slots = reference_slots(detector, bundle.bank_mask, bundle.task_id)
        self.references = bundle.bank[slots].reshape(-1, bundle.bank.shape[-1])  # (K * P, D')

    def maps(self, tokens: np.ndarray) -> np.ndarray:
        """(N, P) float64 per-patch scores of tokens (N, P, D'); their maximum is the image's score."""
        if len(tokens) == 0:
            return np.empty((0, self.bank.shape[2]))
        return patch_score_maps(tokens, self.references)


def fit_scorer(bundle: Bundle, device: str = "cpu") -> BundleScorer:
    """The bundle's detector refitted on its arrays (:data:`swsa_engine.run.bundle_detector.BUNDLE_FAMILIES`);
    ``device`` runs the patch detector's float32 pass (its scores are exact float64 on any device)."""
    detector = bundle.detector
    if detector.family == "pyod":
        return PyodScorer(bundle, detector)
    if detector.family == "patch":
        return PatchScorer(bundle, dataclasses.replace(detector, device=str(device)))
    return BundleScorer(bundle, detector)
