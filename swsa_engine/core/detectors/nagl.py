"""NAGL's normal–abnormal guided idea, training-free.

kNN score against the normal bank minus ``beta`` × kNN score against the task's abnormal
references (held-apart synthetic anomalies, :mod:`swsa_store.references`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from swsa_engine.core.detectors.base import (check_batch, check_int_setting, check_shared, float_setting, int_setting,
                                             register_detector)
from swsa_engine.core.detectors.knn import NeighbourBank, knn_shared
from swsa_engine.core.knn import knn_score_batched

__all__ = ["NaglDetector"]


@dataclass(frozen=True)
class NaglDetector(NeighbourBank):
    """NAGL's normal–abnormal guided score without training: kNN score (sum of the ``k`` smallest
    squared L2 distances) to the normal bank minus ``beta`` × the same against the task's abnormal
    references (held-apart synthetic anomalies, :mod:`swsa_store.references`). ``metric="cosine"``
    L2-normalises features first, as for ``knn``."""

    k: int = 3
    beta: float = 1.0
    metric: str = "l2"
    needs_abnormal: ClassVar[bool] = True

    def __post_init__(self):
        check_int_setting("nagl", "k", self.k, 1)
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"nagl needs a finite beta >= 0, got {self.beta!r}")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"nagl metric must be 'l2' or 'cosine', got {self.metric!r}")

    @property
    def label(self) -> str:
        return f"nagl(k={self.k},beta={float(self.beta)!r}" + (",cosine)" if self.metric == "cosine" else ")")

    @property
    def family(self) -> str:
        return "nagl"

    @property
    def min_abnormal(self) -> int:
        return self.k

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) guided scores; ``abnormal`` (T, R, D) with ``abnormal_mask`` (T, R) required."""
        q, qm, b, bm, ex, task_ids, a, am = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids,
                                                        abnormal, abnormal_mask)
        normal = knn_score_batched(q, b, k=self.k, query_mask=qm, bank_mask=bm, exclude=ex)
        if self.beta == 0:
            return normal
        return normal - self.beta * knn_score_batched(q, a, k=self.k, query_mask=qm, bank_mask=am)

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) guided scores of shared queries (Q, D)."""
        q, b, bm, task_ids, a, am = check_shared(self, queries, bank, bank_mask, task_ids, abnormal, abnormal_mask)
        normal = knn_shared(q, b, bm, self.k)
        return normal if self.beta == 0 else normal - self.beta * knn_shared(q, a, am, self.k)


@register_detector("nagl")
def nagl(k: int = 3, beta: float = 1.0, metric: str = "l2") -> NaglDetector:
    """``nagl(k=3, beta=1.0, metric="l2")``: the normal–abnormal guided score."""
    return NaglDetector(int_setting(k, "nagl k"), float_setting(beta, "nagl beta"), metric)
