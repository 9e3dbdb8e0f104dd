"""Which approximate scores must be recomputed exactly so that every AUROC is the exact one.

The sweep scores in float32 with a rigorous error bound per score (:mod:`swsa_engine.core.knn`);
these functions find the few scores whose bound could change an order that an AUROC, or the
membership of a hardest-N set, depends on. Recomputing only those exactly gives the AUROCs of
exact float64 scores. Arrays are ``(T, Q)``: one row per task, -1 / False padded.
"""

from __future__ import annotations

import numpy as np
import torch


def order_uncertain(scores: np.ndarray, bounds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Which approximate scores could order differently against the other label than exact ones.

    Parameters
    ----------
    scores : (T, Q) approximate scores; bounds : (T, Q) with ``|scores - exact| <= bounds``.
    labels : (T, Q) int8: -1 excluded, 0 normal, 1 anomaly.

    Returns
    -------
    (T, Q) bool: True for a normal whose interval ``scores ± e_t`` (``e_t`` the task's largest
    bound) meets an anomaly's, and for such an anomaly.  With those scores replaced by exact
    ones, every normal–anomaly pair compares as with exact scores (a certain score's interval
    meets no interval of the other label, and every score lies in its interval), so every
    AUROC, per group or over all anomalies, is the exact one.
    """
    scores = np.asarray(scores, dtype=np.float64)
    member = labels >= 0
    width = 2.0 * np.where(member, bounds, 0.0).max(axis=1, initial=0.0)[:, None]  # (T, 1)
    out = np.zeros(scores.shape, dtype=bool)
    for mine, other in ((0, 1), (1, 0)):
        other_sorted = torch.from_numpy(np.sort(np.where(labels == other, scores, np.inf), axis=1))
        n_other = torch.from_numpy((labels == other).sum(axis=1))
        low = torch.from_numpy(np.where(labels == mine, scores, 0.0) - width)
        first = torch.searchsorted(other_sorted, low)  # first other-label score >= s - width
        nearest = torch.gather(other_sorted, 1, first.clamp(max=max(0, other_sorted.shape[1] - 1))).numpy()
        out |= (labels == mine) & (first < n_other[:, None]).numpy() & (nearest <= np.where(labels == mine, scores, 0.0) + width)
    return out


def hardest_uncertain(scores: np.ndarray, bounds: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Which anomalies' membership of the ``n`` lowest scores of their row is not certain.

    ``scores``, ``bounds``, ``mask`` (T, A).  With ``e`` the row's largest bound, an anomaly is
    certainly among the ``n`` lowest when fewer than ``n`` others score ``<= s + 2e``, and
    certainly not when at least ``n`` others score ``< s - 2e``; the rest (True) need exact
    scores.  With them exact, the ``n`` lowest values are those of the exact scores.
    """
    width = 2.0 * np.where(mask, bounds, 0.0).max(axis=1, initial=0.0)[:, None]
    values = np.where(mask, scores, np.inf)
    ordered = torch.from_numpy(np.sort(values, axis=1))
    filled = np.where(mask, scores, 0.0)
    at_most_high = torch.searchsorted(ordered, torch.from_numpy(filled + width), right=True).numpy() - 1  # others <= s + 2e
    below_low = torch.searchsorted(ordered, torch.from_numpy(filled - width), right=False).numpy()  # others < s - 2e
    return mask & ~((at_most_high < n) | (below_low >= n))


def synthetic_uncertain(scores: np.ndarray, bounds: np.ndarray, present: np.ndarray, widths: list[int],
                        hardest: tuple[int, ...]) -> np.ndarray:
    """(T, W) scores whose error bound could change a synthetic AUROC: normal–anomaly orders per
    source (:func:`order_uncertain`) and hardest-N memberships (:func:`hardest_uncertain`).

    ``scores``, ``bounds``, ``present`` (T, W): the synthetic queries of
    :func:`swsa_engine.run.group_scoring.synthetic_queries`, held-out normals first (``widths[0]``
    columns), then each source's anomalies (``widths[1:]``); ``hardest`` the hardest-N counts."""
    offsets = np.cumsum([0] + list(widths))
    present = present & np.isfinite(scores)
    uncertain = np.zeros(scores.shape, dtype=bool)
    for index in range(1, len(widths)):
        part = slice(offsets[index], offsets[index + 1])
        labels = np.full(scores.shape, -1, dtype=np.int8)
        labels[:, : offsets[1]] = np.where(present[:, : offsets[1]], 0, -1)
        labels[:, part] = np.where(present[:, part], 1, -1)
        uncertain |= order_uncertain(np.nan_to_num(scores), bounds, labels)
        for n in hardest:
            uncertain[:, part] |= hardest_uncertain(scores[:, part], bounds[:, part], present[:, part], n)
    return uncertain
