"""InCTRL's text prior without training, for detectors with a ``text_prior`` weight.

:class:`TextPrior` reads a store's CLIP image embeddings and the ``paper`` prompt set once per
sweep; :meth:`TextPrior.for_group` gives each task group's :class:`GroupPrior`, the callable that
:func:`swsa_engine.run.detector_sweep.score_group_detector` adds, times the detector's weight w,
to every score: ``score + w · p`` with ``p`` in (0, 1), linear in w and never normalised against the
detector's own scale (how that plays out: :class:`swsa_engine.core.detectors.residual.ResidualDetector`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from swsa_store.models.clip import read_text_prior_inputs

from swsa_engine.core.clip_scores import l2_normalize
from swsa_engine.run.prompt_sweep import per_task_text, prompt_directions
from swsa_engine.run.task_groups import TaskGroup


class TextPrior:
    """InCTRL's text prior without training: CLIP's two-prompt anomaly probability per (task, image).

    ``p = sigmoid(s · (cos(z, t_a) − cos(z, t_n)))`` with the prompt ensembles ``t_n``, ``t_a`` of
    the task's class in ``prompt_set`` (:func:`swsa_engine.core.clip_scores.two_prompt_score`), ``z`` the
    image's embedding by the same CLIP model and ``s`` its logit scale.  Built once per sweep from
    the store (:meth:`from_store`); :attr:`usable` marks the images with a CLIP embedding.
    """

    def __init__(self, unit: np.ndarray, usable: np.ndarray, text, logit_scale: float, model: str):
        self.unit, self.usable, self.text, self.logit_scale, self.model = unit, usable, text, logit_scale, model
        self.n_templates = int(text.attrs.get("n_templates") or (text.table["template"].max() + 1))

    @classmethod
    def from_store(cls, store_path, model: str | None = None, prompt_set: str = "paper") -> "TextPrior":
        """The prior of CLIP ``model`` (``None``: the store's only one) and ``prompt_set``, read by
        :func:`swsa_store.models.clip.read_text_prior_inputs` (one-line errors for what is missing)."""
        inputs = read_text_prior_inputs(store_path, model, prompt_set)
        unit = l2_normalize(np.where(inputs.usable[:, None], inputs.features, 0.0).astype(np.float64))
        return cls(unit, inputs.usable, inputs.text, float(inputs.text.attrs.get("logit_scale", 100.0)), inputs.model)

    def for_group(self, group: TaskGroup) -> "GroupPrior":
        """The prior of the tasks of ``group`` (:class:`GroupPrior`)."""
        normal, anomaly = per_task_text(self.text, group.task_ids, self.n_templates)
        direction = prompt_directions(normal, anomaly, self.logit_scale)[:, -1, :]  # the ensemble's (T, D)
        return GroupPrior(self.unit, direction, self.usable, self.model)


@dataclass(frozen=True)
class GroupPrior:
    """CLIP's two-prompt probabilities for one task group: ``prior(rows, query_ids)`` for tasks
    ``group.task_ids[rows]``, query ids (Q,) shared by every task → (T', Q), or (T', W) per task →
    (T', W). ``unit`` (N, D) unit image embeddings, ``direction`` (T, D) per-task prompt direction,
    ``usable`` (N,) images with a CLIP embedding, ``model`` the CLIP model's name."""

    unit: np.ndarray
    direction: np.ndarray
    usable: np.ndarray
    model: str

    def __call__(self, rows: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
        w = self.direction[rows]
        if query_ids.ndim == 1:
            return expit(self.unit[query_ids] @ w.T).T
        return expit(np.einsum("twd,td->tw", self.unit[query_ids], w))
