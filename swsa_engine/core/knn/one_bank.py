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
    check_finite_rows(b, "bank")  # the queries' check is part of their norms (_OneBank.prepare)
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


#: queries per block of the exact refinement: their float64 rows and candidates stay in cache.
REFINE_ROWS = 128


@dataclass(frozen=True)
class _OneBank:
    """The queries and the bank of :func:`knn_score`.

    q (Q, D) the queries as given (float32 or float64: never copied whole; blocks are converted
    to float64 where the refinement needs them), b64 (S, D) the bank in float64, nq (Q,) and
    nb (S,) squared norms (nq an upper bound within a relative ``2⁻¹⁶`` for float32 queries: it
    only enters error bounds and the float32 range check), bank_dev the bank on ``dev``; excl (Q,)
    the bank row each query must not count (-1 none), None when none does.
    """

    q: np.ndarray
    b64: np.ndarray
    nq: np.ndarray
    nb: np.ndarray
    excl: np.ndarray | None
    k: int
    dev: torch.device
    bank_dev: torch.Tensor

    @classmethod
    def prepare(cls, q: np.ndarray, b: np.ndarray, excl: np.ndarray | None, k: int, dev: torch.device) -> "_OneBank":
        if q.dtype not in (np.float32, np.float64):
            q = q.astype(np.float64)
        q = np.ascontiguousarray(q)
        b64 = np.ascontiguousarray(b, dtype=np.float64)
        nq = query_sq_norms(q)
        nb = sq_norms(b64, "bank")
        return cls(q, b64, nq, nb, excl, k, dev, torch.from_numpy(b64).to(dev))

    @property
    def dim(self) -> int:
        return self.b64.shape[1]

    @property
    def max_nb(self) -> float:
        return float(self.nb.max())

    @property
    def excl_t(self) -> torch.Tensor | None:
        return torch.from_numpy(self.excl) if self.excl is not None else None


