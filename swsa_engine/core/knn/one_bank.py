"""knn_score: queries against one bank, float32 candidates from FAISS (or torch), certified exactly."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from swsa_engine.core.knn.certify import (
    error_coefficient, exact_candidates, exact_shared, refine_certify, torch_error_coefficient,
    without_excluded,
)
from swsa_engine.core.knn.checks import (
    BLOCK_BYTES, EXTRA_CANDIDATES, INF, as_feature_array, check_run_options, check_same_dim, drop_if_unused, log_plan,
    safe_precision, sq_norms,
)
from swsa_engine.core.validation import as_index_array, check_finite_rows, check_positive_int

LOG = logging.getLogger(__name__)

__all__ = ["knn_score", "use_faiss"]


def knn_score(queries, bank, k: int = 3, *, exclude=None, block_size: int | None = None, device="cpu", precision: str | None = None) -> np.ndarray:
    """kNN anomaly score of each query: sum of squared L2 distances to its k nearest bank rows.

    Parameters
    ----------
    queries : (Q, D) real array (any float or int dtype; NaN/inf rejected).
    bank : (S, D) real array, the support set's features.
    k : number of neighbours, 1 <= k <= S (S - 1 when excluding).
    exclude : optional (Q,) int array, the bank row that must not count as a neighbour of
        that query (leave-one-out), or -1 for none.
    block_size : queries per block (default: sized from ``BLOCK_BYTES``).
    device : 'cpu' (FAISS float32 candidates) or a CUDA device (FAISS GPU when
        ``faiss.get_num_gpus() > 0``, else torch).
    precision : None (float32 candidates + exact float64 refinement), 'float32' (same), or
        'float64' (torch float64 expanded form, certified).

    Returns
    -------
    (Q,) float64, equal to brute force (float64 ``((q - b) ** 2).sum(-1)``, sorted, first k summed)
    to ~1e-10 relative.
    """
    k = check_positive_int(k, "k", "k=3")
    q, b, excl = _check_one_bank(queries, bank, k, exclude)
    block_size, dev, mode = check_run_options(block_size, device, precision, default_precision="float32")
    check_finite_rows(q, "queries")
    check_finite_rows(b, "bank")
    if q.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    one = _OneBank.prepare(q, b, excl, k, dev)
    mode = safe_precision(mode, one.nq, one.nb, caller="knn_score")
    with_faiss = mode == "float32" and use_faiss(dev)
    kc, qb = _plan_one_bank(one, mode, with_faiss, block_size)
    coef, search = _faiss_search(one, kc) if with_faiss else _torch_search(one, mode, kc, qb)
    out, ok = _first_tier(one, mode, coef, search, qb)
    _recertify_in_float64(one, out, ok, kc)
    return out.numpy()


def _check_one_bank(queries, bank, k: int, exclude) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated (Q, D) queries, (S, D) bank and (Q,) exclusions (None when none) of :func:`knn_score`."""
    q = as_feature_array(queries, "queries", 2, "(Q, D)")
    b = as_feature_array(bank, "bank", 2, "(S, D)")
    s = b.shape[0]
    check_same_dim(q.shape[1], b.shape[1], "bank rows")
    excl = None
    if exclude is not None:
        excl = drop_if_unused(as_index_array(exclude, "exclude", (q.shape[0],), high=s, what="a row of bank", shape_doc="(Q,)"))
    if k > s:
        hint = f"use k <= {s}" if s > 0 else "the bank is empty: give it at least k rows"
        raise ValueError(f"k={k} is larger than the support set ({s} rows); {hint}")
    if excl is not None and k > s - 1:
        raise ValueError(
            f"k={k} is larger than the support set minus the excluded row ({s} rows - 1 = {s - 1} usable "
            f"for leave-one-out queries); use k <= {s - 1}"
        )
    return q, b, excl


