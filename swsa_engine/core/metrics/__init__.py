"""Batched ranking metrics: AUROC, AUPR, F1-max, FPR@95TPR and Kendall's tau over many tasks in one call.

Every function works along the last axis and is vectorised over all leading axes, so a
single call evaluates hundreds of tasks (or candidates) without a Python loop over rows.
Ragged tasks are padded to a common length and described by a boolean ``mask`` (True =
entry included); excluded entries are ignored completely.

Results equal, row by row and to floating-point tolerance,

* ``sklearn.metrics.roc_auc_score`` for :func:`auroc` (ties included), and
* ``scipy.stats.kendalltau`` with its defaults (tau-b, ``method='auto'``, two-sided) for
  :func:`kendall_tau`, statistic and p-value, including scipy's choice between the exact
  and the asymptotic p-value.

Rows on which a metric is undefined (one class for AUROC; fewer than two entries or a
constant input for Kendall's tau) give NaN and a single :class:`UndefinedMetricWarning`
per call. Malformed input raises :class:`ValueError` saying what was expected, what
arrived and how to fix it.

Modules: :mod:`~swsa_engine.core.metrics.ranks` (:func:`auroc`, :func:`rankdata_midrank`),
:mod:`~swsa_engine.core.metrics.curves` (AUPR, F1-max, FPR at 95 % TPR: :func:`detection_metrics`),
:mod:`~swsa_engine.core.metrics.grouped_curves` (the same against each group of anomalies from one
sort per row: :func:`grouped_detection_metrics`),
:mod:`~swsa_engine.core.metrics.kendall` (:func:`kendall_tau`) and
:mod:`~swsa_engine.core.metrics.inputs` (shared checks, :class:`UndefinedMetricWarning`);
this package re-exports their public API.
"""

from swsa_engine.core.metrics.curves import (DETECTION_METRICS, average_precision, detection_metrics, f1_max, fpr_at_tpr,
                                            sorted_counts)
from swsa_engine.core.metrics.grouped_curves import grouped_detection_metrics
from swsa_engine.core.metrics.inputs import UndefinedMetricWarning
from swsa_engine.core.metrics.kendall import kendall_tau
from swsa_engine.core.metrics.ranks import auroc, rankdata_midrank

__all__ = ["DETECTION_METRICS", "UndefinedMetricWarning", "auroc", "average_precision", "detection_metrics", "f1_max",
           "fpr_at_tpr", "grouped_detection_metrics", "kendall_tau", "rankdata_midrank", "sorted_counts"]
