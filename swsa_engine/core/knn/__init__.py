"""kNN anomaly scores (DN2, Bergman et al.): sum of squared L2 distances to the k nearest bank rows.

Three pure functions over arrays, all returning float64:

* :func:`knn_score` — one bank ``(S, D)``, queries ``(Q, D)`` → ``(Q,)`` (FAISS on CPU).
* :func:`knn_score_batched` — ``T`` tasks at once, each with its own padded queries and bank
  → ``(T, Q)`` (torch batched matrix products over chunks of tasks).
* :func:`knn_score_gathered` — the same queries ``(Q, D)`` against ``T`` banks given as row
  indices into a shared feature matrix → ``(T, Q)`` (one distance block, then a gather).

Exactness
---------
The result equals brute force — ``np.sort(((q - bank) ** 2).sum(-1))[:k].sum()`` in float64 —
to about 1e-10 relative, and this is *checked per score*, not hoped for.  Distances are first
computed the fast way, ``||q||² + ||b||² - 2 q·b`` with one matrix product, whose rounding
error is bounded a priori by ``c · (||q||² + max ||b||²)`` where ``c`` follows from the
dimension and the unit roundoff of the arithmetic used (:func:`~swsa_engine.core.knn.certify.error_coefficient`).  Then:

* float32 arithmetic (FAISS, and torch on CUDA by default): the ``k + 3`` best candidates are
  re-computed exactly in float64 as ``((q - b) ** 2).sum(-1)``, the ``k`` smallest exact ones are
  summed, and the selection is certified when no row outside the candidates can be closer
  than the ``k``-th exact distance (candidate boundary minus the error bound).
* float64 arithmetic (torch on CPU, the default there for the batched forms): the sum of the
  ``k`` smallest expanded-form distances is within ``k · bound`` of the true sum whatever rows
  were picked, so it is accepted when ``k · bound <= 1e-10 · sum``.  On a 2-core CPU a float64
  GEMM costs about 2x a float32 one, while gathering ``T·Q·k`` bank rows for a float64
  refinement costs ~20x, so for the many-task forms float64 is the fast exact route.

A score that fails its certificate (near-duplicate points, distances tiny compared with the
norms, exactly tied rows) is recomputed exactly from the differences against every usable row
of its bank.  Counts of such fall-backs are logged at DEBUG level.

Modules
-------
:mod:`~swsa_engine.core.knn.checks` (input checks, constants, block plans),
:mod:`~swsa_engine.core.knn.certify` (error bounds, certificates, exact fall-backs),
:mod:`~swsa_engine.core.knn.one_bank` (:func:`knn_score`), :mod:`~swsa_engine.core.knn.batched`
(:func:`knn_score_batched`), :mod:`~swsa_engine.core.knn.gathered` (:func:`knn_score_gathered`),
:mod:`~swsa_engine.core.knn.centred` (:class:`CentredRows`, :func:`centre_rows`) and
:mod:`~swsa_engine.core.knn.bounded` (the float32 kernels with error bounds).  This package
re-exports their public API.
"""

from swsa_engine.core.knn.batched import knn_score_batched
from swsa_engine.core.knn.bounded import (
    bounded_knn_shared, bounded_knn_tasks, exact_knn_candidates, knn_score_batched_bounded, knn_score_bounded,
)
from swsa_engine.core.knn.centred import CentredRows, centre_rows
from swsa_engine.core.knn.gathered import knn_score_gathered
from swsa_engine.core.knn.one_bank import knn_score

__all__ = ["knn_score", "knn_score_batched", "knn_score_batched_bounded", "knn_score_gathered", "knn_score_bounded",
           "CentredRows", "centre_rows", "bounded_knn_shared", "bounded_knn_tasks", "exact_knn_candidates"]