@dataclass(frozen=True)
class _OneBank:
    """The queries and the bank of :func:`knn_score` in float64.

    q64 (Q, D), b64 (S, D) and their squared norms nq (Q,), nb (S,) on the CPU; bank_dev the bank
    on ``dev``; excl (Q,) the bank row each query must not count (-1 none), None when none does.
    """

    q64: np.ndarray
    b64: np.ndarray
    nq: np.ndarray
    nb: np.ndarray
    excl: np.ndarray | None
    k: int
    dev: torch.device
    bank_dev: torch.Tensor

    @classmethod
    def prepare(cls, q: np.ndarray, b: np.ndarray, excl: np.ndarray | None, k: int, dev: torch.device) -> "_OneBank":
        q64 = np.ascontiguousarray(q, dtype=np.float64)
        b64 = np.ascontiguousarray(b, dtype=np.float64)
        nq = sq_norms(q64, "queries")
        nb = sq_norms(b64, "bank")
        return cls(q64, b64, nq, nb, excl, k, dev, torch.from_numpy(b64).to(dev))

    @property
    def dim(self) -> int:
        return self.b64.shape[1]

    @property
    def max_nb(self) -> float:
        return float(self.nb.max())

    @property
    def excl_t(self) -> torch.Tensor | None:
        return torch.from_numpy(self.excl) if self.excl is not None else None


