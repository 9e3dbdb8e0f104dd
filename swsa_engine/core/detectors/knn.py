"""kNN detectors: Bergman et al.'s DN2 (the paper's default detector) and what NAGL shares with it.

``knn``: the sum of squared L2 distances to the ``k`` nearest bank rows; ``metric="cosine"``
L2-normalises every feature first, so the score is ``2 Σ (1 − cos)``. Held-out normals, which
are in the bank, are scored leave-one-out. The sweep names a candidate ``<feature source>`` for
:data:`DEFAULT_DETECTOR` (kNN with k = 3 on squared L2) and ``<feature source>/<label>`` for
every other detector (:func:`candidate_name`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from swsa_engine.core.detectors.base import Detector, check_batch, check_int_setting, check_shared, register_detector
from swsa_engine.core.knn import knn_score_batched, knn_score_gathered

__all__ = ["NeighbourBank", "KnnDetector", "DEFAULT_DETECTOR", "candidate_name", "unit_rows", "knn_shared"]


class NeighbourBank(Detector):
    """What detectors built on kNN distances to the bank share: ``k`` neighbours, a metric
    ("l2" = squared L2, "cosine" = squared L2 of L2-normalised rows); a query may leave out any
    number of bank rows (its origins), each costing one more bank row."""

    k: int
    metric: str
    max_exclusions: ClassVar[int | None] = None

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features as the detector compares them (L2-normalised rows for cosine)."""
        return features if self.metric == "l2" else unit_rows(features)

    def min_bank(self, has_heldout: bool | int) -> int:
        """Usable bank rows needed: k, plus the most rows a query leaves out (True: one, for
        held-out queries scored leave-one-out; an int: that many)."""
        return self.k + int(has_heldout)

    @property
    def bank_hint(self) -> str:
        return "use a smaller k or a larger support set"


@dataclass(frozen=True)
class KnnDetector(NeighbourBank):
    """kNN anomaly score. ``k`` neighbours; ``metric`` "l2" (squared L2) or "cosine"."""

    k: int = 3
    metric: str = "l2"

    def __post_init__(self):
        check_int_setting("knn", "k", self.k, 1)
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"knn metric must be 'l2' or 'cosine', got {self.metric!r}")

    @property
    def label(self) -> str:
        return f"knn(k={self.k},{self.metric})"

    @property
    def family(self) -> str:
        return "knn"

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) kNN scores of per-task queries (T, W, D) against banks (T, S, D), each without its
        excluded rows (``exclude`` (T, W) or (T, W, E)); NaN where ~query_mask."""
        q, qm, b, bm, ex, task_ids = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids)
        return knn_score_batched(q, b, k=self.k, query_mask=qm, bank_mask=bm, exclude=ex)

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) kNN scores of queries (Q, D) shared by every task against each bank (T, S, D)."""
        q, b, bm, task_ids = check_shared(self, queries, bank, bank_mask, task_ids)
        return knn_shared(q, b, bm, self.k)


def unit_rows(features: np.ndarray) -> np.ndarray:
    """``features`` (..., D) with every non-zero row scaled to unit L2 norm (zero rows stay 0)."""
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def knn_shared(queries: np.ndarray, bank: np.ndarray, bank_mask: np.ndarray, k: int) -> np.ndarray:
    """(T, Q) kNN scores of shared queries (Q, D) against every bank (T, S, D) with mask (T, S),
    one distance block per query block."""
    n_tasks, width, dim = bank.shape
    index = np.where(bank_mask, np.arange(n_tasks * width).reshape(n_tasks, width), -1)
    return knn_score_gathered(queries, bank.reshape(n_tasks * width, dim), index, k=k)


@register_detector("knn")
def knn(k: int = 3, metric: str = "l2") -> KnnDetector:
    """``knn(k=3, metric="l2")``: the kNN detector."""
    return KnnDetector(int(k), metric)


DEFAULT_DETECTOR = KnnDetector(3, "l2")


def candidate_name(feature_source: str, detector: Detector) -> str:
    """The cube's name of a (feature source, detector) candidate."""
    return feature_source if detector == DEFAULT_DETECTOR else f"{feature_source}/{detector.label}"
