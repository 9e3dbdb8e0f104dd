"""Bounded float32 kNN kernels: fast scores with a rigorous error bound each, and exact candidates.

:func:`bounded_knn_shared` (shared queries, many banks) and :func:`bounded_knn_tasks` (per-task
queries and banks) work on rows prepared by :func:`~swsa_engine.core.knn.centred.centre_rows`;
:func:`knn_score_bounded` and :func:`knn_score_batched_bounded` validate plain arrays first.
:func:`exact_knn_candidates` turns float32 candidates into certified exact scores.
"""

from __future__ import annotations

import numpy as np
import torch

from swsa_engine.core.knn.batched import knn_score_batched
from swsa_engine.core.knn.centred import DOT_CHUNK, CentredRows, centre_rows, chunked_dots, score_bounds
from swsa_engine.core.knn.certify import k_smallest_mid, matmul_input_roundoff
from swsa_engine.core.knn.checks import (
    BLOCK_BYTES, EXTRA_CANDIDATES, INF, as_feature_array, as_task_mask, check_block_size, check_task_rows,
    check_usable_rows, distinct_exclusions, exclusion_array, task_exclusions, too_small_message,
)
from swsa_engine.core.knn.gathered import knn_score_gathered, local_bank_index
from swsa_engine.core.validation import as_index_array, check_finite_rows, check_positive_int

__all__ = [
    "bounded_knn_shared", "bounded_knn_tasks", "exact_knn_candidates", "knn_score_bounded", "knn_score_batched_bounded",
]


