"""The sweep's kNN scoring pass: one candidate's AUROCs for one task group (:func:`score_group`).

Scores are computed in float32 with a rigorous error bound each
(:func:`swsa_engine.core.knn.bounded_knn_tasks`, :func:`~swsa_engine.core.knn.bounded_knn_shared`); the
few whose bound could change an order that an AUROC or a hardest-N set depends on
(:mod:`swsa_engine.core.certified`) are recomputed exactly, so every AUROC
equals the one from exact float64 scores. Queries and AUROCs are those of every pass
(:mod:`swsa_engine.run.group_scoring`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from swsa_engine.core.certified import order_uncertain, synthetic_uncertain
from swsa_engine.core.knn import bounded_knn_shared, bounded_knn_tasks, centre_rows, exact_knn_candidates, knn_score_batched
from swsa_engine.core.protocol import DEFAULT_PROTOCOL
from swsa_engine.run.group_scoring import (empty_result, features_for, kernel_exclude, own_real_queries, put_real,
                                           short_banks, synthetic_queries, timed_stage, usable_banks,
                                           validation_aurocs, validation_exclusions)
from swsa_engine.run.task_groups import TaskGroup


@dataclass
class _KnnPass:
    """What every kNN call of one candidate over the scoreable tasks of one group shares."""

    features: np.ndarray  # (N, D) the candidate's rows, for exact recomputation
    prepared: object  # the rows the group uses, centred (swsa_engine.core.knn.CentredRows)
    support: np.ndarray  # (T', S) bank image ids, -1 padded
    k: int
    device: str
    chunk_bytes: int
    out: dict  # the result being built: knn_flops add up in it
    exact_scores: bool = False  # refine every score, not only those an AUROC depends on

    def scores(self, queries: np.ndarray, exclude: np.ndarray | None):
        """Float32 scores with error bounds of per-task queries (T', W): :func:`_batched_knn`."""
        with timed_stage(self.out["stage_seconds"], "knn"):
            return _batched_knn(self.prepared, queries, self.support, exclude, self.k, self.device, self.chunk_bytes,
                                self.out)

    def refine(self, queries: np.ndarray, exclude: np.ndarray | None, scores: np.ndarray, uncertain: np.ndarray) -> int:
        """Exact scores in place of ``scores[uncertain]``: :func:`_refine`."""
        with timed_stage(self.out["stage_seconds"], "refine"):
            return _refine(self.features, self.prepared, queries, self.support, exclude, scores, uncertain, self.k,
                           self.device, self.chunk_bytes, self.out)


def score_group(
    features: np.ndarray,
    usable: np.ndarray,
    group: TaskGroup,
    sources: list[str],
    *,
    k: int = 3,
    hardest: tuple[int, ...] = (10, 5),
    device: str = "cpu",
    chunk_bytes: int = 256 << 20,
    protocol: str = DEFAULT_PROTOCOL,
    exact_scores: bool = False,
) -> dict:
    """AUROCs of one candidate for the tasks of one dataset.

    Parameters
    ----------
    features : (N, D) the candidate's embeddings for every catalogued image.
    usable : (N,) bool, rows that hold a finite embedding.
    sources : synthetic sources to evaluate (missing ones give NaN).
    protocol : the validation protocol (:mod:`swsa_engine.core.protocol`): which bank rows each
        synthetic query is scored without (``"leak-free"``: its origins; ``"paper"``: held-out
        normals leave-one-out only). Real queries are scored against the whole bank.
    exact_scores : refine every score to the float64 brute-force value, not only those an AUROC
        depends on (the AUROCs are the same either way; the kept per-image scores then equal an
        exported bundle's to ~1e-12 instead of ~1e-5 relative; costs a float64 pass over the k
        nearest rows of every score).

    Returns a dict: ``real`` (T, 2), ``synthetic`` (T, V) over ``sources`` then their hardest
    variants, ``per_class`` (T, G), ``skips`` [(task_id, reason)], ``knn_flops`` (the float32
    first tier's products), ``refine_flops`` (the exact recomputation's), ``stage_seconds`` (seconds
    per stage: prepare, knn, certify, refine, aurocs), ``refined_scores`` and ``scores`` (the per-image scores behind the AUROCs, for
    :class:`~swsa_engine.run.cube_layout.ScoreLayout`: ``rows`` (T',) the scored tasks, ``real``
    (T', Q) scores of ``group.real_ids``, ``queries`` (T', W) the synthetic queries and
    ``synthetic`` (T', W) their scores).

    Scores are computed in float32 with a rigorous error bound each; the few whose bound could
    change an order that an AUROC or a hardest-N set depends on (:func:`~swsa_engine.core.certified.order_uncertain`,
    :func:`~swsa_engine.core.certified.hardest_uncertain`) are recomputed exactly (``refined_scores`` counts them), so every
    AUROC equals the one from exact float64 scores.
    """
    support, _, scoreable, skips = usable_banks(group, usable, (k, k + 1), f"k={k}")
    out = empty_result(group, sources, hardest, skips)
    planned = _scoreable_tasks(group, usable, sources, np.flatnonzero(scoreable), support, k, protocol, out)
    if planned is None:
        return out
    rows, support, queries, widths, exclude = planned
    real_ok = usable[group.real_ids]
    # one centre and one float64 norm per row for every kernel call of this group
    with timed_stage(out["stage_seconds"], "prepare"):
        prepared = centre_rows(features, np.r_[support[support >= 0], group.real_ids[real_ok], queries[queries >= 0]],
                               support[support >= 0], device=device)
    knn = _KnnPass(features, prepared, support, k, device, chunk_bytes, out, exact_scores)
    real_scores, refined_real = _real_knn_scores(knn, group, rows, real_ok)
    synth_scores, refined_synthetic = _synthetic_knn_scores(knn, queries, kernel_exclude(exclude), widths, hardest)
    out["refined_scores"] = refined_real + refined_synthetic
    with timed_stage(out["stage_seconds"], "aurocs"):
        aurocs = validation_aurocs(group, rows, real_scores, queries, synth_scores, widths, sources, hardest)
    for key in ("real", "synthetic", "per_class"):
        out[key][rows] = aurocs[key]
    out["scores"] = {"rows": rows, "real": real_scores, "queries": queries, "synthetic": synth_scores}
    return out


def _scoreable_tasks(group: TaskGroup, usable: np.ndarray, sources: list[str], rows: np.ndarray, support: np.ndarray,
                     k: int, protocol: str, out: dict):
    """``(rows, support, queries, widths, exclude)`` of the tasks ``rows`` that keep at least ``k + 1``
    bank rows once each synthetic query's origins are left out (the others' skips added to ``out``),
    or None when no task is left."""
    if rows.size == 0:
        return None
    support = support[rows]
    queries, widths = synthetic_queries(group, rows, sources, usable)
    exclude = validation_exclusions(group, rows, support, queries, widths, sources, protocol)
    short, short_skips = short_banks(group, rows, support, exclude, (k, k + 1), f"k={k}")
    if short.any():  # too few bank rows once a query's origins are left out
        out["skips"] += short_skips
        rows, support, queries, exclude = rows[~short], support[~short], queries[~short], exclude[~short]
    return (rows, support, queries, widths, exclude) if rows.size else None


def _real_knn_scores(knn: _KnnPass, group: TaskGroup, rows: np.ndarray, real_ok: np.ndarray) -> tuple[np.ndarray, int]:
    """(T', Q) kNN scores of ``group.real_ids`` for tasks ``rows`` (NaN where not the task's or
    ``real_ok`` (Q,) is False), exact wherever an AUROC depends on it; and how many were refined."""
    support = knn.support
    member = (group.real_label[rows] >= 0) & real_ok[None, :]
    widest = int(member.sum(axis=1).max(initial=0))
    real_scores = np.full((len(rows), len(group.real_ids)), np.nan)
    dense_cost = int(real_ok.sum()) * len(np.unique(support[support >= 0]))
    sparse_cost = widest * len(rows) * support.shape[1]
    if dense_cost <= sparse_cost:
        # tasks share their real validation images (one-vs-rest over classes): one distance
        # block of every query against the union of the banks, gathered per task
        query_ids = group.real_ids[real_ok]
        with timed_stage(knn.out["stage_seconds"], "knn"):
            approx, bounds = bounded_knn_shared(knn.prepared, query_ids, support, knn.k)
        knn.out["knn_flops"] += 2.0 * dense_cost * knn.features.shape[1]
        labels = np.where(member[:, real_ok], group.real_label[rows][:, real_ok], -1)
        with timed_stage(knn.out["stage_seconds"], "certify"):
            uncertain = (labels >= 0) if knn.exact_scores else order_uncertain(approx, bounds, labels)
        refined = knn.refine(np.broadcast_to(query_ids, approx.shape), None, approx, uncertain)
        real_scores[:, real_ok] = approx
        return real_scores, refined
    # each task has its own real images (a product's test set): per-task queries
    order, present, own_queries = own_real_queries(group, member, widest)
    scores, bounds = knn.scores(own_queries, None)
    labels = np.where(present, np.take_along_axis(group.real_label[rows], order, axis=1), -1)
    with timed_stage(knn.out["stage_seconds"], "certify"):
        uncertain = (labels >= 0) if knn.exact_scores else order_uncertain(scores, bounds, labels)
    refined = knn.refine(own_queries, None, scores, uncertain)
    put_real(real_scores, order, present, scores, member)
    return real_scores, refined


def _synthetic_knn_scores(knn: _KnnPass, queries: np.ndarray, exclude: np.ndarray, widths: list[int],
                          hardest: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """(T', W) kNN scores of the :func:`synthetic_queries` ``queries`` (held-out normals, then each
    source's anomalies), each without the bank rows ``exclude`` (T', W) or (T', W, E) names, exact
    wherever a synthetic AUROC or hardest-N set depends on it; and how many were refined."""
    scores, bounds = knn.scores(queries, exclude)
    with timed_stage(knn.out["stage_seconds"], "certify"):
        uncertain = (queries >= 0) if knn.exact_scores else synthetic_uncertain(scores, bounds, queries >= 0, widths, hardest)
    refined = knn.refine(queries, exclude, scores, uncertain)
    return scores, refined


def _batched_knn(features, queries, support, exclude, k, device, chunk_bytes, out: dict, exact: bool = False):
    """kNN scores of per-task queries ``(T, W)`` (image ids, -1 padded) against per-task banks
    ``(T, S)``, in chunks of tasks that bound memory; NaN for padding.

    ``features``: the prepared rows (:class:`~swsa_engine.core.knn.CentredRows`) → ``(scores, bounds)``
    (T, W) from the float32 kernel with error bounds (:func:`~swsa_engine.core.knn.bounded_knn_tasks`);
    with ``exact``, the (N, D) array → exact scores and zero bounds.  Adds the floating-point
    operations to ``out["knn_flops"]`` (the first tier) or, with ``exact``, ``out["refine_flops"]``.
    """
    scores = np.full(queries.shape, np.nan)
    bounds = np.zeros(queries.shape)
    if queries.shape[1] == 0 or len(queries) == 0:
        return scores, bounds
    if not exact:
        out["knn_flops"] += 2.0 * (queries >= 0).sum() * support.shape[1] * features.dim
        return bounded_knn_tasks(features, queries, support, k, exclude=exclude, block_bytes=chunk_bytes)
    dim = features.shape[1]
    per_task_bytes = max(1, (queries.shape[1] + support.shape[1]) * dim * 4 * 3)
    chunk = max(1, chunk_bytes // per_task_bytes)
    for lo in range(0, len(queries), chunk):
        hi = min(lo + chunk, len(queries))
        q_ids, b_ids = queries[lo:hi], support[lo:hi]
        out["refine_flops"] += 2.0 * q_ids.size * b_ids.shape[1] * dim
        args = (features_for(features, q_ids), features_for(features, b_ids))
        kwargs = dict(k=k, query_mask=q_ids >= 0, bank_mask=b_ids >= 0,
                      exclude=None if exclude is None else exclude[lo:hi], device=device)
        scores[lo:hi] = knn_score_batched(*args, **kwargs)
    return scores, bounds


def _refine(features, prepared, queries, support, exclude, scores, uncertain, k, device, chunk_bytes, out) -> int:
    """Replace ``scores[uncertain]`` (T, W) in place by exact ones; returns how many.

    Exact scores come from float32 candidates recomputed in float64 from the differences
    (:func:`~swsa_engine.core.knn.exact_knn_candidates`: only the ``k`` nearest where the float32 gap
    certifies them, else ``k + 3``) — for small banks too: gathering a few candidate rows moves far
    less memory than the differences to every bank row.  The few it cannot certify, and every
    score where float32 is not safe, come from the float64 computation over the whole bank.
    """
    rows = np.flatnonzero(uncertain.any(axis=1))
    if rows.size == 0:
        return 0
    width = int(uncertain.sum(axis=1).max())
    order = np.argsort(~uncertain[rows], axis=1, kind="stable")[:, :width]
    present = np.take_along_axis(uncertain[rows], order, axis=1)
    query_ids = np.where(present, np.take_along_axis(queries[rows], order, axis=1), -1)
    excluded = None if exclude is None else _where_query(present, _take_queries(exclude[rows], order), -1)
    if prepared.safe:
        exact, certified = exact_knn_candidates(prepared, query_ids, support[rows], k, exclude=excluded, block_bytes=chunk_bytes)
        out["refine_flops"] += 2.0 * present.sum() * support.shape[1] * prepared.dim
        left = present & ~certified
    else:
        exact, left = np.full(query_ids.shape, np.nan), present
    if left.any():
        again = np.flatnonzero(left.any(axis=1))
        redo = np.where(left[again], query_ids[again], -1)
        redo_excluded = None if excluded is None else _where_query(left[again], excluded[again], -1)
        full, _ = _batched_knn(features, redo, support[rows][again], redo_excluded, k, device, chunk_bytes, out, exact=True)
        exact[again] = np.where(left[again], full, exact[again])
        if prepared.safe:
            out["uncertified_refinements"] = out.get("uncertified_refinements", 0) + int(left.sum())
    block = scores[rows]
    np.put_along_axis(block, order, np.where(present, exact, np.take_along_axis(block, order, axis=1)), axis=1)
    scores[rows] = block
    return int(uncertain.sum())


def _take_queries(exclude: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``exclude`` (T, W) or (T, W, E) with its query axis reordered by ``order`` (T, W')."""
    return np.take_along_axis(exclude, order if exclude.ndim == 2 else order[..., None], axis=1)


def _where_query(mask: np.ndarray, exclude: np.ndarray, fill: int) -> np.ndarray:
    """``exclude`` (T, W) or (T, W, E) where the query ``mask`` (T, W) holds, else ``fill``."""
    return np.where(mask if exclude.ndim == 2 else mask[..., None], exclude, fill)
