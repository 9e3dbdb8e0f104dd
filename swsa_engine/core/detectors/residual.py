"""The few-shot residual (InCTRL's image-level residual, training-free).

``K`` references drawn from the bank by a seeded hash of (seed, task id, bank position);
``mean`` = squared L2 distance to the references' mean, ``min`` = to the nearest reference. A
query that is a reference is scored against the other ``K − 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from swsa_store.hashing import hash_uniform

from swsa_engine.core.detectors.base import (Detector, check_batch, check_int_setting, check_shared, float_setting,
                                             int_setting, register_detector)
from swsa_engine.core.detectors.linalg import take_rows

__all__ = ["ResidualDetector"]


@dataclass(frozen=True)
class ResidualDetector(Detector):
    """InCTRL's image-level residual without training: ``K`` normal references per task.

    References are the ``K`` usable bank rows with the smallest ``hash_uniform(seed, task_id,
    bank position)`` (:meth:`references`), so the draw is seeded, reproducible and recorded by
    the sweep. ``reduce="mean"``: squared L2 distance of the query to the references' mean;
    ``"min"``: to the nearest reference. A query whose excluded bank row is a reference is
    scored against the other ``K − 1`` references.

    ``text`` = w > 0 adds InCTRL's text prior, training-free: the sweep scores an image
    ``residual + w · p`` with ``p = sigmoid(s · (cos(z, t_a) − cos(z, t_n)))`` in (0, 1), CLIP's
    two-prompt anomaly probability of the image (``z`` its CLIP embedding, ``t_n``/``t_a`` the task
    class's "paper" prompt-set ensembles, ``s`` the model's logit scale, about 100; see
    :class:`swsa_engine.run.text_prior.TextPrior`). How this scales with w:

    * the added term is linear in w and bounded: it moves any score by less than w, and w = 0 is
      the residual alone (:meth:`score_tasks` is always the residual alone; the sweep adds it);
    * neither term is normalised: the residual is a squared L2 distance in the backbone's own
      feature units, so one w weighs differently on each backbone. A w far below the spread of
      the task's residuals changes few ranks; a w far above it makes the ranking (so the AUROC)
      tend to that of ``p`` alone, the residual then only ordering images of similar ``p``;
    * with s ≈ 100, ``p`` is close to 0 or 1 for most images (a cosine gap of 0.05 gives
      0.007 / 0.993), so the prior acts almost as a step: about w added to the images CLIP
      calls anomalous, about nothing to the others.
    """

    K: int = 4
    reduce: str = "mean"
    seed: int = 0
    text: float = 0.0
    draws_references: ClassVar[bool] = True
    #: a query whose left-out row is a reference is scored against the other K − 1: one row per query
    max_exclusions: ClassVar[int | None] = 1

    def __post_init__(self):
        check_int_setting("residual", "K", self.K, 2, " (a reference scored leave-one-out keeps K-1)")
        if self.reduce not in ("mean", "min"):
            raise ValueError(f"residual reduce must be 'mean' or 'min', got {self.reduce!r}")
        if not (np.isfinite(self.text) and self.text >= 0):
            raise ValueError(f"residual text (the weight of the CLIP text prior) must be a finite number >= 0, got {self.text!r}")

    @property
    def label(self) -> str:
        settings = [f"K={self.K}", self.reduce] + ([f"seed={self.seed}"] if self.seed else []) + \
            ([f"text={self.text:g}"] if self.text else [])
        return f"residual({','.join(settings)})"

    @property
    def text_prior(self) -> float:
        """Weight of the CLIP two-prompt probability added to the score (0: none)."""
        return float(self.text)

    @property
    def family(self) -> str:
        return "residual"

    def min_bank(self, has_heldout: bool) -> int:
        return self.K

    @property
    def bank_hint(self) -> str:
        return "use a smaller K or a larger support set"

    @property
    def reference_rule(self) -> str:
        """How the references are drawn, in words (for the sweep's record)."""
        return "the K usable support images with the smallest hash_uniform(seed, task_id, support position)"

    def references(self, bank_mask, task_ids) -> np.ndarray:
        """(T, K) bank positions of each task's references, ascending; -1 where a task has fewer
        than K usable rows. ``bank_mask`` (T, S) bool, ``task_ids`` (T,)."""
        bank_mask = np.asarray(bank_mask, dtype=bool)
        task_ids = np.asarray(task_ids, dtype=np.int64)
        if bank_mask.ndim != 2 or task_ids.shape != (len(bank_mask),):
            raise ValueError(f"references needs bank_mask (T, S) and task_ids (T,), got {bank_mask.shape} and {task_ids.shape}")
        keys = hash_uniform(self.seed, task_ids[:, None], np.arange(bank_mask.shape[1])[None, :])
        keys = np.where(bank_mask, keys, np.inf)
        chosen = np.argsort(keys, axis=1, kind="stable")[:, : self.K]
        chosen = np.where(np.take_along_axis(bank_mask, chosen, 1), chosen, bank_mask.shape[1])
        chosen = np.sort(chosen, axis=1)
        chosen = np.where(chosen < bank_mask.shape[1], chosen, -1)
        if chosen.shape[1] < self.K:
            chosen = np.concatenate([chosen, np.full((len(chosen), self.K - chosen.shape[1]), -1)], axis=1)
        return chosen

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) squared L2 residuals to the references (mean or nearest); NaN where ~query_mask."""
        q, qm, b, bm, ex, task_ids = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids)
        ex = ex[..., 0]  # max_exclusions = 1: each query's one left-out row (or -1)
        refs = self.references(bm, task_ids)
        valid = refs >= 0
        ref_rows = take_rows(b, np.maximum(refs, 0)) * valid[..., None]  # (T, K, D)
        is_self = (ex[:, :, None] == refs[:, None, :]) & (ex[:, :, None] >= 0)  # (T, W, K)
        if self.reduce == "mean":
            total = ref_rows.sum(axis=1)[:, None, :] - is_self.astype(np.float64) @ ref_rows
            count = valid.sum(axis=1)[:, None] - is_self.sum(axis=2)
            with np.errstate(divide="ignore", invalid="ignore"):
                score = ((q - total / count[..., None]) ** 2).sum(-1)
        else:
            score = np.full(q.shape[:2], np.inf)
            for r in range(self.K):  # K <= a few: one (T, W, D) difference per reference
                dist = ((q - ref_rows[:, r : r + 1, :]) ** 2).sum(-1)
                score = np.minimum(score, np.where(valid[:, r : r + 1] & ~is_self[:, :, r], dist, np.inf))
        return np.where(qm, score, np.nan)

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) residuals of shared queries (Q, D); distances by matrix products."""
        q, b, bm, task_ids = check_shared(self, queries, bank, bank_mask, task_ids)
        refs = self.references(bm, task_ids)
        valid = refs >= 0
        ref_rows = take_rows(b, np.maximum(refs, 0)) * valid[..., None]
        q2 = (q**2).sum(1)
        if self.reduce == "mean":
            centre = ref_rows.sum(1) / valid.sum(1, keepdims=True)
            return np.maximum(q2[None, :] - 2 * centre @ q.T + (centre**2).sum(1)[:, None], 0.0)
        dist = q2[None, None, :] - 2 * ref_rows @ q.T + (ref_rows**2).sum(-1)[..., None]  # (T, K, Q)
        return np.maximum(np.where(valid[..., None], dist, np.inf).min(axis=1), 0.0)


@register_detector("residual")
def residual(K: int = 4, reduce: str = "mean", seed: int = 0, text: float = 0.0) -> ResidualDetector:
    """``residual(K=4, reduce="mean", seed=0, text=0.0)``: the few-shot residual."""
    return ResidualDetector(int_setting(K, "residual K"), reduce, int_setting(seed, "residual seed"), float_setting(text, "residual text"))