def bounded_knn_shared(rows: CentredRows, query_ids, bank_ids, k: int = 3, *, block_size: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Float32 kNN scores of shared queries against many banks, each with a rigorous error bound.

    Parameters
    ----------
    rows : prepared features (:func:`centre_rows`) holding every query and bank row.
    query_ids : (Q,) row ids of the queries (never in the banks: no leave-one-out).
    bank_ids : (T, S) row ids of each task's bank, -1 = padding; every task has >= k rows.

    Returns
    -------
    scores : (T, Q) float64, the sum of the k smallest squared L2 distances, computed as
        ``||q||² + ||b||² - 2 q·b`` with the dot products in float32 (one product per query block
        against the union of the banks, then a gather per task).
    bounds : (T, Q) float64 with ``|scores - exact| <= bounds``, ``exact`` the brute-force float64
        score.  Where float32 is not safe for these rows the scores are exact and the bounds 0.
    """
    query_ids = np.asarray(query_ids, dtype=np.int64)
    bank_ids = np.asarray(bank_ids, dtype=np.int64)
    n_t, s = bank_ids.shape
    n_q = query_ids.size
    valid = bank_ids >= 0
    scores = np.empty((n_t, n_q))
    bounds = np.zeros((n_t, n_q))
    if n_t == 0 or n_q == 0:
        return scores, bounds
    if not rows.safe:
        return knn_score_gathered(rows.source[query_ids], rows.source, bank_ids, k, precision="float64"), bounds
    dev = rows.values.device
    used = np.unique(bank_ids[valid])
    n_u, dim = used.size, rows.dim
    local = local_bank_index(bank_ids, used)
    direct = n_t * s <= 1.25 * n_u
    cols = torch.from_numpy(local.T.reshape(-1)).to(dev)  # slot-major: (S*T,)
    bank = torch.zeros((n_u + 1, dim), dtype=torch.float32, device=dev)  # last row: padding, never a neighbour
    bank[:n_u] = rows.gather(torch.from_numpy(used).to(dev))
    norms = torch.from_numpy(np.append(rows.sq_norms[used], INF).astype(np.float32)).to(dev)
    if direct:
        bank, norms = bank[cols], norms[cols]
    n_cols = bank.shape[0]
    bank_t = bank.T.contiguous()  # (D, n_cols): each DOT_CHUNK slice of rows is one operand
    del bank
    per_query = 4 * (2 * n_cols + n_t * s * (0 if direct else 1) + dim) + 16 * n_t * k
    qb = block_size or max(1, min(n_q, int(BLOCK_BYTES // per_query)))
    nq = rows.sq_norms[query_ids]
    nq_t = torch.from_numpy(nq.astype(np.float32)).to(dev)
    q_ids = torch.from_numpy(query_ids).to(dev)
    for q0 in range(0, n_q, qb):
        q1 = min(n_q, q0 + qb)
        block = rows.gather(q_ids[q0:q1])
        dot = block[:, :DOT_CHUNK] @ bank_t[:DOT_CHUNK]
        part = torch.empty_like(dot) if dim > DOT_CHUNK else None
        for lo in range(DOT_CHUNK, dim, DOT_CHUNK):  # fresh product per slice, added after
            dot.add_(torch.mm(block[:, lo : lo + DOT_CHUNK], bank_t[lo : lo + DOT_CHUNK], out=part))
        dist = dot.mul_(-2.0).add_(norms[None, :]).add_(nq_t[q0:q1, None])
        g = dist.view(q1 - q0, s, n_t) if direct else dist.index_select(1, cols).view(q1 - q0, s, n_t)
        del dot, dist, part
        scores[:, q0:q1] = k_smallest_mid(g, k).to(torch.float64).sum(-1).T.cpu().numpy()
    max_nb = np.where(valid, rows.sq_norms[np.maximum(bank_ids, 0)], 0.0).max(axis=1)
    bounds[:] = score_bounds(k, dim, nq[None, :], max_nb[:, None], scores, matmul_input_roundoff(dev))
    return scores, bounds


def bounded_knn_tasks(rows: CentredRows, query_ids, bank_ids, k: int = 3, *, exclude=None,
                      block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Float32 kNN scores of per-task queries against per-task banks, each with an error bound.

    Parameters
    ----------
    rows : prepared features (:func:`centre_rows`) holding every query and bank row.
    query_ids : (T, W) row ids, -1 = padding (its score is NaN, its bound 0).
    bank_ids : (T, S) row ids, -1 = padding; every query keeps >= k usable rows (else ValueError).
    exclude : (T, W) position in the task's bank of a row each query must not count (leave-one-out),
        or -1; or (T, W, E), E such positions per query (-1 padded).  Positions of padding rows and
        repeats count as none; usable rows = real bank rows minus the query's distinct excluded ones.

    Returns ``scores`` (T, W) float64 and ``bounds`` (T, W) with ``|scores - exact| <= bounds``
    (see :func:`bounded_knn_shared`); chunks of tasks keep memory under ``block_bytes``.
    """
    query_ids = np.asarray(query_ids, dtype=np.int64)
    bank_ids = np.asarray(bank_ids, dtype=np.int64)
    n_t, n_w = query_ids.shape
    s = bank_ids.shape[1]
    scores = np.full((n_t, n_w), np.nan)
    bounds = np.zeros((n_t, n_w))
    present = query_ids >= 0
    if n_t == 0 or n_w == 0 or not present.any():
        return scores, bounds
    excl = _task_exclusions(exclude, present, bank_ids, k)
    if not rows.safe:
        scores[:] = knn_score_batched(rows.source[np.maximum(query_ids, 0)], rows.source[np.maximum(bank_ids, 0)], k,
                                      query_mask=present, bank_mask=bank_ids >= 0, exclude=excl, precision="float64")
        return scores, bounds
    dim = rows.dim
    u_in = matmul_input_roundoff(rows.values.device)
    for tasks, cols, _, dist, nq, max_nb in _task_distances(rows, query_ids, bank_ids, excl, block_bytes):
        smallest = torch.topk(dist, k, dim=2, largest=False, sorted=False).values.to(torch.float64).sum(-1).cpu().numpy()
        del dist
        mine = present[tasks[:, None], cols]
        scores[tasks[:, None], cols] = np.where(mine, smallest, np.nan)
        bounds[tasks[:, None], cols] = np.where(mine, score_bounds(k, dim, nq, max_nb, np.nan_to_num(smallest), u_in), 0.0)
    return scores, bounds


def _task_exclusions(exclude, present: np.ndarray, bank_ids: np.ndarray, k: int) -> np.ndarray:
    """``exclude`` of :func:`bounded_knn_tasks` / :func:`exact_knn_candidates` ((T, W), (T, W, E) or
    None) as distinct real positions (T, W, E'); raise unless every query keeps >= k usable rows."""
    in_bank = bank_ids >= 0
    if exclude is None:
        excl = np.full((*present.shape, 1), -1, dtype=np.int64)
    else:
        excl = exclusion_array(exclude, present.shape, bank_ids.shape[1], "a position in that task's bank", "(T, W)")
        excl = distinct_exclusions(excl, present, in_bank)
    check_usable_rows(k, present, in_bank, excl)
    return excl


def _task_chunks(n_queries: np.ndarray, n_bank: np.ndarray, dim: int, block_bytes: int) -> list[np.ndarray]:
    """Tasks grouped into chunks of similar size (sorted by query count) whose trimmed float32
    operands and distance block fit ``block_bytes``."""
    order = np.lexsort((n_bank, n_queries))
    chunks, current, top_w, top_s = [], [], 0, 0
    for t in order:
        w, s = max(top_w, int(n_queries[t])), max(top_s, int(n_bank[t]))
        if current and (len(current) + 1) * (8 * dim * (w + s) + 12 * w * s) > block_bytes:
            chunks.append(np.array(current))
            current, w, s = [], int(n_queries[t]), int(n_bank[t])
        current.append(t)
        top_w, top_s = w, s
    if current:
        chunks.append(np.array(current))
    return chunks


def _task_distances(rows: CentredRows, query_ids: np.ndarray, bank_ids: np.ndarray, excl: np.ndarray, block_bytes: int):
    """Yield ``(tasks, cols, bank_cols, dist, nq, max_nb)`` per chunk of tasks.

    Each task's queries and bank rows are packed to the front (padding removed) and tasks of
    similar size share a chunk, so no product is spent on padding beyond the chunk's largest
    task.  ``tasks`` (t,) rows of the input; ``cols`` (t, W') and ``bank_cols`` (t, S') the input
    columns of the packed queries and bank rows; ``dist`` (t, W', S') float32 squared distances
    of the bounded kernels (+inf for padding and excluded rows); ``nq`` (t, W') the queries'
    squared norms; ``max_nb`` (t, 1) each task's largest bank squared norm.  ``excl`` (T, W, E).
    """
    dev = rows.values.device
    present = query_ids >= 0
    in_bank = bank_ids >= 0
    q_order = np.argsort(~present, axis=1, kind="stable")
    b_order = np.argsort(~in_bank, axis=1, kind="stable")
    b_position = np.argsort(b_order, axis=1)  # input bank column → packed column
    packed_excl = np.where(excl >= 0, b_position[np.arange(len(excl))[:, None, None], np.maximum(excl, 0)], -1)
    n_present, n_bank = present.sum(axis=1), in_bank.sum(axis=1)
    for tasks in _task_chunks(n_present, n_bank, rows.dim, block_bytes):
        w, s = int(n_present[tasks].max()), int(n_bank[tasks].max())
        if w == 0:
            continue
        cols, bank_cols = q_order[tasks, :w], b_order[tasks, :s]
        q_ids = query_ids[tasks[:, None], cols]
        b_ids = bank_ids[tasks[:, None], bank_cols]
        q32 = rows.gather(torch.from_numpy(q_ids).to(dev))
        b32 = rows.gather(torch.from_numpy(b_ids).to(dev))
        dist = chunked_dots(q32, b32).mul_(-2.0)
        del q32, b32
        nb = np.where(b_ids >= 0, rows.sq_norms[np.maximum(b_ids, 0)], INF)
        nq = np.where(q_ids >= 0, rows.sq_norms[np.maximum(q_ids, 0)], 0.0)
        dist.add_(torch.from_numpy(nb.astype(np.float32)).to(dev)[:, None, :])
        dist.add_(torch.from_numpy(nq.astype(np.float32)).to(dev)[:, :, None])
        ex = packed_excl[tasks[:, None], cols]  # (t, W', E)
        ti, wi, ei = np.nonzero((ex >= 0) & (ex < s) & (q_ids >= 0)[:, :, None])
        if ti.size:
            dist[torch.from_numpy(ti).to(dev), torch.from_numpy(wi).to(dev), torch.from_numpy(ex[ti, wi, ei]).to(dev)] = INF
        max_nb = np.where(b_ids >= 0, nb, 0.0).max(axis=1, initial=0.0)[:, None]
        yield tasks, cols, bank_cols, dist, nq, max_nb


def exact_knn_candidates(rows: CentredRows, query_ids, bank_ids, k: int, *, exclude=None, extra: int = EXTRA_CANDIDATES,
                         block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN scores of per-task queries from float32 candidates, certified one by one.

    The ``k + extra`` nearest bank rows by the float32 distances of :func:`bounded_knn_tasks`
    are the candidates; their distances are recomputed in float64 from the input rows
    (``((q - b) ** 2).sum()``, as brute force does) and the ``k`` smallest summed.  The score is
    exact when no other row can be closer than the ``k``-th exact candidate distance: the
    next float32 distance minus its error bound is not below it.

    Parameters as :func:`bounded_knn_tasks`.  Returns ``scores`` (T, W) float64 (NaN for padding)
    and ``certified`` (T, W) bool (True for padding); uncertified scores need the full
    computation (rare: near-duplicate bank rows).  Float32 must be safe for ``rows``.
    """
    query_ids = np.asarray(query_ids, dtype=np.int64)
    bank_ids = np.asarray(bank_ids, dtype=np.int64)
    n_t, n_w = query_ids.shape
    s = bank_ids.shape[1]
    present = query_ids >= 0
    scores = np.full((n_t, n_w), np.nan)
    certified = ~present
    if not present.any():
        return scores, certified
    if not rows.safe:
        raise ValueError("exact_knn_candidates needs rows that are safe in float32 (rows.safe); use knn_score_batched")
    excl = _task_exclusions(exclude, present, bank_ids, k)
    m = min(k + extra, s)
    dim = rows.dim
    u_in = matmul_input_roundoff(rows.values.device)
    for tasks, cols, bank_cols, dist, nq, max_nb in _task_distances(rows, query_ids, bank_ids, excl, block_bytes):
        width = dist.shape[2]
        ranked = torch.topk(dist, min(m + 1, width), dim=2, largest=False, sorted=True)
        del dist
        values = ranked.values.to(torch.float64).cpu().numpy()
        positions = ranked.indices[..., :m].cpu().numpy()
        boundary = values[..., m] if m < width else np.full(values.shape[:2], INF)
        tt, ww = np.nonzero(query_ids[tasks[:, None], cols] >= 0)
        cand_ids = bank_ids[tasks[tt, None], bank_cols[tt[:, None], positions[tt, ww]]]  # (n, m')
        usable = np.isfinite(values[tt, ww, : positions.shape[2]])  # padding / excluded rows are +inf
        error = score_bounds(1, dim, nq[tt, ww], max_nb[tt, 0], 0.0, u_in)  # one distance's bound
        q_ids = query_ids[tasks[tt], cols[tt, ww]]
        # where the float32 gap after the k-th candidate exceeds both errors, the k nearest rows are
        # certain: only their distances are recomputed (the common case)
        gap = (np.isfinite(values[tt, ww, k]) if values.shape[2] > k else np.zeros(tt.size, bool))
        if values.shape[2] > k:
            gap &= values[tt, ww, k] - error >= values[tt, ww, k - 1] + error
        near = _exact_distances(rows, q_ids[gap], cand_ids[gap, :k], usable[gap, :k], block_bytes)
        scores[tasks[tt[gap]], cols[tt[gap], ww[gap]]] = near.sum(axis=1)
        certified[tasks[tt[gap]], cols[tt[gap], ww[gap]]] = True
        rest = ~gap
        exact = _exact_distances(rows, q_ids[rest], cand_ids[rest], usable[rest], block_bytes)
        exact.sort(axis=1)
        scores[tasks[tt[rest]], cols[tt[rest], ww[rest]]] = exact[:, :k].sum(axis=1)
        certified[tasks[tt[rest]], cols[tt[rest], ww[rest]]] = boundary[tt[rest], ww[rest]] - error[rest] >= exact[:, k - 1]
    return scores, certified


def _exact_distances(rows: CentredRows, query_ids: np.ndarray, candidate_ids: np.ndarray, usable: np.ndarray,
                     block_bytes: int) -> np.ndarray:
    """(n, m) float64 squared distances ``((q - b) ** 2).sum()`` from the input rows (+inf where not usable)."""
    n, m = candidate_ids.shape
    out = np.full((n, m), INF)
    if n == 0 or m == 0:
        return out
    # small blocks: the float64 temporaries stay in cache and their memory is reused
    per = max(1, min(int(block_bytes // max(1, 16 * rows.dim * (m + 1))), (8 << 20) // max(1, 8 * rows.dim * m)))
    raw = rows.source.dtype == np.float32  # rows.values are the input rows themselves
    dev = rows.values.device
    for lo in range(0, n, per):
        hi = min(n, lo + per)
        if raw:
            q = rows.values.index_select(0, torch.from_numpy(query_ids[lo:hi]).to(dev)).double()
            b = rows.values.index_select(0, torch.from_numpy(np.maximum(candidate_ids[lo:hi], 0).reshape(-1)).to(dev))
            diff = torch.sub(b.view(hi - lo, m, -1), q[:, None, :])  # float64: the difference of float32 rows is exact
            dist = torch.linalg.vector_norm(diff, dim=-1).square_().cpu().numpy()
        else:
            diff = rows.source[np.maximum(candidate_ids[lo:hi], 0)].astype(np.float64) - rows.source[query_ids[lo:hi], None, :]
            dist = np.einsum("nmd,nmd->nm", diff, diff)
        out[lo:hi] = np.where(usable[lo:hi], dist, INF)
    return out


def knn_score_bounded(queries, features, bank_index, k: int = 3, *, device="cpu", block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fast kNN scores of shared queries against many banks, each with a rigorous error bound.

    The float32 form of :func:`~swsa_engine.core.knn.gathered.knn_score_gathered` without its exact refinement: for rank
    statistics (AUROC) most scores need no more, and the caller refines only the scores whose
    bound makes an order uncertain (``swsa_engine.run.sweep``).  Queries are never in the banks
    (no leave-one-out).  Validates its input, then runs :func:`bounded_knn_shared` on rows
    centred on the banks' mean.

    Parameters
    ----------
    queries : (Q, D) real array.
    features : (N, D) real array; only rows named in ``bank_index`` are read.
    bank_index : (T, S) int row indices into ``features``, -1 = padding; every task has >= k rows.

    Returns
    -------
    scores : (T, Q) float64; bounds : (T, Q) float64 with ``|scores - exact| <= bounds``:
        ``≈ 2 k γ_h ||q|| max||b||`` with ``h = DOT_CHUNK + D / DOT_CHUNK`` (Higham's
        ``γ_h = h u / (1 - h u)`` holds for any summation order inside a BLAS kernel), plus the
        rounding of the centred rows and their norms to float32.
    """
    k = check_positive_int(k, "k", "k=3")
    q = as_feature_array(queries, "queries", 2, "(Q, D)")
    f = as_feature_array(features, "features", 2, "(N, D)")
    if np.ndim(bank_index) != 2 or q.shape[1] != f.shape[1]:
        raise ValueError(f"bank_index must be (T, S) and queries/features must share D; got {np.shape(bank_index)}, {q.shape}, {f.shape}")
    bi = as_index_array(bank_index, "bank_index", np.shape(bank_index), high=f.shape[0], what="a row of features", shape_doc="(T, S)")
    valid = bi >= 0
    short = np.flatnonzero(valid.sum(axis=1) < k)
    if short.size:
        raise ValueError(too_small_message(k, [(int(t), int(valid[t].sum())) for t in short], "= bank rows"))
    block_size = check_block_size(block_size)
    if bi.shape[0] == 0 or q.shape[0] == 0:
        return np.empty((bi.shape[0], q.shape[0])), np.zeros((bi.shape[0], q.shape[0]))
    used = np.unique(bi[valid])
    check_finite_rows(q, "queries")
    check_finite_rows(f[used], "features rows used by a bank")
    dtype = np.result_type(q.dtype, f.dtype, np.float32)
    stacked = np.concatenate([f[used].astype(dtype, copy=False), q.astype(dtype, copy=False)])
    local = np.where(valid, np.searchsorted(used, np.maximum(bi, 0)), -1)
    rows = centre_rows(stacked, np.arange(len(stacked)), np.arange(used.size), device=device)
    return bounded_knn_shared(rows, used.size + np.arange(q.shape[0]), local, k, block_size=block_size)


def knn_score_batched_bounded(queries, banks, k: int = 3, *, query_mask=None, bank_mask=None, exclude=None,
                              device="cpu", block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Float32 kNN scores of per-task queries against per-task banks, each with an error bound.

    The bounded form of :func:`~swsa_engine.core.knn.batched.knn_score_batched` (same parameters, leave-one-out included):
    returns ``scores`` (T, Q) float64 (NaN where ``query_mask`` is False) and ``bounds`` (T, Q)
    with ``|scores - exact| <= bounds`` (0 where masked).  Validates its input, then runs
    :func:`bounded_knn_tasks` on rows centred on the mean of all banks; ``block_size`` tasks per chunk.
    """
    k = check_positive_int(k, "k", "k=3")
    q = as_feature_array(queries, "queries", 3, "(T, Q, D)")
    b = as_feature_array(banks, "banks", 3, "(T, S, D)")
    n_t, n_q, dim = q.shape
    if b.shape[0] != n_t or b.shape[2] != dim:
        raise ValueError(f"queries (T, Q, D) = {q.shape} and banks (T, S, D) = {b.shape} must agree on T and D")
    s = b.shape[1]
    qmask = as_task_mask(query_mask, "query_mask", (n_t, n_q), "(T, Q)")
    bmask = as_task_mask(bank_mask, "bank_mask", (n_t, s), "(T, S)")
    block_size = check_block_size(block_size)
    excl = np.full((n_t, n_q, 1), -1, dtype=np.int64) if exclude is None else task_exclusions(exclude, qmask, bmask)
    check_task_rows(k, q, b, qmask, bmask, excl)
    if n_t == 0 or n_q == 0 or not qmask.any():
        return np.full((n_t, n_q), np.nan), np.zeros((n_t, n_q))
    dtype = np.result_type(q.dtype, b.dtype, np.float32)
    stacked = np.concatenate([b.reshape(-1, dim).astype(dtype, copy=False), q.reshape(-1, dim).astype(dtype, copy=False)])
    bank_ids = np.where(bmask, np.arange(n_t * s).reshape(n_t, s), -1)
    query_ids = np.where(qmask, n_t * s + np.arange(n_t * n_q).reshape(n_t, n_q), -1)
    rows = centre_rows(stacked, np.r_[bank_ids[bmask], query_ids[qmask]], bank_ids[bmask], device=device)
    per_task = 4 * dim * (n_q + s) * 2 + 4 * n_q * s * 3
    budget = BLOCK_BYTES if block_size is None else block_size * per_task
    return bounded_knn_tasks(rows, query_ids, bank_ids, k, exclude=excl, block_bytes=budget)