def _plan_one_bank(one: _OneBank, mode: str, with_faiss: bool, block_size: int | None) -> tuple[int, int]:
    """``(kc, qb)``: candidates per query and queries per block of :func:`knn_score`, logged."""
    n_q = one.q64.shape[0]
    s, dim = one.b64.shape
    kc = min(s, one.k + EXTRA_CANDIDATES + (1 if one.excl is not None else 0))
    per_query = 8 * kc * dim * 2 + 4 * dim * 2 + 8 * max(kc, 1) * 4
    if not with_faiss:
        per_query += 8 * min(s, 4096) * 3
    qb = block_size or max(1, min(n_q, int(BLOCK_BYTES // per_query)))
    log_plan(
        n_q * s * dim, "knn_score: Q=%d S=%d D=%d k=%d %s %s; blocks of %d queries, ~%.1f MiB per block",
        n_q, s, dim, one.k, mode, "faiss" if with_faiss else "torch", qb, qb * per_query / 2**20,
    )
    return kc, qb


def _faiss_search(one: _OneBank, kc: int):
    """First-tier candidates from a FAISS flat index (float32): ``(coef, search)``, the error
    coefficient of their distances and ``search(q0, q1, ex)`` → (dist, idx) (n, kc') CPU tensors
    for queries ``q0:q1`` (``ex`` is left to the refinement)."""
    faiss_index = _faiss_index(one.b64.astype(np.float32), one.dev)  # (index, GPU resources it needs alive)
    q32 = one.q64.astype(np.float32)
    n_found = min(one.b64.shape[0], kc)

    def search(q0: int, q1: int, ex):
        dist, idx = faiss_index[0].search(q32[q0:q1], n_found)
        return torch.from_numpy(dist), torch.from_numpy(idx.astype(np.int64))

    return error_coefficient(one.dim, "float32", 2.0**-11 if one.dev.type == "cuda" else 0.0), search


def _torch_search(one: _OneBank, mode: str, kc: int, qb: int):
    """First-tier candidates from torch in ``mode`` on the device, as :func:`_faiss_search`
    (excluded rows are +inf; both precisions return ``kc`` candidates, refined from the differences)."""
    dtype = torch.float64 if mode == "float64" else torch.float32
    bank = one.bank_dev.to(dtype)
    norms = (bank * bank).sum(-1)
    s = bank.shape[0]
    block_s = max(1, min(s, int(BLOCK_BYTES // max(1, 24 * qb))))
    n_found = kc
    q_t = torch.from_numpy(one.q64)

    def search(q0: int, q1: int, ex):
        qc = q_t[q0:q1].to(one.dev, dtype)
        vals, idx = _torch_candidates(qc, bank, norms, n_found, ex.to(one.dev) if ex is not None else None, block_s)
        return vals.cpu(), idx.cpu()

    return torch_error_coefficient(one.dim, mode, one.dev), search


def _first_tier(one: _OneBank, mode: str, coef: float, search, qb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, certified)`` (Q,) float64 and bool of every query from its ``search`` candidates,
    block by block, refined from the differences and certified."""
    n_q = one.q64.shape[0]
    q_t, b64_t, excl_t = torch.from_numpy(one.q64), torch.from_numpy(one.b64), one.excl_t
    nq_t = torch.from_numpy(one.nq)
    out = torch.empty(n_q, dtype=torch.float64)
    ok = torch.ones(n_q, dtype=torch.bool)
    for q0 in range(0, n_q, qb):
        q1 = min(n_q, q0 + qb)
        ex = excl_t[q0:q1] if excl_t is not None else None
        err = coef * (nq_t[q0:q1] + one.max_nb)
        vals, idx = search(q0, q1, ex)
        # both precisions refine from the differences: scores equal the brute-force sums exactly
        out[q0:q1], ok[q0:q1] = _certify_one_bank(vals.to(torch.float64), idx, ex, b64_t, q_t[q0:q1], err, one.k)
    return out, ok


def _certify_one_bank(vals, idx, ex, bank64, q64, err, k: int):
    """Float32 route against one bank: candidates (vals, idx) (n, kc) of queries q64 (n, D)
    refined exactly against the float64 bank64 (S, D) and certified → (sums, ok) (n,)."""
    s = bank64.shape[0]
    n_all = torch.full((idx.shape[0],), s, device=idx.device)
    cand_valid, n_usable = without_excluded(idx >= 0, idx, n_all, ex[:, None] if ex is not None else None)
    exact = exact_candidates(bank64, idx.clamp(min=0), q64[:, None, :], cand_valid)
    return refine_certify(exact, cand_valid, vals.max(dim=1).values, n_usable, err, k)


def _recertify_in_float64(one: _OneBank, out: torch.Tensor, ok: torch.Tensor, kc: int) -> None:
    """Rescore the queries ``ok`` leaves uncertified, in place in ``out``: float64 candidates (a
    much tighter bound) refined exactly; failing that, exactly against the whole bank."""
    bad = torch.nonzero(~ok).flatten()
    if not bad.numel():
        return
    LOG.debug("knn_score: %d of %d scores not certified; re-selecting them in float64", bad.numel(), one.q64.shape[0])
    dev, bank_t, k = one.dev, one.bank_dev, one.k
    q_t, excl_t = torch.from_numpy(one.q64), one.excl_t
    qf = q_t[bad].to(dev)
    exf = excl_t[bad].to(dev) if excl_t is not None else None
    block_s = max(1, min(bank_t.shape[0], int(BLOCK_BYTES // max(1, 24 * bad.numel()))))
    vals, idx = _torch_candidates(qf, bank_t, torch.from_numpy(one.nb).to(dev), kc, exf, block_s)
    err = error_coefficient(one.dim, "float64") * (torch.from_numpy(one.nq).to(dev)[bad.to(dev)] + one.max_nb)
    sums, good = _certify_one_bank(vals, idx, exf, bank_t, qf, err, k)
    out[bad] = sums.cpu()
    still = bad[~good.cpu()]
    if still.numel():
        LOG.debug("knn_score: %d scores recomputed exactly against the whole bank", still.numel())
        out[still] = exact_shared(q_t[still].to(dev), bank_t, excl_t[still].to(dev) if excl_t is not None else None, k).cpu()


def use_faiss(dev: torch.device) -> bool:
    """FAISS finds the float32 candidates on CPU, and on CUDA when FAISS has GPUs."""
    import faiss

    return dev.type == "cpu" or faiss.get_num_gpus() > 0


def _faiss_index(b32: np.ndarray, dev: torch.device):
    import faiss

    index = faiss.IndexFlatL2(b32.shape[1])
    res = None
    if dev.type == "cuda":  # only reached when faiss.get_num_gpus() > 0
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, dev.index or 0, index)
    index.add(b32)
    return index, res  # the caller keeps ``res`` alive as long as the index


def _torch_candidates(q, b, nb, kc, excl, block_s):
    """Running top-kc of the expanded-form distances of q (n, D) to b (S, D); excluded → +inf.

    Returns (vals (n, kc'), idx (n, kc')) with kc' = min(kc, S), approximate values in q's dtype.
    """
    n = q.shape[0]
    s = b.shape[0]
    kc = min(kc, s)
    nq = (q * q).sum(-1)
    run_v = torch.full((n, 0), INF, dtype=q.dtype, device=q.device)
    run_i = torch.full((n, 0), -1, dtype=torch.int64, device=q.device)
    for s0 in range(0, s, block_s):
        s1 = min(s, s0 + block_s)
        d = torch.addmm(nb[None, s0:s1], q, b[s0:s1].T, alpha=-2.0).add_(nq[:, None])
        if excl is not None:
            hit = excl[:, None] == torch.arange(s0, s1, device=q.device)[None, :]
            d.masked_fill_(hit, INF)
        cols = torch.arange(s0, s1, device=q.device).expand(n, -1)
        v = torch.cat([run_v, d], dim=1)
        i = torch.cat([run_i, cols], dim=1)
        m = min(kc, v.shape[1])
        run_v, pos = torch.topk(v, m, dim=1, largest=False, sorted=True)
        run_i = torch.gather(i, 1, pos)
    return run_v, run_i