def query_sq_norms(q: np.ndarray) -> np.ndarray:
    """(Q,) squared norms of the rows of ``q`` (Q, D), block by block (no float64 copy of ``q``).

    Float32 rows: partial sums over 32 features in float32, added in float64, then raised by a
    relative ``2⁻¹⁶`` (far above the ``γ_32`` error of the partial sums) so the result is an upper
    bound, as error bounds need.  Float64 rows: exact float64 sums.  Raises the one finite-rows error
    (:func:`~swsa_engine.core.validation.check_finite_rows`) for a row holding NaN or inf, and like
    :func:`sq_norms` when a norm overflows float64 — so it doubles as the queries' finiteness check.
    """
    n, dim = q.shape
    out = np.empty(n)
    per = max(1, (4 << 20) // max(1, 8 * dim))
    pad = -dim % 32
    for lo in range(0, n, per):
        block = torch.from_numpy(q[lo : lo + per])
        if q.dtype == np.float32:
            if pad:
                block = torch.nn.functional.pad(block, (0, pad))
            partial = torch.linalg.vector_norm(block.view(len(block), -1, 32), dim=-1).to(torch.float64)
            out[lo : lo + per] = partial.square_().sum(-1).mul_(1.0 + 2.0**-16).numpy()
        else:
            out[lo : lo + per] = torch.einsum("nd,nd->n", block, block).numpy()
    bad = ~np.isfinite(out)
    if bad.any():  # a NaN / inf value, or float32 partial norms that overflowed: redo those rows in float64
        check_finite_rows(q, "queries", row_ok=bad)
        out[bad] = sq_norms(q[bad], "queries")
    return out


def _plan_one_bank(one: _OneBank, mode: str, with_faiss: bool, block_size: int | None) -> tuple[int, int]:
    """``(kc, qb)``: candidates per query and queries per block of :func:`knn_score`, logged."""
    n_q = one.q.shape[0]
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
    n_found = min(one.b64.shape[0], kc)

    def search(q0: int, q1: int, ex):
        dist, idx = faiss_index[0].search(np.ascontiguousarray(one.q[q0:q1], dtype=np.float32), n_found)
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
    q_t = torch.from_numpy(one.q)

    def search(q0: int, q1: int, ex):
        qc = q_t[q0:q1].to(one.dev, dtype)
        vals, idx = _torch_candidates(qc, bank, norms, n_found, ex.to(one.dev) if ex is not None else None, block_s)
        return vals.cpu(), idx.cpu()

    return torch_error_coefficient(one.dim, mode, one.dev), search


def _first_tier(one: _OneBank, mode: str, coef: float, search, qb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, certified)`` (Q,) float64 and bool of every query from its ``search`` candidates,
    block by block, refined from the differences and certified."""
    n_q = one.q.shape[0]
    b64_t, excl_t = torch.from_numpy(one.b64), one.excl_t
    q_t, nq_t = torch.from_numpy(one.q), torch.from_numpy(one.nq)
    out = torch.empty(n_q, dtype=torch.float64)
    ok = torch.ones(n_q, dtype=torch.bool)
    for q0 in range(0, n_q, qb):
        q1 = min(n_q, q0 + qb)
        ex = excl_t[q0:q1] if excl_t is not None else None
        vals, idx = search(q0, q1, ex)
        err = coef * (nq_t[q0:q1] + one.max_nb)
        # both precisions refine from the differences: scores equal the brute-force sums exactly
        out[q0:q1], ok[q0:q1] = _certify_one_bank(vals.to(torch.float64), idx, ex, b64_t, q_t[q0:q1], err, one.k)
    return out, ok


def _certify_one_bank(vals, idx, ex, bank64, queries, err, k: int):
    """Candidates (vals, idx) (n, kc), ascending approximate distances, of ``queries`` (n, D) (any
    float dtype) refined exactly against the float64 bank64 (S, D) and certified → (sums, ok) (n,).

    Where the first ``k + 1`` candidates are usable rows and the approximate gap after the ``k``-th
    exceeds twice the error bound, the ``k`` nearest rows are certain and only their distances are
    recomputed (the common case); elsewhere every candidate is, and :func:`refine_certify` decides.
    The float64 work goes :data:`REFINE_ROWS` queries at a time, so it stays in cache.
    """
    n = idx.shape[0]
    cand_valid, n_usable = without_excluded(idx >= 0, idx, torch.full((n,), bank64.shape[0], device=idx.device),
                                            ex[:, None] if ex is not None else None)
    sums = torch.empty(n, dtype=torch.float64, device=idx.device)
    ok = torch.ones(n, dtype=torch.bool, device=idx.device)
    gap = torch.zeros(n, dtype=torch.bool, device=idx.device)
    if idx.shape[1] > k:
        gap = cand_valid[:, : k + 1].all(1) & (vals[:, k] - err >= vals[:, k - 1] + err)
    certain = torch.nonzero(gap).flatten()
    for lo in range(0, certain.numel(), REFINE_ROWS):
        rows = certain[lo : lo + REFINE_ROWS]
        near = idx.index_select(0, rows)[:, :k]
        q64 = queries.index_select(0, rows).to(torch.float64)
        sums[rows] = exact_candidates(bank64, near, q64[:, None, :], torch.ones_like(near, dtype=torch.bool)).sum(-1)
    rest = torch.nonzero(~gap).flatten()
    for lo in range(0, rest.numel(), REFINE_ROWS):
        rows = rest[lo : lo + REFINE_ROWS]
        q64 = queries.index_select(0, rows).to(torch.float64)
        exact = exact_candidates(bank64, idx[rows].clamp(min=0), q64[:, None, :], cand_valid[rows])
        sums[rows], ok[rows] = refine_certify(exact, cand_valid[rows], vals[rows].max(dim=1).values, n_usable[rows],
                                              err[rows], k)
    return sums, ok


def _recertify_in_float64(one: _OneBank, out: torch.Tensor, ok: torch.Tensor, kc: int) -> None:
    """Rescore the queries ``ok`` leaves uncertified, in place in ``out``: float64 candidates (a
    much tighter bound) refined exactly; failing that, exactly against the whole bank."""
    bad = torch.nonzero(~ok).flatten()
    if not bad.numel():
        return
    LOG.debug("knn_score: %d of %d scores not certified; re-selecting them in float64", bad.numel(), one.q.shape[0])
    dev, bank_t, k = one.dev, one.bank_dev, one.k
    excl_t = one.excl_t
    q_bad = torch.from_numpy(one.q[bad.numpy()]).to(torch.float64)
    qf = q_bad.to(dev)
    exf = excl_t[bad].to(dev) if excl_t is not None else None
    block_s = max(1, min(bank_t.shape[0], int(BLOCK_BYTES // max(1, 24 * bad.numel()))))
    vals, idx = _torch_candidates(qf, bank_t, torch.from_numpy(one.nb).to(dev), kc, exf, block_s)
    err = error_coefficient(one.dim, "float64") * (torch.from_numpy(one.nq).to(dev)[bad.to(dev)] + one.max_nb)
    sums, good = _certify_one_bank(vals, idx, exf, bank_t, qf, err, k)
    out[bad] = sums.cpu()
    still = bad[~good.cpu()]
    if still.numel():
        LOG.debug("knn_score: %d scores recomputed exactly against the whole bank", still.numel())
        q_still = torch.from_numpy(one.q[still.numpy()]).to(torch.float64)
        out[still] = exact_shared(q_still.to(dev), bank_t, excl_t[still].to(dev) if excl_t is not None else None, k).cpu()


def use_faiss(dev: torch.device) -> bool:
    """FAISS finds the float32 candidates on CPU, and on CUDA when FAISS has GPUs; without FAISS
    (a GPU machine whose image lacks it) torch finds them, with the same certified results."""
    try:
        import faiss
    except ImportError:
        return False
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
