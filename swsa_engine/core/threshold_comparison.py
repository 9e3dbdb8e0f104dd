"""How each label-free decision threshold of a picked candidate fares on the labelled real test images.

For each task and its picked candidate (e.g. the ``recommended`` strategy's), from the cube's
per-image scores (:class:`~swsa_engine.core.score_cube.ScoreCube`), the thresholds a detector bundle
records (``swsa export-detector``, :func:`swsa_engine.run.bundle_export.fit_thresholds`), with the
same functions of :mod:`swsa_engine.core.thresholds`:

* ``normal_quantile(q=…)``: the split-conformal quantile ``q`` of the task's held-out normal scores
  (``synthetic_part == 0``), for each ``q`` asked for (default 0.99, the bundle's default, and 0.95,
  which needs 19 held-out normals instead of 99); its stated false-positive rate is ``1 − q``;
* ``synthetic_f1``: F1-optimal on the held-out normals against every synthetic anomaly
  (``synthetic_part > 0``, the sources pooled); its stated false-positive rate is the one on the
  held-out normals;
* ``real_f1_max``: the reference that reads the real labels: F1-optimal on the real test images.

Each is then applied to the task's real test images of the one-vs-rest setting (its normals and the
anomalies in ``real_in_rest``): precision, recall (TPR), FPR and the share flagged
(:func:`~swsa_engine.core.thresholds.rates_at_threshold`). Only the last threshold sees real labels.
Pure arrays: no I/O.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from swsa_engine.core.score_cube import ScoreCube
from swsa_engine.core.thresholds import f1_optimal_threshold, normal_quantile_threshold, rates_at_threshold

__all__ = ["THRESHOLD_RULES", "THRESHOLD_COLUMNS", "DEFAULT_QUANTILES", "threshold_comparison", "first_picks",
           "quantile_rule"]

#: the kinds of rule compared, in report order: name → (what it reads, whether it reads real labels)
THRESHOLD_RULES = {
    "normal_quantile": ("split-conformal quantile q of held-out normal scores", False),
    "synthetic_f1": ("F1-optimal, held-out normals vs synthetic anomalies", False),
    "real_f1_max": ("F1-optimal on the real test images (reads the labels)", True),
}
#: the columns of :func:`threshold_comparison`
THRESHOLD_COLUMNS = ["task_id", "candidate", "rule", "uses_labels", "threshold", "stated_fpr", "real_precision",
                     "real_recall", "real_fpr", "real_flagged", "n_real_normal", "n_real_anomaly", "n_heldout_normal",
                     "n_synthetic_anomaly"]
#: the normal-quantile rules' quantiles: 0.99 as ``swsa export-detector`` (an expected FPR of at most 1 %), and
#: 0.95 (at most 5 %), which small held-out sets can still give
DEFAULT_QUANTILES = (0.99, 0.95)


def quantile_rule(quantile: float) -> str:
    """The rule name of the normal-quantile threshold at ``quantile``, e.g. ``normal_quantile(q=0.99)``."""
    return f"normal_quantile(q={float(quantile):g})"


def first_picks(weights: np.ndarray) -> np.ndarray:
    """(T,) the first candidate of each row's largest weight in ``weights`` (T, C) (ties: cube order, as
    ``swsa export-detector --pick``); -1 where a row has no positive finite weight."""
    weights = np.asarray(weights, dtype=np.float64)
    filled = np.where(np.isfinite(weights), weights, -np.inf)
    picks = filled.argmax(axis=1) if weights.shape[1] else np.zeros(len(weights), dtype=np.int64)
    defined = (filled.max(axis=1, initial=-np.inf) > 0) & ~np.isnan(weights).any(axis=1)
    return np.where(defined, picks, -1)


def _row_values(values: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """(T, N) the rows ``values[t, picks[t]]`` of (T, C, N) values (NaN where ``picks`` is -1)."""
    taken = np.take_along_axis(values, np.maximum(picks, 0)[:, None, None], axis=1)[:, 0]
    return np.where((picks >= 0)[:, None], taken, np.nan)


def threshold_comparison(scores: ScoreCube, picks: np.ndarray, *,
                         quantiles: tuple[float, ...] = DEFAULT_QUANTILES) -> pd.DataFrame:
    """One row per task with a pick and rule (columns :data:`THRESHOLD_COLUMNS`): a normal quantile per
    ``quantiles`` (:func:`quantile_rule`), ``synthetic_f1``, ``real_f1_max``.

    ``picks`` (T,) candidate index per task of ``scores`` (-1: no pick, no rows). ``stated_fpr`` is
    the rate a rule promises without real labels (``1 − q``; the held-out normals' FPR of
    ``synthetic_f1``; NaN for ``real_f1_max``). A threshold that is undefined (too few held-out normals
    for ``quantile``: +inf; a set without both classes: NaN) gives NaN rates.
    """
    picks = np.asarray(picks, dtype=np.int64)
    if picks.shape != (len(scores.task_ids),):
        raise ValueError(f"picks must hold one candidate index per task, shape ({len(scores.task_ids)},), got {picks.shape}")
    if ((picks < -1) | (picks >= len(scores.candidates))).any():
        raise ValueError(f"picks must be candidate indices in [0, {len(scores.candidates)}) or -1 (no pick), "
                         f"got {picks[(picks < -1) | (picks >= len(scores.candidates))][:5].tolist()}")
    synth = _row_values(scores.synthetic_scores, picks)
    real = _row_values(scores.real_scores, picks)
    part = scores.synthetic_part
    heldout = (part == 0) & np.isfinite(synth)
    validation = (part >= 0) & np.isfinite(synth)
    test = (scores.real_label >= 0) & scores.real_in_rest & np.isfinite(real)
    is_anomaly = scores.real_label == 1
    rules = {quantile_rule(q): (normal_quantile_threshold(np.where(heldout, synth, 0.0), heldout, quantile=q),
                                np.full(len(picks), round(1.0 - float(q), 12))) for q in quantiles}
    if synth.shape[1]:
        value, _, fpr = f1_optimal_threshold(np.where(validation, synth, 0.0), part > 0, validation)
        rules["synthetic_f1"] = (value, fpr)
    else:
        rules["synthetic_f1"] = (np.full(len(picks), np.nan),) * 2
    if real.shape[1]:
        rules["real_f1_max"] = (f1_optimal_threshold(np.where(test, real, 0.0), is_anomaly, test)[0],
                                np.full(len(picks), np.nan))
    else:
        rules["real_f1_max"] = (np.full(len(picks), np.nan),) * 2
    counts = {"n_real_normal": (test & ~is_anomaly).sum(1), "n_real_anomaly": (test & is_anomaly).sum(1),
              "n_heldout_normal": heldout.sum(1), "n_synthetic_anomaly": (validation & (part > 0)).sum(1)}
    records = []
    names = np.asarray(scores.candidates, dtype=object)
    for rule, (threshold, stated) in rules.items():
        rates = rates_at_threshold(np.where(test, real, 0.0), is_anomaly, threshold, test)
        defined = np.isfinite(threshold)
        for t in np.flatnonzero(picks >= 0):
            records.append({
                "task_id": int(scores.task_ids[t]), "candidate": str(names[picks[t]]), "rule": rule,
                "uses_labels": rule == "real_f1_max", "threshold": float(threshold[t]), "stated_fpr": float(stated[t]),
                **{f"real_{k}": float(rates[k][t]) if defined[t] else np.nan
                   for k in ("precision", "recall", "fpr", "flagged")},
                **{k: int(v[t]) for k, v in counts.items()},
            })
    order = {rule: i for i, rule in enumerate(rules)}
    frame = pd.DataFrame(records, columns=THRESHOLD_COLUMNS)
    return frame.sort_values(["task_id", "rule"], key=lambda c: c.map(order) if c.name == "rule" else c,
                             kind="stable").reset_index(drop=True)
