"""The detector extension point: a candidate of the AUROC cube is (feature source, detector, settings).

A detector turns a task's support features (its bank) into anomaly scores of query features.
Register one with ``@register_detector("name")``; ``create_detector("name", **settings)``
builds it and ``parse_detector("knn(k=5,metric=cosine)")`` builds it from its readable label.
The sweep names a candidate ``<feature source>`` for the paper's default detector
(:data:`DEFAULT_DETECTOR`, kNN with k = 3 on squared L2) and ``<feature source>/<label>`` for
every other detector, e.g. ``vit_b_16/knn(k=5,cosine)``.

Detectors shipped:

* ``knn`` (Bergman et al.'s DN2): the sum of squared L2 distances to the ``k`` nearest bank rows;
  ``metric="cosine"`` L2-normalises every feature first, so the score is ``2 Σ (1 − cos)``.
  Held-out normals, which are in the bank, are scored leave-one-out.
* ``mahalanobis`` (Rippel et al. 2020): squared Mahalanobis distance to a Gaussian fitted to the
  bank (mean + Ledoit–Wolf shrunk covariance, exactly as ``sklearn.covariance.LedoitWolf``);
  computed through the bank's Gram matrix (Woodbury), so 10 images in 2,048 dimensions cost an
  ``S × S`` eigendecomposition per task; leave-one-out refits use a closed-form downdate.
* ``residual`` (InCTRL's image-level residual, training-free): ``K`` references drawn from the
  bank by a seeded hash of (seed, task id, bank position); ``mean`` = squared L2 distance to the
  references' mean, ``min`` = to the nearest reference. A query that is a reference is scored
  against the other ``K − 1``.
* ``nagl`` (NAGL's normal–abnormal guided idea, training-free): kNN score against the normal bank
  minus ``beta`` × kNN score against the task's abnormal references
  (:mod:`swsa_store.references`).
* ``pca``: squared reconstruction error of the query from the bank mean and the bank's top ``n``
  principal axes (on ``pixels@N`` features: PCA of pixels fitted on the task's support only);
  leave-one-out refits by a rank-one downdate through the secular equation.
* ``patch`` (InCTRL's patch-level residual, training-free): the query's most anomalous patch
  against the patches of ``K`` drawn normal references (:mod:`.patch`).
* ``pyod`` (PyOD's models over any embedding, an optional extra): ``pyod(model=iforest,...)``,
  ``lof``, ``ocsvm``, ``ecod``, ``copod``, ``pca``, ``knn``, ``loda``, fitted on each task's bank
  minus each query's left-out rows (:mod:`.pyod`).

One module per family (``knn``, ``mahalanobis``, ``residual``, ``nagl``, ``pca``, ``patch``),
the protocol, registry and input checks in :mod:`.base`, shared batched linear algebra in
:mod:`.linalg`. Every detector scores all tasks of a batch at once through one interface, the
one the sweep calls (:mod:`swsa_engine.run.detector_sweep`)::

    score_tasks(queries (T, W, D), query_mask (T, W), bank (T, S, D), bank_mask (T, S),
                exclude (T, W) or (T, W, E), *, task_ids (T,), abnormal (T, R, D) = None,
                abnormal_mask (T, R) = None) -> (T, W) float64, NaN where ~query_mask
    score_shared(queries (Q, D), bank (T, S, D), bank_mask (T, S), *, task_ids, abnormal,
                 abnormal_mask) -> (T, Q)           # one set of queries shared by every task
    min_bank(has_heldout) -> int                    # smallest bank that can score
    needs = "features" | "patches";  needs_abnormal;  supports_shared;  draws_references;
    max_exclusions (None: any number of left-out rows per query; 1: Mahalanobis, PCA, residual)
    label;  family;  min_abnormal;  bank_hint;  text_prior;  prepare(features)

declared once by :class:`~swsa_engine.core.detectors.base.Detector` (an ABC every detector
subclasses; callers read the attributes, they never probe for them).

``exclude[t, w]`` is the bank row left out for query ``w`` (leave-one-out: a fitted detector is
refitted without it), or -1; ``exclude[t, w, :]`` (T, W, E) the rows a query leaves out (its
origins), -1 padded, for detectors whose ``max_exclusions`` allows more than one (kNN, NAGL,
patch; :func:`check_batch` refuses the others with a one-line error). Everything is float64; results equal plain per-task references
(scikit-learn, scipy, explicit loops) to about 1e-10 relative (``tests/test_detectors_more.py``).
"""

from __future__ import annotations

from swsa_engine.core.detectors.base import (DETECTORS, Detector, check_batch, check_int_setting, check_shared,
                                             create_detector, float_setting, int_setting, list_detectors,
                                             parse_detector, register_detector)
from swsa_engine.core.detectors.knn import DEFAULT_DETECTOR, KnnDetector, NeighbourBank, candidate_name
from swsa_engine.core.detectors.mahalanobis import MahalanobisDetector, ledoit_wolf_from_gram
from swsa_engine.core.detectors.residual import ResidualDetector
from swsa_engine.core.detectors.nagl import NaglDetector
from swsa_engine.core.detectors.pca import PcaDetector, downdated_top_axes
from swsa_engine.core.detectors.patch import PatchDetector, patch_cost
from swsa_engine.core.detectors.pyod import PYOD_MODELS, PyodDetector

__all__ = [
    "DETECTORS", "Detector", "register_detector", "create_detector", "list_detectors", "parse_detector",
    "candidate_name", "DEFAULT_DETECTOR", "check_batch", "check_shared", "check_int_setting", "int_setting",
    "float_setting", "NeighbourBank", "KnnDetector", "MahalanobisDetector", "ledoit_wolf_from_gram",
    "ResidualDetector", "NaglDetector", "PcaDetector", "downdated_top_axes", "PatchDetector", "patch_cost",
    "PyodDetector", "PYOD_MODELS",
]
