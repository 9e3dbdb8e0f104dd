"""knn_score_gathered: shared queries against many banks given as row indices into one feature matrix."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from swsa_engine.core.knn.certify import (
    exact_candidates, exact_rows, recompute_uncertified, refine_certify,
    torch_error_coefficient,
)
from swsa_engine.core.knn.checks import (
    BLOCK_BYTES, EXTRA_CANDIDATES, INF, as_feature_array, check_run_options, check_same_dim, drop_if_unused, log_plan,
    safe_precision, sq_norms, too_small_message,
)
from swsa_engine.core.validation import as_index_array, as_numpy, check_finite_rows, check_positive_int, finite_rows

LOG = logging.getLogger(__name__)

__all__ = ["knn_score_gathered", "local_bank_index"]


def knn_score_gathered(
    queries,
    features,
    bank_index,
    k: int = 3,
    *,
    exclude=None,
    device="cpu",
    block_size: int | None = None,
    precision: str | None = None,
) -> np.ndarray:
    """kNN scores of one shared set of queries against many banks drawn from one feature matrix.

    Parameters
    ----------
    queries : (Q, D) real array (e.g. the real validation images' features).
    features : (N, D) real array; only rows named in ``bank_index`` are read (others may hold NaN).
    bank_index : (T, S) int, row indices into ``features`` forming each task's bank, -1 = padding.
        A row listed twice in a task's bank counts twice.
    k : neighbours; every task needs >= k usable bank rows.
    exclude : optional (T, Q) int, the row of ``features`` that must not count as a neighbour
        of query q in task t (its own row: leave-one-out), or -1.
    device : 'cpu' or a CUDA device.
    block_size : queries per block (default: sized from ``BLOCK_BYTES``).
    precision : None (float64 on CPU, float32 + exact float64 refinement on CUDA), 'float32'
        or 'float64'.

    Returns
    -------
    (T, Q) float64.

    The distances from a block of queries to every distinct bank row are one matrix product;
    columns are gathered into ``(Qb, T, S)``, padding is +inf, and ``torch.topk`` picks the k
    nearest per task.  E.g. Q=5,800, N=6,000, D=2,048, T=200, S=30 takes a few seconds on
    2 CPU cores.
    """
    k = check_positive_int(k, "k", "k=3")
    q, f, bi, excl = _check_gathered_arrays(queries, features, bank_index, exclude)
    block_size, dev, mode = check_run_options(block_size, device, precision)
    _check_gathered_support(k, bi, excl, q.shape[0])
    check_finite_rows(q, "queries")
    used = _used_bank_rows(f, bi)
    out = np.empty((bi.shape[0], q.shape[0]), dtype=np.float64)
    if out.size == 0:
        return out
    q64 = np.ascontiguousarray(q, dtype=np.float64)
    nq = sq_norms(q64, "queries")
    rows64 = np.concatenate([np.asarray(f[used], dtype=np.float64), np.zeros((1, q.shape[1]))], axis=0)  # + padding row
    norms = np.append(sq_norms(rows64[:-1], "features"), INF)
    mode = safe_precision(mode, nq, norms[:-1], caller="knn_score_gathered")
    direct, kc, qb = _plan_gathered(q.shape, used.size, bi.shape, k, mode, dev, block_size)
    banks = _GatheredBanks.prepare(rows64, norms, bi, used, mode, dev, direct)
    excl_t = torch.from_numpy(excl).to(dev) if excl is not None else None
    n_fail = 0
    for q0 in range(0, q.shape[0], qb):
        q1 = min(q.shape[0], q0 + qb)
        ex = excl_t[:, q0:q1].T if excl_t is not None else None
        sums, failed = _score_gathered_block(banks, q64[q0:q1], nq[q0:q1], ex, k, kc)
        out[:, q0:q1] = sums.T.cpu().numpy()
        n_fail += failed
    if n_fail:
        LOG.debug("knn_score_gathered: %d of %d scores not certified; recomputed exactly", n_fail, out.size)
    return out


def _check_gathered_arrays(queries, features, bank_index, exclude):
    """Validated (Q, D) queries, (N, D) features, (T, S) bank_index and the (T, Q) exclusions of
    :func:`knn_score_gathered` (None when none)."""
    q = as_feature_array(queries, "queries", 2, "(Q, D)")
    f = as_feature_array(features, "features", 2, "(N, D)")
    n_f = f.shape[0]
    check_same_dim(q.shape[1], f.shape[1], "features rows")
    bi = as_numpy(bank_index)
    if bi.ndim != 2:
        raise ValueError(f"bank_index must have shape (T, S) (2 dimensions), got shape {bi.shape}; use -1 to pad shorter banks")
    bi = as_index_array(bi, "bank_index", bi.shape, high=n_f, what="a row of features", shape_doc="(T, S)")
    excl = None
    if exclude is not None:
        excl = as_index_array(exclude, "exclude", (bi.shape[0], q.shape[0]), high=n_f, what="a row of features", shape_doc="(T, Q)")
        excl = drop_if_unused(excl)
    return q, f, bi, excl


def _check_gathered_support(k: int, bi: np.ndarray, excl: np.ndarray | None, n_q: int) -> None:
    """Raise unless every task keeps >= k usable bank rows for each of its ``n_q`` queries."""
    if n_q == 0:
        return
    low = _fewest_usable_rows(k, bi, excl)
    short = np.flatnonzero(low < k)
    if short.size:
        raise ValueError(too_small_message(k, [(int(t), int(low[t])) for t in short], "= bank rows minus excluded row(s)"))


def _fewest_usable_rows(k: int, bi: np.ndarray, excl: np.ndarray | None) -> np.ndarray:
    """(T,) the fewest usable bank rows of any query per task, exact wherever it is below k."""
    valid = bi >= 0
    n_valid = valid.sum(axis=1)
    low = n_valid.copy()
    if excl is not None:
        # usable = valid slots minus the slots holding the excluded row (more than one only
        # when a task lists a row twice); exact per-query counts only where that can bite
        mult = np.ones(bi.shape[0], dtype=np.int64)
        srt = np.sort(np.where(valid, bi, -1), axis=1)
        for t in np.flatnonzero(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(axis=1)):
            mult[t] = np.unique(bi[t][valid[t]], return_counts=True)[1].max()
        for t in np.flatnonzero(n_valid - mult < k):
            hits = (bi[t][None, :] == excl[t][:, None]) & valid[t][None, :]
            low[t] = n_valid[t] - int(hits.sum(axis=1).max())
    return low


def _used_bank_rows(f: np.ndarray, bi: np.ndarray) -> np.ndarray:
    """The sorted distinct rows of ``f`` that the banks ``bi`` (T, S) use; raise naming the first
    that holds NaN or inf."""
    used = np.unique(bi[bi >= 0])
    if not used.size:
        return used
    fin = finite_rows(f[used])
    if not fin.all():
        row = int(used[np.argmin(fin)])
        task = int(np.argwhere(bi == row)[0, 0])
        raise ValueError(
            f"features contains NaN or inf at row {row} (first bad row used by a bank, e.g. task {task}; "
            f"{int((~fin).sum())} bad row(s) in use); re-embed those rows or drop them from bank_index"
        )
    return used


def local_bank_index(bank_ids: np.ndarray, used: np.ndarray) -> np.ndarray:
    """(T, S) position of each bank row among the sorted distinct rows ``used``; padding → ``used.size``."""
    valid = bank_ids >= 0
    local = np.full(bank_ids.shape, used.size, dtype=np.int64)
    local[valid] = np.searchsorted(used, bank_ids[valid])
    return local


def _plan_gathered(q_shape: tuple[int, int], n_u: int, bank_shape: tuple[int, int], k: int, mode: str,
                   dev: torch.device, block_size: int | None) -> tuple[bool, int, int]:
    """``(direct, kc, qb)`` of :func:`knn_score_gathered`, logged: whether the product is taken
    against the bank slots directly, candidates per query and task, and queries per block."""
    (n_q, dim), (n_t, s) = q_shape, bank_shape
    # When the banks barely overlap, the matrix product is taken directly against the T*S bank
    # slots (no gather); otherwise against the distinct rows once, then gathered.
    direct = n_t * s <= 1.25 * n_u
    n_cols = n_t * s if direct else n_u + 1
    kc = min(s, k + EXTRA_CANDIDATES)
    csize = 8 if mode == "float64" else 4
    per_query = n_cols * csize + n_t * s * (csize * (1 if direct else 2) + 1) + n_t * (8 * 2 * k + 16) + dim * 8
    per_query += n_t * kc * (dim * 8 * 2 + 40)
    qb = block_size or max(1, min(n_q, int(_block_budget(dev) // per_query)))
    log_plan(
        n_q * n_cols * dim,
        "knn_score_gathered: Q=%d N_used=%d D=%d T=%d S=%d k=%d %s on %s (%s); blocks of %d queries, "
        "~%.1f MiB per block + %.1f MiB for the bank rows",
        n_q, n_u, dim, n_t, s, k, mode, dev, "slot columns" if direct else "distinct rows + gather",
        qb, qb * per_query / 2**20, n_cols * dim * (8 + csize) / 2**20,
    )
    return direct, kc, qb


def _block_budget(dev: torch.device) -> int:
    """Bytes one block may use: ``BLOCK_BYTES``, on CUDA up to a quarter of the free memory (4 GiB at most)."""
    budget = BLOCK_BYTES
    if dev.type == "cuda":
        try:
            budget = max(budget, min(int(torch.cuda.mem_get_info(dev)[0] // 4), 4 * 2**30))
        except RuntimeError as err:  # pragma: no cover - the free memory could not be read
            LOG.debug("knn_score_gathered: free CUDA memory unknown (%s); blocks of %d bytes", err, budget)
    return budget


@dataclass(frozen=True)
class _GatheredBanks:
    """The banks of :func:`knn_score_gathered` on the device, laid out for the distance blocks.

    Distances are laid out (Qb, S, T): slot-major, so the k smallest per task reduce over a
    middle axis with elementwise min/max (fast for small k).

    rows64 (N_used + 1, D) float64: the distinct bank rows and a zero row for padding (exact
    refinement and fall-back); operand (n_cols, D), operand_norms (n_cols,): what the matrix
    product takes in ``mode``, the S*T slots slot-major when ``direct``, else ``rows64``
    (gathered into slots after, by ``slots`` (S*T,)); local (T, S) positions in ``rows64``
    (padding → the zero row); valid (T, S) real slots; slot_rows (S, T) the feature row of each
    slot (to match exclusions); max_norm (T,) each bank's largest squared norm.
    """

    rows64: torch.Tensor
    operand: torch.Tensor
    operand_norms: torch.Tensor
    slots: torch.Tensor
    local: torch.Tensor
    valid: torch.Tensor
    slot_rows: torch.Tensor
    max_norm: torch.Tensor
    direct: bool
    mode: str

    @classmethod
    def prepare(cls, rows64: np.ndarray, norms: np.ndarray, bi: np.ndarray, used: np.ndarray, mode: str,
                dev: torch.device, direct: bool) -> "_GatheredBanks":
        """From the distinct rows plus the padding row ``rows64`` and their squared ``norms`` (+inf for padding)."""
        dtype = torch.float64 if mode == "float64" else torch.float32
        valid = bi >= 0
        local = local_bank_index(bi, used)
        rows_t = torch.from_numpy(rows64).to(dev)
        slots = torch.from_numpy(local.T.reshape(-1)).to(dev)  # (S*T,) slot-major
        norms_t = torch.from_numpy(norms).to(dev)
        operand, operand_norms = (rows_t[slots], norms_t[slots]) if direct else (rows_t, norms_t)
        max_norm = np.where(valid, norms[local], 0.0).max(axis=1) if bi.shape[1] else np.zeros(bi.shape[0])
        return cls(
            rows_t, operand.to(dtype), operand_norms.to(dtype), slots, torch.from_numpy(local).to(dev),
            torch.from_numpy(valid).to(dev), torch.from_numpy(np.ascontiguousarray(bi.T)).to(dev),
            torch.from_numpy(max_norm).to(dev), direct, mode,
        )

    def distances(self, qd: torch.Tensor) -> torch.Tensor:
        """(Qb, S, T) expanded-form squared distances of queries qd (Qb, D) float64, in ``mode``."""
        n_t, s = self.valid.shape
        queries = qd.to(self.operand.dtype)
        dist = torch.addmm(self.operand_norms[None, :], queries, self.operand.T, alpha=-2.0)
        dist.add_((queries * queries).sum(-1)[:, None])
        return dist.view(qd.shape[0], s, n_t) if self.direct else dist.index_select(1, self.slots).view(qd.shape[0], s, n_t)

    def exact_scores(self, qd: torch.Tensor, hit: torch.Tensor | None, qi: torch.Tensor, ti: torch.Tensor, k: int) -> torch.Tensor:
        """Exact scores of queries ``qi`` of qd (Qb, D) in tasks ``ti`` from the differences
        against every usable row of their bank (``hit`` (Qb, S, T): excluded slots)."""
        usable = self.valid[ti]
        if hit is not None:
            usable = usable & ~hit[qi, :, ti]
        return exact_rows(qd, qi, self.rows64, self.local[ti], usable, k)


def _score_gathered_block(banks: _GatheredBanks, q64: np.ndarray, nq: np.ndarray, ex: torch.Tensor | None,
                          k: int, kc: int) -> tuple[torch.Tensor, int]:
    """Certified scores (Qb, T) of a block of queries q64 (Qb, D) with squared norms nq against
    every bank, and how many needed the exact fall-back; ex (Qb, T) the feature row each query
    must not count (-1 none), or None."""
    dev = banks.rows64.device
    qd = torch.from_numpy(q64).to(dev)
    g = banks.distances(qd)
    hit = None
    if ex is not None:
        hit = (banks.slot_rows[None, :, :] == ex[:, None, :]) & (ex[:, None, :] >= 0)  # (Qb, S, T)
        g.masked_fill_(hit, INF)
    coef = torch_error_coefficient(qd.shape[1], banks.mode, dev)
    err = coef * (torch.from_numpy(nq).to(dev)[:, None] + banks.max_norm[None, :])
    # both precisions refine from the differences: scores equal the brute-force sums exactly
    sums, good = _refine_gathered(banks, g, qd, hit, err, k, kc)
    return sums, recompute_uncertified(sums, good, lambda qi, ti: banks.exact_scores(qd, hit, qi, ti, k))


def _refine_gathered(banks: _GatheredBanks, g: torch.Tensor, qd: torch.Tensor, hit: torch.Tensor | None,
                     err: torch.Tensor, k: int, kc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kc nearest slots per task of g (Qb, S, T) by :func:`_score_gathered_block`'s distances,
    refined from the differences and certified → (sums, ok) (Qb, T)."""
    nb_, n_t = g.shape[0], g.shape[2]
    vals, idx = torch.topk(g, kc, dim=1, largest=False, sorted=True)  # (Qb, kc, T)
    valid_sT = banks.valid.T[None].expand(nb_, -1, -1)
    cand_valid = torch.gather(valid_sT, 1, idx)
    if hit is not None:
        cand_valid &= ~torch.gather(hit, 1, idx)
        n_usable = (valid_sT & ~hit).sum(1)
    else:
        n_usable = banks.valid.sum(1)[None, :].expand(nb_, -1)
    rows_local = torch.gather(banks.local.T[None].expand(nb_, -1, -1), 1, idx)  # (Qb, kc, T)
    exact = torch.empty(nb_, kc, n_t, dtype=torch.float64, device=g.device)
    sub = max(1, int(BLOCK_BYTES // max(1, n_t * kc * qd.shape[1] * 16)))
    for a in range(0, nb_, sub):
        block = slice(a, a + sub)
        exact[block] = exact_candidates(banks.rows64, rows_local[block], qd[block, None, None, :], cand_valid[block])
    return refine_certify(exact.transpose(1, 2), cand_valid.transpose(1, 2), vals.max(dim=1).values, n_usable, err, k)
