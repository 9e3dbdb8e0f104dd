"""knn_score_batched: many tasks at once, each with its own padded queries and bank (torch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from swsa_engine.core.knn.certify import (
    exact_candidates, exact_rows, recompute_uncertified, refine_certify, torch_error_coefficient,
    without_excluded,
)
from swsa_engine.core.knn.checks import (
    BLOCK_BYTES, EXTRA_CANDIDATES, INF, as_feature_array, as_task_mask, check_run_options, check_same_dim,
    check_task_rows, drop_if_unused, log_plan, safe_precision, task_exclusions,
)
from swsa_engine.core.validation import check_positive_int

LOG = logging.getLogger(__name__)

__all__ = ["knn_score_batched"]


def knn_score_batched(
    queries,
    banks,
    k: int = 3,
    *,
    query_mask=None,
    bank_mask=None,
    exclude=None,
    device="cpu",
    block_size: int | None = None,
    precision: str | None = None,
) -> np.ndarray:
    """kNN scores for many tasks at once, each task with its own (padded) queries and bank.

    Parameters
    ----------
    queries : (T, Q, D) real array; rows where ``query_mask`` is False are ignored (may hold
        anything, NaN included).
    banks : (T, S, D) real array; rows where ``bank_mask`` is False are padding.
    k : neighbours; every task with a real query needs >= k usable bank rows.
    query_mask : optional (T, Q) bool, True = real query.  Masked queries score NaN.
    bank_mask : optional (T, S) bool, True = real bank row.
    exclude : optional (T, Q) int, index into that task's bank of a row that must not count as
        a neighbour of that query (leave-one-out), or -1; or (T, Q, E) int, E such rows per query
        (-1 padded: e.g. a synthetic anomaly without every image it was made from).  Excluding a
        padding row, or a row twice, is a no-op.  Every real query needs ``k`` <= real bank rows
        minus its distinct excluded real rows.
    device : 'cpu' or a CUDA device.
    block_size : tasks per chunk (default: sized from ``BLOCK_BYTES``).
    precision : None (float64 on CPU, float32 + exact float64 refinement on CUDA), 'float32'
        or 'float64'.

    Returns
    -------
    (T, Q) float64; NaN where ``query_mask`` is False.
    """
    k = check_positive_int(k, "k", "k=3")
    q, b, qmask, bmask, excl = _check_task_arrays(queries, banks, query_mask, bank_mask, exclude)
    block_size, dev, mode = check_run_options(block_size, device, precision)
    check_task_rows(k, q, b, qmask, bmask, excl)
    out = np.full(qmask.shape, np.nan)
    if not qmask.any():  # also when there are no tasks or no queries
        return out
    n_t, n_q = qmask.shape
    kc, tc, qc = _plan_task_chunks(q.shape, b.shape[1], k, mode, dev, block_size)
    n_fail = 0
    for t0 in range(0, n_t, tc):
        if not qmask[t0 : t0 + tc].any():
            continue
        chunk = _TaskChunk.prepare(b[t0 : t0 + tc], bmask[t0 : t0 + tc], mode, dev)
        for q0 in range(0, n_q, qc):
            block = np.s_[t0 : t0 + tc, q0 : q0 + qc]
            if not qmask[block].any():
                continue
            sums, failed = _score_task_block(chunk, q[block], qmask[block], excl[block] if excl is not None else None, k, kc)
            out[block] = np.where(qmask[block], sums.cpu().numpy(), np.nan)
            n_fail += failed
    if n_fail:
        LOG.debug("knn_score_batched: %d scores not certified; recomputed exactly", n_fail)
    return out


def _check_task_arrays(queries, banks, query_mask, bank_mask, exclude):
    """Validated (T, Q, D) queries, (T, S, D) banks, their masks and the (T, Q, E) exclusions of
    :func:`knn_score_batched` (distinct real rows first; None when no real query excludes a real row)."""
    q = as_feature_array(queries, "queries", 3, "(T, Q, D)")
    b = as_feature_array(banks, "banks", 3, "(T, S, D)")
    n_t, n_q, dim = q.shape
    if b.shape[0] != n_t:
        raise ValueError(f"queries hold T={n_t} tasks but banks hold T={b.shape[0]}; both must have one entry per task along axis 0")
    check_same_dim(dim, b.shape[2], "bank rows")
    qmask = as_task_mask(query_mask, "query_mask", (n_t, n_q), "(T, Q)")
    bmask = as_task_mask(bank_mask, "bank_mask", (n_t, b.shape[1]), "(T, S)")
    excl = drop_if_unused(task_exclusions(exclude, qmask, bmask)) if exclude is not None else None
    return q, b, qmask, bmask, excl


def _plan_task_chunks(q_shape: tuple[int, int, int], s: int, k: int, mode: str, dev: torch.device,
                      block_size: int | None) -> tuple[int, int, int]:
    """``(kc, tc, qc)``: candidates per query, tasks per chunk and queries per block of
    :func:`knn_score_batched`, logged."""
    n_t, n_q, dim = q_shape
    kc = min(s, k + EXTRA_CANDIDATES)
    per_query = dim * 8 * 2 + s * 8 * 3 + kc * (dim * 8 * 2 + 40)
    qc = max(1, min(n_q, int(BLOCK_BYTES // per_query)))
    per_task = qc * per_query + s * dim * 8 * 3
    tc = block_size or max(1, min(n_t, int(BLOCK_BYTES // per_task)))
    log_plan(
        n_t * n_q * s * dim,
        "knn_score_batched: T=%d Q=%d S=%d D=%d k=%d %s on %s; chunks of %d tasks x %d queries, ~%.1f MiB per chunk",
        n_t, n_q, s, dim, k, mode, dev, tc, qc, tc * per_task / 2**20,
    )
    return kc, tc, qc


@dataclass(frozen=True)
class _TaskChunk:
    """The banks of one chunk of tasks on the device, in float64 with padding rows zeroed.

    bank (t, S, D); real (t, S) True = real row; norms (t, S) squared norms; max_norm (t,) the
    largest; n_real (t,) real rows; mode: the chunk's arithmetic (float64 where float32 is not safe).
    """

    bank: torch.Tensor
    real: torch.Tensor
    norms: torch.Tensor
    max_norm: torch.Tensor
    n_real: torch.Tensor
    mode: str

    @classmethod
    def prepare(cls, banks: np.ndarray, bank_mask: np.ndarray, mode: str, dev: torch.device) -> "_TaskChunk":
        b_np = np.array(banks, dtype=np.float64)  # a copy: padding rows are zeroed below
        b_np[~bank_mask] = 0.0  # padding may hold anything, NaN included
        nb_np = np.einsum("tsd,tsd->ts", b_np, b_np)
        real = torch.from_numpy(bank_mask).to(dev)
        norms = torch.from_numpy(nb_np).to(dev)
        max_norm = norms.max(dim=1).values  # padding rows are zero
        return cls(torch.from_numpy(b_np).to(dev), real, norms, max_norm, real.sum(1), safe_precision(mode, nb_np))

    def distances(self, q64: torch.Tensor, nq: torch.Tensor, mode: str) -> torch.Tensor:
        """(t, q, S) expanded-form squared distances of queries q64 (t, q, D) with squared norms
        nq (t, q), in ``mode``; +inf for padding rows."""
        if mode == "float64":
            bank, queries, nb, nq_c = self.bank, q64, self.norms, nq
        else:
            bank, queries = self.bank.to(torch.float32), q64.to(torch.float32)
            nb, nq_c = (bank * bank).sum(-1), (queries * queries).sum(-1)
        nb = nb.masked_fill(~self.real, INF)
        return torch.baddbmm(nb[:, None, :], queries, bank.transpose(1, 2), alpha=-2.0).add_(nq_c[:, :, None])

    def exact_scores(self, q64: torch.Tensor, ex: torch.Tensor | None, ti: torch.Tensor, qi: torch.Tensor, k: int) -> torch.Tensor:
        """Exact scores of queries ``(ti, qi)`` of q64 (t, q, D) from the differences against
        every usable row of their bank (``ex`` (t, q, E): excluded positions, or None)."""
        n_qb, dim = q64.shape[1], q64.shape[2]
        s = self.bank.shape[1]
        slots = torch.arange(s, device=q64.device)[None, :]
        usable = self.real[ti]
        if ex is not None:
            usable = usable & ~(slots[:, :, None] == ex[ti, qi][:, None, :]).any(-1)
        return exact_rows(q64.reshape(-1, dim), ti * n_qb + qi, self.bank.reshape(-1, dim), ti[:, None] * s + slots, usable, k)


def _score_task_block(chunk: _TaskChunk, queries: np.ndarray, query_mask: np.ndarray, excl: np.ndarray | None,
                      k: int, kc: int) -> tuple[torch.Tensor, int]:
    """Certified scores (t, q) of a block of queries (t, q, D) against their chunk's banks, and
    how many needed the exact fall-back.  Masked queries hold anything; excl (t, q, E) or None."""
    dev = chunk.bank.device
    q_np = np.array(queries, dtype=np.float64)
    q_np[~query_mask] = 0.0
    nq_np = np.einsum("tqd,tqd->tq", q_np, q_np)
    mode = safe_precision(chunk.mode, nq_np)
    q64 = torch.from_numpy(q_np).to(dev)
    nq = torch.from_numpy(nq_np).to(dev)
    dist = chunk.distances(q64, nq, mode)
    ex = _exclude_in_place(dist, excl)
    err = torch_error_coefficient(q64.shape[2], mode, dev) * (nq + chunk.max_norm[:, None])
    # both precisions: the kc nearest by the expanded form, then their distances recomputed from the
    # differences, so a score is the brute-force sum exactly (ties between integer-valued features
    # stay ties, which the expanded form's last-bit rounding would break)
    vals, idx = torch.topk(dist, kc, dim=-1, largest=False, sorted=True)
    real = torch.gather(chunk.real[:, None, :].expand(-1, idx.shape[1], -1), 2, idx)
    cand_valid, n_usable = without_excluded(real, idx, chunk.n_real[:, None], ex)
    tasks = torch.arange(idx.shape[0], device=dev)[:, None, None]
    exact = exact_candidates(chunk.bank, (tasks, idx), q64[:, :, None, :], cand_valid)
    sums, good = refine_certify(exact, cand_valid, vals.max(dim=-1).values, n_usable, err, k)
    good = good | ~torch.from_numpy(query_mask).to(dev)
    return sums, recompute_uncertified(sums, good, lambda ti, qi: chunk.exact_scores(q64, ex, ti, qi, k))


def _exclude_in_place(dist: torch.Tensor, excl: np.ndarray | None) -> torch.Tensor | None:
    """Set each query's excluded bank columns of dist (t, q, S) to +inf; returns the exclusions
    (t, q, E) as a tensor, None when this block has none."""
    if excl is None or not (excl >= 0).any():
        return None
    ex = torch.from_numpy(excl).to(dist.device)
    s = dist.shape[2]
    hit = torch.zeros((*dist.shape[:2], s + 1), dtype=torch.bool, device=dist.device)
    hit.scatter_(2, torch.where(ex >= 0, ex, s), True)  # -1 marks the spare column s
    dist.masked_fill_(hit[:, :, :s], INF)
    return ex
