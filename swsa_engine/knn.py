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
dimension and the unit roundoff of the arithmetic used (``_error_coefficient``).  Then:

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
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import numpy as np
import torch

LOG = logging.getLogger(__name__)

#: memory (bytes) that one block of work may use; blocks are sized from it.
BLOCK_BYTES = 256 * 2**20
#: relative error at which a float64 expanded-form score is accepted without recomputation.
CERT_RTOL = 1e-10
#: extra candidates re-computed exactly in the float32 paths (beyond k).
EXTRA_CANDIDATES = 3
# float32 arithmetic is only used when squared norms stay inside this range (no overflow,
# no subnormal underflow); otherwise float64 is used.
_F32_MAX_NORM2 = 1e36
_F32_MIN_NORM2 = 1e-30
_U32 = 2.0**-24
_U64 = 2.0**-53
_INF = float("inf")

__all__ = ["knn_score", "knn_score_batched", "knn_score_batched_bounded", "knn_score_gathered", "knn_score_bounded"]


# --------------------------------------------------------------------------- validation


def _check_k(k: Any) -> int:
    if isinstance(k, bool):
        raise ValueError(f"k must be a positive integer, got {k!r}; pass e.g. k=3")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be a positive integer, got {k!r} ({type(k).__name__}); pass e.g. k=3") from None
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}; the kNN score needs at least one neighbour (the paper uses k=3)")
    return k


def _as_real(x: Any, name: str, ndim: int, shape_doc: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(
            f"{name} must be a real numeric array of shape {shape_doc}, got dtype {arr.dtype}; "
            f"convert it with np.asarray({name}, dtype=np.float32)"
        )
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dimensions), got shape {arr.shape}; reshape it to {shape_doc}")
    return arr


def _as_index(x: Any, name: str, shape: tuple[int, ...], shape_doc: str, high: int, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be an integer array of shape {shape_doc}, got dtype {arr.dtype}; "
            f"pass {name}.astype(np.int64) (use -1 for none)"
        )
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < -1) | (arr >= high)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        where = pos[0] if len(pos) == 1 else pos
        raise ValueError(
            f"{name}[{where}] = {int(arr[pos])} is out of range: it must be -1 (none) or {what} in [0, {high}); "
            f"{int(bad.sum())} entries are out of range"
        )
    return arr


def _as_mask(x: Any, name: str, shape: tuple[int, ...], shape_doc: str) -> np.ndarray:
    if x is None:
        return np.ones(shape, dtype=bool)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array of shape {shape_doc} (True = real), got dtype {arr.dtype}; pass {name}.astype(bool)")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got shape {arr.shape}")
    return arr


def _check_finite(arr: np.ndarray, name: str, row_ok: np.ndarray | None = None, labels: tuple[str, ...] = ("row",)) -> None:
    """Raise if a (selected) row of ``arr`` (shape ``(..., D)``) holds NaN or inf."""
    lead = arr.shape[:-1]
    if arr.size == 0 or arr.dtype.kind in "iu":
        return
    n0 = lead[0]
    per = max(1, int(BLOCK_BYTES // max(1, arr[0].size)))  # bool temporaries: 1 byte / element
    first = None
    n_bad = 0
    for lo in range(0, n0, per):
        bad = ~np.isfinite(arr[lo : lo + per]).all(axis=-1)
        if row_ok is not None:
            bad &= row_ok[lo : lo + per]
        if bad.any():
            n_bad += int(bad.sum())
            if first is None:
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                first = (first[0] + lo,) + first[1:]
    if first is not None:
        where = ", ".join(f"{lab} {i}" for lab, i in zip(labels, first))
        raise ValueError(
            f"{name} contains NaN or inf at {where} (first bad row; {n_bad} bad row(s) in all); "
            f"re-embed or drop those rows (mask them out where a mask is accepted)"
        )


def _resolve_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device={device!r} is not a valid torch device ({err}); use 'cpu' or 'cuda'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available (torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible; use e.g. 'cuda:0'")
        return dev
    raise ValueError(f"device={device!r} is not supported; use 'cpu' or a CUDA device such as 'cuda' / 'cuda:0'")


def _resolve_precision(precision: Any, dev: torch.device) -> str:
    if precision is None:
        return "float64" if dev.type == "cpu" else "float32"
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be None, 'float32' or 'float64', got {precision!r}")
    return precision


def _check_block(block_size: Any, name: str = "block_size") -> int | None:
    if block_size is None:
        return None
    if isinstance(block_size, bool):
        raise ValueError(f"{name} must be a positive integer or None, got {block_size!r}")
    try:
        block_size = operator.index(block_size)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer or None, got {block_size!r}") from None
    if block_size < 1:
        raise ValueError(f"{name} must be >= 1 (or None for automatic), got {block_size}")
    return block_size


def _sq_norms(x: np.ndarray, name: str) -> np.ndarray:
    """Row squared norms in float64; raise if they overflow."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        n = np.einsum("...d,...d->...", x, x)
    if not np.isfinite(n).all():
        pos = tuple(int(i) for i in np.argwhere(~np.isfinite(n))[0])
        raise ValueError(f"{name} has a row whose squared norm overflows float64 (at {pos}); rescale the features")
    return n


def _f32_safe(*norm_arrays: np.ndarray) -> bool:
    top = max((float(a.max()) for a in norm_arrays if a.size), default=0.0)
    return top <= _F32_MAX_NORM2 and (top == 0.0 or top >= _F32_MIN_NORM2)


def _too_small_message(k: int, details: list[tuple[int, int]], tail: str) -> str:
    shown = ", ".join(f"task {t}: {c}" for t, c in details[:10])
    more = f" (and {len(details) - 10} more)" if len(details) > 10 else ""
    lowest = min(c for _, c in details)
    return (
        f"k={k} is larger than the support set of {len(details)} task(s) (usable rows {tail}: {shown}{more}); "
        f"use k <= {lowest}, or mask out / drop those tasks"
    )


# --------------------------------------------------------------------------- error bounds


def _matmul_input_roundoff(device: torch.device | None) -> float:
    """Unit roundoff of the inputs of a float32 matrix product (TF32/bf16 if torch allows them)."""
    if device is None:  # FAISS on CPU: plain sgemm
        return 0.0
    try:
        prec = torch.get_float32_matmul_precision()
    except Exception:  # pragma: no cover - very old torch
        prec = "medium"
    u_in = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}.get(prec, 2.0**-8)
    if device.type == "cuda":
        try:
            if torch.backends.cuda.matmul.allow_tf32:
                u_in = max(u_in, 2.0**-11)
        except Exception:  # pragma: no cover
            u_in = max(u_in, 2.0**-11)
    return u_in


def _error_coefficient(dim: int, precision: str, u_in: float = 0.0) -> float:
    """``c`` with ``| computed - exact | <= c * (||q||² + ||b||²)`` for the expanded form.

    Norms (error ``γ_D``), the dot product (``2 (u_in + γ_D) |q||b|``, ``u_in`` the rounding of
    the inputs inside the product, e.g. TF32), rounding the inputs to float32 and the two final
    additions (a few ``u``) — with a margin.  ``γ_n = n u / (1 - n u)`` holds for any summation
    order, so it covers blocked BLAS kernels.
    """
    u = _U64 if precision == "float64" else _U32
    nu = max(dim, 1) * u
    if nu >= 0.5:
        return _INF
    gamma = nu / (1.0 - nu)
    return 2.02 * gamma + 2.02 * u_in + 16.0 * u


# --------------------------------------------------------------------------- core (torch)


def _refine_certify(exact_c, cand_valid, boundary, n_usable, err, k):
    """Float32 route: sum the k smallest exact candidate distances and certify the selection.

    exact_c (..., kc) float64 exact distances (+inf where ``cand_valid`` is False); boundary (...)
    the largest approximate distance among the returned candidates (every row not returned has
    an approximate distance >= boundary); n_usable (...) usable rows; err (...) error bound.
    """
    top = torch.topk(exact_c, k, dim=-1, largest=False, sorted=True).values
    sums = top.sum(-1)
    complete = cand_valid.sum(-1) >= n_usable
    ok = complete | (boundary.to(torch.float64) - err >= top[..., -1])
    return sums, ok


def _direct_certify(vals_k, err, k):
    """Float64 route: the sum of the k smallest computed distances is within k·err of the truth."""
    sums = vals_k.sum(-1)
    slack = k * err
    ok = slack <= CERT_RTOL * (sums - slack)
    return sums, ok


def _exact_rows(q_tab, q_idx, b_tab, b_idx, valid, k: int) -> torch.Tensor:
    """Exact scores from differences, in chunks of pairs.

    Pair i compares query ``q_tab[q_idx[i]]`` (float64 (·, D)) with bank rows
    ``b_tab[b_idx[i]]`` (``b_idx`` (n, S)), of which ``valid[i]`` are usable → (n,).
    """
    n = q_idx.shape[0]
    out = torch.empty(n, dtype=torch.float64, device=q_tab.device)
    if n == 0:
        return out
    s, dim = b_idx.shape[1], b_tab.shape[1]
    per = max(1, int(BLOCK_BYTES // max(1, 16 * s * dim)))
    for lo in range(0, n, per):
        hi = lo + per
        d = b_tab[b_idx[lo:hi]].sub_(q_tab[q_idx[lo:hi]][:, None, :]).square_().sum(-1)
        d.masked_fill_(~valid[lo:hi], _INF)
        out[lo:hi] = torch.topk(d, k, dim=-1, largest=False, sorted=True).values.sum(-1)
    return out


def _exact_shared(q64: torch.Tensor, b64: torch.Tensor, excl: torch.Tensor | None, k: int) -> torch.Tensor:
    """Exact scores from differences against one whole bank, blockwise with a running top-k."""
    n, dim = q64.shape
    s = b64.shape[0]
    best = torch.full((n, k), _INF, dtype=torch.float64, device=q64.device)
    if n == 0:
        return best.sum(-1)
    pairs = max(1, int(BLOCK_BYTES // max(1, 16 * dim)))
    sb = max(1, min(s, pairs))
    qb = max(1, min(n, pairs // sb))
    for q0 in range(0, n, qb):
        q1 = min(n, q0 + qb)
        run = best[q0:q1]
        for s0 in range(0, s, sb):
            s1 = min(s, s0 + sb)
            d = (q64[q0:q1, None, :] - b64[None, s0:s1, :]).square_().sum(-1)
            if excl is not None:
                hit = excl[q0:q1, None] == torch.arange(s0, s1, device=q64.device)[None, :]
                d = d.masked_fill(hit, _INF)
            run = torch.topk(torch.cat([run, d], dim=1), k, dim=1, largest=False, sorted=True).values
        best[q0:q1] = run
    return best.sum(-1)


def _torch_candidates(q, b, nb, kc, excl, block_s):
    """Running top-kc of the expanded-form distances of q (n, D) to b (S, D); excluded → +inf.

    Returns (vals (n, kc'), idx (n, kc')) with kc' = min(kc, S), approximate values in q's dtype.
    """
    n = q.shape[0]
    s = b.shape[0]
    kc = min(kc, s)
    nq = (q * q).sum(-1)
    run_v = torch.full((n, 0), _INF, dtype=q.dtype, device=q.device)
    run_i = torch.full((n, 0), -1, dtype=torch.int64, device=q.device)
    for s0 in range(0, s, block_s):
        s1 = min(s, s0 + block_s)
        d = torch.addmm(nb[None, s0:s1], q, b[s0:s1].T, alpha=-2.0).add_(nq[:, None])
        if excl is not None:
            hit = excl[:, None] == torch.arange(s0, s1, device=q.device)[None, :]
            d.masked_fill_(hit, _INF)
        cols = torch.arange(s0, s1, device=q.device).expand(n, -1)
        v = torch.cat([run_v, d], dim=1)
        i = torch.cat([run_i, cols], dim=1)
        m = min(kc, v.shape[1])
        run_v, pos = torch.topk(v, m, dim=1, largest=False, sorted=True)
        run_i = torch.gather(i, 1, pos)
    return run_v, run_i


# --------------------------------------------------------------------------- knn_score


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
    k = _check_k(k)
    q = _as_real(queries, "queries", 2, "(Q, D)")
    b = _as_real(bank, "bank", 2, "(S, D)")
    n_q, dim = q.shape
    s, dim_b = b.shape
    if dim != dim_b:
        raise ValueError(
            f"queries have D={dim} features per row but bank rows have D={dim_b}; "
            f"both must come from the same backbone / feature layer"
        )
    excl = None
    if exclude is not None:
        excl = _as_index(exclude, "exclude", (n_q,), "(Q,)", high=s, what="a row of bank")
        if not (excl >= 0).any():
            excl = None
    if k > s:
        hint = f"use k <= {s}" if s > 0 else "the bank is empty: give it at least k rows"
        raise ValueError(f"k={k} is larger than the support set ({s} rows); {hint}")
    if excl is not None and k > s - 1:
        raise ValueError(
            f"k={k} is larger than the support set minus the excluded row ({s} rows - 1 = {s - 1} usable "
            f"for leave-one-out queries); use k <= {s - 1}"
        )
    block_size = _check_block(block_size)
    dev = _resolve_device(device)
    if precision is not None:
        _resolve_precision(precision, dev)
    _check_finite(q, "queries")
    _check_finite(b, "bank")
    if n_q == 0:
        return np.zeros(0, dtype=np.float64)
    q64 = np.ascontiguousarray(q, dtype=np.float64)
    b64 = np.ascontiguousarray(b, dtype=np.float64)
    nq = _sq_norms(q64, "queries")
    nb = _sq_norms(b64, "bank")
    mode = precision or "float32"
    if mode == "float32" and not _f32_safe(nq, nb):
        LOG.debug("knn_score: squared norms outside the float32-safe range; using float64")
        mode = "float64"

    use_faiss = False
    if mode == "float32":
        use_faiss = _use_faiss(dev)
    kc = min(s, k + EXTRA_CANDIDATES + (1 if excl is not None else 0))
    per_query = 8 * kc * dim * 2 + 4 * dim * 2 + 8 * max(kc, 1) * 4
    if not use_faiss:
        per_query += 8 * min(s, 4096) * 3
    qb = block_size or max(1, min(n_q, int(BLOCK_BYTES // per_query)))
    est = qb * per_query
    (LOG.info if n_q * s * dim > 2e9 else LOG.debug)(
        "knn_score: Q=%d S=%d D=%d k=%d %s %s; blocks of %d queries, ~%.1f MiB per block",
        n_q, s, dim, k, mode, "faiss" if use_faiss else "torch", qb, est / 2**20,
    )

    bank_t = torch.from_numpy(b64).to(dev)
    q_t = torch.from_numpy(q64)
    b64_t = torch.from_numpy(b64)
    excl_t = torch.from_numpy(excl) if excl is not None else None
    nq_t = torch.from_numpy(nq)
    max_nb = float(nb.max())
    out = torch.empty(n_q, dtype=torch.float64)
    ok = torch.ones(n_q, dtype=torch.bool)
    if use_faiss:
        index, _gpu_res = _faiss_index(b64.astype(np.float32), dev)
        q32 = q64.astype(np.float32)
        coef = _error_coefficient(dim, "float32", 2.0**-11 if dev.type == "cuda" else 0.0)
        kc_search = min(s, kc)
    else:
        comp_dtype = torch.float64 if mode == "float64" else torch.float32
        coef = _error_coefficient(dim, mode, _matmul_input_roundoff(dev) if mode == "float32" else 0.0)
        b_comp = bank_t.to(comp_dtype)
        nb_comp = (b_comp * b_comp).sum(-1)
        block_s = max(1, min(s, int(BLOCK_BYTES // max(1, 24 * qb))))

    for q0 in range(0, n_q, qb):
        q1 = min(n_q, q0 + qb)
        ex = excl_t[q0:q1] if excl_t is not None else None
        n_usable = s - (ex >= 0).long() if ex is not None else torch.full((q1 - q0,), s)
        err = coef * (nq_t[q0:q1] + max_nb)
        if use_faiss:
            dist, idx = index.search(q32[q0:q1], kc_search)
            vals = torch.from_numpy(dist)
            idx = torch.from_numpy(idx.astype(np.int64))
        else:
            qc = q_t[q0:q1].to(dev, comp_dtype)
            vals, idx = _torch_candidates(qc, b_comp, nb_comp, kc if mode == "float32" else k, ex.to(dev) if ex is not None else None, block_s)
            vals, idx = vals.cpu(), idx.cpu()
        if mode == "float64":
            sums, good = _direct_certify(vals.to(torch.float64), err, k)
        else:
            boundary = vals.max(dim=1).values
            cand_valid = idx >= 0
            if ex is not None:
                cand_valid &= idx != ex[:, None]
            safe = idx.clamp(min=0)
            rows = b64_t[safe]  # (qb, kc, D) float64, a fresh gather
            exact = rows.sub_(q_t[q0:q1, None, :]).square_().sum(-1).masked_fill_(~cand_valid, _INF)
            del rows
            sums, good = _refine_certify(exact, cand_valid, boundary, n_usable, err, k)
        out[q0:q1] = sums
        ok[q0:q1] = good

    bad = torch.nonzero(~ok).flatten()
    if bad.numel():
        # second tier: float64 candidates (a much tighter bound), refined exactly and certified
        LOG.debug("knn_score: %d of %d scores not certified; re-selecting them in float64", bad.numel(), n_q)
        qf = q_t[bad].to(dev)
        exf = excl_t[bad].to(dev) if excl_t is not None else None
        coef64 = _error_coefficient(dim, "float64")
        nb64 = torch.from_numpy(nb).to(dev)
        kc2 = min(s, k + EXTRA_CANDIDATES + (1 if excl is not None else 0))
        block_s2 = max(1, min(s, int(BLOCK_BYTES // max(1, 24 * bad.numel()))))
        vals, idx = _torch_candidates(qf, bank_t, nb64, kc2, exf, block_s2)
        cand_valid = idx >= 0
        if exf is not None:
            cand_valid &= idx != exf[:, None]
        exact = bank_t[idx.clamp(min=0)].sub_(qf[:, None, :]).square_().sum(-1).masked_fill_(~cand_valid, _INF)
        n_usable = s - (exf >= 0).long() if exf is not None else torch.full((bad.numel(),), s, device=dev)
        err = coef64 * (torch.from_numpy(nq).to(dev)[bad.to(dev)] + max_nb)
        sums, good = _refine_certify(exact, cand_valid, vals.max(dim=1).values, n_usable, err, k)
        out[bad] = sums.cpu()
        still = bad[~good.cpu()]
        if still.numel():
            LOG.debug("knn_score: %d scores recomputed exactly against the whole bank", still.numel())
            out[still] = _exact_shared(q_t[still].to(dev), bank_t, excl_t[still].to(dev) if excl_t is not None else None, k).cpu()
    return out.numpy()


def _use_faiss(dev: torch.device) -> bool:
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


# --------------------------------------------------------------------------- knn_score_batched


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
        a neighbour of that query (leave-one-out), or -1.  Excluding a padding row is a no-op.
    device : 'cpu' or a CUDA device.
    block_size : tasks per chunk (default: sized from ``BLOCK_BYTES``).
    precision : None (float64 on CPU, float32 + exact float64 refinement on CUDA), 'float32'
        or 'float64'.

    Returns
    -------
    (T, Q) float64; NaN where ``query_mask`` is False.
    """
    k = _check_k(k)
    q = _as_real(queries, "queries", 3, "(T, Q, D)")
    b = _as_real(banks, "banks", 3, "(T, S, D)")
    n_t, n_q, dim = q.shape
    n_tb, s, dim_b = b.shape
    if n_tb != n_t:
        raise ValueError(f"queries hold T={n_t} tasks but banks hold T={n_tb}; both must have one entry per task along axis 0")
    if dim != dim_b:
        raise ValueError(f"queries have D={dim} features per row but bank rows have D={dim_b}; both must come from the same backbone / feature layer")
    qmask = _as_mask(query_mask, "query_mask", (n_t, n_q), "(T, Q)")
    bmask = _as_mask(bank_mask, "bank_mask", (n_t, s), "(T, S)")
    excl = None
    if exclude is not None:
        excl = _as_index(exclude, "exclude", (n_t, n_q), "(T, Q)", high=s, what="a row of that task's bank")
        excl = np.where(qmask, excl, -1)
        excl_hit = (excl >= 0) & np.take_along_axis(bmask, np.maximum(excl, 0), axis=1)
        excl = np.where(excl_hit, excl, -1)
        if not (excl >= 0).any():
            excl = None
    block_size = _check_block(block_size)
    dev = _resolve_device(device)
    mode = _resolve_precision(precision, dev)
    # usable bank rows per real query
    n_valid = bmask.sum(axis=1)
    usable = np.broadcast_to(n_valid[:, None], (n_t, n_q)) - (excl >= 0 if excl is not None else 0)
    short = qmask & (usable < k)
    if short.any():
        tasks = np.flatnonzero(short.any(axis=1))
        low = np.where(qmask, usable, np.iinfo(np.int64).max).min(axis=1)
        raise ValueError(_too_small_message(k, [(int(t), int(low[t])) for t in tasks], "= real bank rows minus an excluded row"))
    _check_finite(q, "queries", qmask, ("task", "row"))
    _check_finite(b, "banks", bmask, ("task", "row"))
    out = np.full((n_t, n_q), np.nan)
    if n_t == 0 or n_q == 0 or not qmask.any():
        return out

    kc = min(s, k + EXTRA_CANDIDATES)
    per_query = dim * 8 * 2 + s * 8 * 3 + (kc * (dim * 8 * 2 + 40) if mode == "float32" else 0)
    qc = max(1, min(n_q, int(BLOCK_BYTES // per_query)))
    per_task = qc * per_query + s * dim * 8 * 3
    tc = block_size or max(1, min(n_t, int(BLOCK_BYTES // per_task)))
    (LOG.info if n_t * n_q * s * dim > 2e9 else LOG.debug)(
        "knn_score_batched: T=%d Q=%d S=%d D=%d k=%d %s on %s; chunks of %d tasks x %d queries, ~%.1f MiB per chunk",
        n_t, n_q, s, dim, k, mode, dev, tc, qc, tc * per_task / 2**20,
    )
    u_in = _matmul_input_roundoff(dev) if mode == "float32" else 0.0
    n_fail = 0
    for t0 in range(0, n_t, tc):
        t1 = min(n_t, t0 + tc)
        if not qmask[t0:t1].any():
            continue
        bm_np = bmask[t0:t1]
        b_np = np.array(b[t0:t1], dtype=np.float64)  # a copy: padding rows are zeroed below
        b_np[~bm_np] = 0.0  # padding may hold anything, NaN included
        nb_np = np.einsum("tsd,tsd->ts", b_np, b_np)
        chunk_mode = mode if (mode == "float64" or _f32_safe(nb_np)) else "float64"
        bm = torch.from_numpy(bm_np).to(dev)
        b64 = torch.from_numpy(b_np).to(dev)
        nb = torch.from_numpy(nb_np).to(dev)
        max_nb = nb.max(dim=1).values  # padding rows are zero
        n_real = bm.sum(1)
        for q0 in range(0, n_q, qc):
            q1 = min(n_q, q0 + qc)
            nqc = q1 - q0
            qm_np = qmask[t0:t1, q0:q1]
            if not qm_np.any():
                continue
            q_np = np.array(q[t0:t1, q0:q1], dtype=np.float64)
            q_np[~qm_np] = 0.0
            nq_np = np.einsum("tqd,tqd->tq", q_np, q_np)
            cmode = chunk_mode if (chunk_mode == "float64" or _f32_safe(nq_np)) else "float64"
            cdt = torch.float64 if cmode == "float64" else torch.float32
            coef = _error_coefficient(dim, cmode, u_in if cmode == "float32" else 0.0)
            qm = torch.from_numpy(qm_np).to(dev)
            q64 = torch.from_numpy(q_np).to(dev)
            nq = torch.from_numpy(nq_np).to(dev)
            if cdt == torch.float64:
                bc, qcmp, nbc, nqc_ = b64, q64, nb, nq
            else:
                bc, qcmp = b64.to(cdt), q64.to(cdt)
                nbc, nqc_ = (bc * bc).sum(-1), (qcmp * qcmp).sum(-1)
            nbc = nbc.masked_fill(~bm, _INF)
            dist = torch.baddbmm(nbc[:, None, :], qcmp, bc.transpose(1, 2), alpha=-2.0).add_(nqc_[:, :, None])
            ex = None
            if excl is not None:
                ex_np = excl[t0:t1, q0:q1]
                if (ex_np >= 0).any():
                    ex = torch.from_numpy(ex_np).to(dev)
                    col = ex.clamp(min=0)[:, :, None]
                    cur = dist.gather(2, col)
                    dist.scatter_(2, col, torch.where(ex[:, :, None] >= 0, torch.full_like(cur, _INF), cur))
            err = coef * (nq + max_nb[:, None])
            if cmode == "float64":
                vals = torch.topk(dist, k, dim=-1, largest=False, sorted=True).values
                sums, good = _direct_certify(vals, err, k)
            else:
                vals, idx = torch.topk(dist, kc, dim=-1, largest=False, sorted=True)
                cand_valid = torch.gather(bm[:, None, :].expand(-1, nqc, -1), 2, idx)
                if ex is not None:
                    cand_valid &= idx != ex[:, :, None]
                tix = torch.arange(t1 - t0, device=dev)[:, None, None]
                rows = b64[tix, idx]  # (tc, qc, kc, D), a fresh gather
                exact = rows.sub_(q64[:, :, None, :]).square_().sum(-1).masked_fill_(~cand_valid, _INF)
                del rows
                n_usable = n_real[:, None] - (ex >= 0).long() if ex is not None else n_real[:, None].expand(-1, nqc)
                sums, good = _refine_certify(exact, cand_valid, vals.max(dim=-1).values, n_usable, err, k)
            good = good | ~qm
            if not bool(good.all()):
                ti, qi = torch.nonzero(~good, as_tuple=True)
                valid = bm[ti]
                if ex is not None:
                    valid = valid & (torch.arange(s, device=dev)[None, :] != ex[ti, qi][:, None])
                sums[ti, qi] = _exact_rows(
                    q64.reshape(-1, dim), ti * nqc + qi, b64.reshape(-1, dim),
                    ti[:, None] * s + torch.arange(s, device=dev)[None, :], valid, k,
                )
                n_fail += int(ti.numel())
            out[t0:t1, q0:q1] = np.where(qm_np, sums.cpu().numpy(), np.nan)
    if n_fail:
        LOG.debug("knn_score_batched: %d scores not certified; recomputed exactly", n_fail)
    return out


# --------------------------------------------------------------------------- knn_score_gathered


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
    k = _check_k(k)
    q = _as_real(queries, "queries", 2, "(Q, D)")
    f = _as_real(features, "features", 2, "(N, D)")
    n_q, dim = q.shape
    n_f, dim_f = f.shape
    if dim != dim_f:
        raise ValueError(f"queries have D={dim} features per row but features rows have D={dim_f}; both must come from the same backbone / feature layer")
    if isinstance(bank_index, torch.Tensor):
        bank_index = bank_index.detach().cpu().numpy()
    bi = np.asarray(bank_index)
    if bi.ndim != 2:
        raise ValueError(f"bank_index must have shape (T, S) (2 dimensions), got shape {bi.shape}; use -1 to pad shorter banks")
    n_t, s = bi.shape
    bi = _as_index(bi, "bank_index", (n_t, s), "(T, S)", high=n_f, what="a row of features")
    excl = None
    if exclude is not None:
        excl = _as_index(exclude, "exclude", (n_t, n_q), "(T, Q)", high=n_f, what="a row of features")
        if not (excl >= 0).any():
            excl = None
    block_size = _check_block(block_size)
    dev = _resolve_device(device)
    mode = _resolve_precision(precision, dev)
    valid = bi >= 0
    n_valid = valid.sum(axis=1)
    if n_q > 0:
        low = n_valid.copy()
        if excl is not None:
            # usable = valid slots minus the slots holding the excluded row (more than one only
            # when a task lists a row twice); exact per-query counts only where that can bite
            mult = np.ones(n_t, dtype=np.int64)
            srt = np.sort(np.where(valid, bi, -1), axis=1)
            for t in np.flatnonzero(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(axis=1)):
                mult[t] = np.unique(bi[t][valid[t]], return_counts=True)[1].max()
            for t in np.flatnonzero(n_valid - mult < k):
                hits = (bi[t][None, :] == excl[t][:, None]) & valid[t][None, :]
                low[t] = n_valid[t] - int(hits.sum(axis=1).max())
        short = np.flatnonzero(low < k)
        if short.size:
            raise ValueError(_too_small_message(k, [(int(t), int(low[t])) for t in short], "= bank rows minus excluded row(s)"))
    _check_finite(q, "queries")
    used = np.unique(bi[valid])
    if used.size:
        fin = np.isfinite(f[used]).all(axis=1) if f.dtype.kind == "f" else np.ones(used.size, bool)
        if not fin.all():
            row = int(used[np.argmin(fin)])
            task = int(np.argwhere(bi == row)[0, 0])
            raise ValueError(
                f"features contains NaN or inf at row {row} (first bad row used by a bank, e.g. task {task}; "
                f"{int((~fin).sum())} bad row(s) in use); re-embed those rows or drop them from bank_index"
            )
    out = np.empty((n_t, n_q), dtype=np.float64)
    if n_t == 0 or n_q == 0:
        return out

    n_u = used.size
    local = np.full((n_t, s), n_u, dtype=np.int64)  # padding → a zero row whose distance is +inf
    local[valid] = np.searchsorted(used, bi[valid])
    f64 = np.concatenate([np.asarray(f[used], dtype=np.float64), np.zeros((1, dim))], axis=0)
    q64 = np.ascontiguousarray(q, dtype=np.float64)
    nq = _sq_norms(q64, "queries")
    nf = np.append(_sq_norms(f64[:n_u], "features"), _INF)
    if mode == "float32" and not _f32_safe(nq, nf[:n_u]):
        LOG.debug("knn_score_gathered: squared norms outside the float32-safe range; using float64")
        mode = "float64"
    # Distances are laid out (Qb, S, T): slot-major, so the k smallest per task reduce over a
    # middle axis with elementwise min/max (fast for small k).  When the banks barely overlap,
    # the matrix product is taken directly against the T*S bank slots in that order (no gather);
    # otherwise against the distinct rows once, then gathered.
    direct = n_t * s <= 1.25 * n_u
    cols = local.T.reshape(-1)  # (S*T,) slot-major
    n_cols = n_t * s if direct else n_u + 1
    kc = min(s, k + EXTRA_CANDIDATES)
    csize = 8 if mode == "float64" else 4
    per_query = n_cols * csize + n_t * s * (csize * (1 if direct else 2) + 1) + n_t * (8 * 2 * k + 16) + dim * 8
    if mode == "float32":
        per_query += n_t * kc * (dim * 8 * 2 + 40)
    if block_size:
        qb = block_size
    else:
        budget = BLOCK_BYTES
        if dev.type == "cuda":
            try:
                budget = max(budget, min(int(torch.cuda.mem_get_info(dev)[0] // 4), 4 * 2**30))
            except Exception:  # pragma: no cover
                pass
        qb = max(1, min(n_q, int(budget // per_query)))
    fixed = (n_cols if direct else n_u + 1) * dim * (8 + csize)
    (LOG.info if n_q * n_cols * dim > 2e9 else LOG.debug)(
        "knn_score_gathered: Q=%d N_used=%d D=%d T=%d S=%d k=%d %s on %s (%s); blocks of %d queries, "
        "~%.1f MiB per block + %.1f MiB for the bank rows",
        n_q, n_u, dim, n_t, s, k, mode, dev, "slot columns" if direct else "distinct rows + gather",
        qb, qb * per_query / 2**20, fixed / 2**20,
    )

    cdt = torch.float64 if mode == "float64" else torch.float32
    coef = _error_coefficient(dim, mode, _matmul_input_roundoff(dev) if mode == "float32" else 0.0)
    f64_t = torch.from_numpy(f64).to(dev)  # distinct rows + zero row (exact refinement / fall-back)
    cols_t = torch.from_numpy(cols).to(dev)
    if direct:
        fc = f64_t[cols_t].to(cdt)
        nfc = torch.from_numpy(nf).to(dev)[cols_t].to(cdt)
    else:
        fc = f64_t.to(cdt)
        nfc = torch.from_numpy(nf).to(dev).to(cdt)
    fcT = fc.T
    local_t = torch.from_numpy(local).to(dev)
    valid_t = torch.from_numpy(valid).to(dev)
    bi_sT = torch.from_numpy(np.ascontiguousarray(bi.T)).to(dev)  # (S, T)
    max_nf = torch.from_numpy(np.where(valid, nf[local], 0.0).max(axis=1) if s else np.zeros(n_t)).to(dev)
    excl_t = torch.from_numpy(excl).to(dev) if excl is not None else None
    use_net = mode == "float64" and k <= 8
    n_fail = 0
    for q0 in range(0, n_q, qb):
        q1 = min(n_q, q0 + qb)
        nb_ = q1 - q0
        qd = torch.from_numpy(q64[q0:q1]).to(dev)
        qcmp = qd.to(cdt)
        dist = torch.addmm(nfc[None, :], qcmp, fcT, alpha=-2.0).add_((qcmp * qcmp).sum(-1)[:, None])
        g = dist.view(nb_, s, n_t) if direct else dist.index_select(1, cols_t).view(nb_, s, n_t)
        del dist
        hit = None
        if excl_t is not None:
            ex = excl_t[:, q0:q1].T  # (Qb, T)
            hit = (bi_sT[None, :, :] == ex[:, None, :]) & (ex[:, None, :] >= 0)  # (Qb, S, T)
            g.masked_fill_(hit, _INF)
        err = coef * (torch.from_numpy(nq[q0:q1]).to(dev)[:, None] + max_nf[None, :])
        if mode == "float64":
            vals = _k_smallest_mid(g, k) if use_net else torch.topk(g, k, dim=1, largest=False, sorted=True).values.transpose(1, 2)
            sums, good = _direct_certify(vals, err, k)
        else:
            vals, idx = torch.topk(g, kc, dim=1, largest=False, sorted=True)  # (Qb, kc, T)
            valid_sT = valid_t.T[None].expand(nb_, -1, -1)
            cand_valid = torch.gather(valid_sT, 1, idx)
            if hit is not None:
                cand_valid &= ~torch.gather(hit, 1, idx)
                n_usable = (valid_sT & ~hit).sum(1)
            else:
                n_usable = valid_t.sum(1)[None, :].expand(nb_, -1)
            rows_local = torch.gather(local_t.T[None].expand(nb_, -1, -1), 1, idx)  # (Qb, kc, T)
            exact = torch.empty(nb_, kc, n_t, dtype=torch.float64, device=dev)
            sub = max(1, int(BLOCK_BYTES // max(1, n_t * kc * dim * 16)))
            for a in range(0, nb_, sub):
                rows = f64_t[rows_local[a : a + sub]]  # (sub, kc, T, D), a fresh gather
                exact[a : a + sub] = rows.sub_(qd[a : a + sub, None, None, :]).square_().sum(-1)
            exact.masked_fill_(~cand_valid, _INF)
            sums, good = _refine_certify(
                exact.transpose(1, 2), cand_valid.transpose(1, 2), vals.max(dim=1).values, n_usable, err, k
            )
        if not bool(good.all()):
            qi, ti = torch.nonzero(~good, as_tuple=True)
            ok_rows = valid_t[ti]
            if hit is not None:
                ok_rows = ok_rows & ~hit[qi, :, ti]
            sums[qi, ti] = _exact_rows(qd, qi, f64_t, local_t[ti], ok_rows, k)
            n_fail += int(qi.numel())
        out[:, q0:q1] = sums.T.cpu().numpy()
    if n_fail:
        LOG.debug("knn_score_gathered: %d of %d scores not certified; recomputed exactly", n_fail, n_t * n_q)
    return out


#: features per float32 partial dot product in :func:`knn_score_bounded`; the partial sums are
#: added separately, so each product passes through at most ``DOT_CHUNK + D / DOT_CHUNK``
#: roundings instead of ``D`` and the a priori error bound is ~D/(2·sqrt(D)) times tighter.
DOT_CHUNK = 256


def knn_score_bounded(queries, features, bank_index, k: int = 3, *, device="cpu", block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fast kNN scores of shared queries against many banks, each with a rigorous error bound.

    The float32 form of :func:`knn_score_gathered` without its exact refinement: for rank
    statistics (AUROC) most scores need no more, and the caller refines only the scores whose
    bound makes an order uncertain (``swsa_engine.sweep``).  Queries are never in the banks
    (no leave-one-out).

    Parameters
    ----------
    queries : (Q, D) real array.
    features : (N, D) real array; only rows named in ``bank_index`` are read.
    bank_index : (T, S) int row indices into ``features``, -1 = padding; every task has >= k rows.

    Returns
    -------
    scores : (T, Q) float64, the sum of the k smallest squared L2 distances, computed as
        ``||q||² + ||b||² - 2 q·b`` with the dot products in float32.
    bounds : (T, Q) float64 with ``|scores - exact| <= bounds``, ``exact`` the brute-force float64
        score.  Rows are centred on the banks' mean (in float64) and their norms taken in float64
        before rounding to float32, and the dot products are summed in chunks of
        :data:`DOT_CHUNK` features, so the bound is ``≈ 2 k γ_h ||q|| max||b||`` with
        ``h = DOT_CHUNK + D / DOT_CHUNK`` (Higham's ``γ_h = h u / (1 - h u)`` holds for any
        summation order inside a BLAS kernel).  Where features are outside float32's safe range
        the scores are exact and the bounds 0.
    """
    k = _check_k(k)
    q = _as_real(queries, "queries", 2, "(Q, D)")
    f = _as_real(features, "features", 2, "(N, D)")
    if np.ndim(bank_index) != 2 or q.shape[1] != f.shape[1]:
        raise ValueError(f"bank_index must be (T, S) and queries/features must share D; got {np.shape(bank_index)}, {q.shape}, {f.shape}")
    bi = _as_index(bank_index, "bank_index", np.shape(bank_index), "(T, S)", high=f.shape[0], what="a row of features")
    n_t, s = bi.shape
    n_q, dim = q.shape
    valid = bi >= 0
    short = np.flatnonzero(valid.sum(axis=1) < k)
    if short.size:
        raise ValueError(_too_small_message(k, [(int(t), int(valid[t].sum())) for t in short], "= bank rows"))
    scores = np.empty((n_t, n_q))
    bounds = np.zeros((n_t, n_q))
    if n_t == 0 or n_q == 0:
        return scores, bounds
    used = np.unique(bi[valid])
    _check_finite(q, "queries")
    f64 = np.asarray(f[used], dtype=np.float64)
    _check_finite(f64, "features rows used by a bank")
    centre = f64.mean(axis=0)
    fc = f64 - centre
    qc = np.asarray(q, dtype=np.float64) - centre
    nq = _sq_norms(qc, "queries")
    nf = _sq_norms(fc, "features")
    if not _f32_safe(nq, nf):
        return knn_score_gathered(queries, features, bank_index, k, device=device, precision="float64"), bounds
    dev = _resolve_device(device)
    n_u = used.size
    local = np.full((n_t, s), n_u, dtype=np.int64)
    local[valid] = np.searchsorted(used, bi[valid])
    direct = n_t * s <= 1.25 * n_u
    cols = torch.from_numpy(local.T.reshape(-1)).to(dev)  # slot-major: (S*T,)
    n_chunks = -(-dim // DOT_CHUNK)
    width = n_chunks * DOT_CHUNK if n_chunks > 1 else dim
    bank = np.zeros((n_u + 1, width), dtype=np.float32)  # last row: padding slot, never a neighbour
    bank[:n_u, :dim] = fc
    bank_t = torch.from_numpy(bank).to(dev)
    norms = torch.from_numpy(np.append(nf, _INF).astype(np.float32)).to(dev)
    if direct:
        bank_t, norms = bank_t[cols], norms[cols]
    n_cols = bank_t.shape[0]
    bank_chunks = bank_t.T.reshape(n_chunks, width // n_chunks, n_cols).contiguous()  # (P, c, n_cols)
    del bank_t
    per_query = 4 * (n_cols * (n_chunks + 1) + n_t * s * (0 if direct else 1)) + 16 * n_t * k
    qb = block_size or max(1, min(n_q, int(BLOCK_BYTES // per_query)))
    queries32 = np.zeros((n_q, width), dtype=np.float32)
    queries32[:, :dim] = qc
    q_t = torch.from_numpy(queries32).to(dev)
    nq_t = torch.from_numpy(nq.astype(np.float32)).to(dev)
    for q0 in range(0, n_q, qb):
        q1 = min(n_q, q0 + qb)
        q_chunks = q_t[q0:q1].reshape(q1 - q0, n_chunks, -1).transpose(0, 1)  # (P, Qb, c)
        dot = torch.bmm(q_chunks, bank_chunks).sum(0) if n_chunks > 1 else q_chunks[0] @ bank_chunks[0]
        dist = dot.mul_(-2.0).add_(norms[None, :]).add_(nq_t[q0:q1, None])
        g = dist.view(q1 - q0, s, n_t) if direct else dist.index_select(1, cols).view(q1 - q0, s, n_t)
        del dot, dist
        scores[:, q0:q1] = _k_smallest_mid(g, k).to(torch.float64).sum(-1).T.cpu().numpy()
    max_nf = np.where(valid, np.append(nf, 0.0)[local], 0.0).max(axis=1)
    bounds[:] = _score_bounds(k, dim, nq[None, :], max_nf[:, None], scores, _matmul_input_roundoff(dev))
    return scores, bounds


def _score_bounds(k: int, dim: int, nq: np.ndarray, max_nb: np.ndarray, scores: np.ndarray, u_in: float = 0.0) -> np.ndarray:
    """Bound on ``|score - exact|`` for the chunked float32 expanded form (broadcasting arrays).

    Per distance: the dot product (``γ_h``, ``h`` roundings per product) and the rounding of the
    inputs to float32 (``2u``) on ``2 ||q|| ||b||``; the norms rounded to float32 and the two
    additions (``3u``); the float64 centring (a few ``u64``).  Times ``k`` for the sum of the
    ``k`` smallest (each order statistic moves by at most the largest error), plus its float64 sum.
    ``u_in``: the rounding of the inputs inside the product (TF32 on CUDA, see
    :func:`_matmul_input_roundoff`).
    """
    n_chunks = -(-dim // DOT_CHUNK)
    depth = (DOT_CHUNK + n_chunks + 1) if n_chunks > 1 else dim + 1
    u = _U32
    gamma = depth * u / (1.0 - depth * u)
    cross = 2.0 * np.sqrt(nq * max_nb)
    per_distance = (gamma + 2.1 * u + 2.02 * u_in) * cross + (3.1 * u + 8 * _U64) * (nq + max_nb + cross)
    return 1.01 * k * per_distance + 4.0 * k * _U64 * np.abs(scores)


def _chunked_dots(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, W, D) · (B, S, D) → (B, W, S) float32 dot products summed over :data:`DOT_CHUNK`-feature
    chunks separately, then across chunks (see :func:`_score_bounds`)."""
    n_b, n_w, dim = q.shape
    n_chunks = -(-dim // DOT_CHUNK)
    if n_chunks == 1:
        return torch.bmm(q, b.transpose(1, 2))
    width = n_chunks * DOT_CHUNK
    if width != dim:
        q = torch.nn.functional.pad(q, (0, width - dim))
        b = torch.nn.functional.pad(b, (0, width - dim))
    qs = q.reshape(n_b, n_w, n_chunks, DOT_CHUNK).transpose(1, 2).reshape(n_b * n_chunks, n_w, DOT_CHUNK)
    bs = b.reshape(n_b, -1, n_chunks, DOT_CHUNK).transpose(1, 2).reshape(n_b * n_chunks, -1, DOT_CHUNK)
    return torch.bmm(qs, bs.transpose(1, 2)).view(n_b, n_chunks, n_w, -1).sum(1)


def knn_score_batched_bounded(queries, banks, k: int = 3, *, query_mask=None, bank_mask=None, exclude=None,
                              device="cpu", block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Float32 kNN scores of per-task queries against per-task banks, each with an error bound.

    The bounded form of :func:`knn_score_batched` (same parameters, leave-one-out included):
    returns ``scores`` (T, Q) float64 (NaN where ``query_mask`` is False) and ``bounds`` (T, Q)
    with ``|scores - exact| <= bounds`` (0 where masked).  Each task's rows are centred on its
    bank's mean in float64 first; see :func:`knn_score_bounded` for the error model.
    """
    k = _check_k(k)
    q = _as_real(queries, "queries", 3, "(T, Q, D)")
    b = _as_real(banks, "banks", 3, "(T, S, D)")
    n_t, n_q, dim = q.shape
    if b.shape[0] != n_t or b.shape[2] != dim:
        raise ValueError(f"queries (T, Q, D) = {q.shape} and banks (T, S, D) = {b.shape} must agree on T and D")
    s = b.shape[1]
    qmask = _as_mask(query_mask, "query_mask", (n_t, n_q), "(T, Q)")
    bmask = _as_mask(bank_mask, "bank_mask", (n_t, s), "(T, S)")
    excl = np.full((n_t, n_q), -1, dtype=np.int64)
    if exclude is not None:
        excl = _as_index(exclude, "exclude", (n_t, n_q), "(T, Q)", high=s, what="a row of that task's bank")
        excl = np.where(qmask & (excl >= 0) & np.take_along_axis(bmask, np.maximum(excl, 0), axis=1), excl, -1)
    usable = bmask.sum(axis=1)[:, None] - (excl >= 0)
    short = qmask & (usable < k)
    if short.any():
        low = np.where(qmask, usable, np.iinfo(np.int64).max).min(axis=1)
        raise ValueError(_too_small_message(k, [(int(t), int(low[t])) for t in np.flatnonzero(short.any(axis=1))],
                                            "= real bank rows minus an excluded row"))
    _check_finite(q, "queries", qmask, ("task", "row"))
    _check_finite(b, "banks", bmask, ("task", "row"))
    scores = np.full((n_t, n_q), np.nan)
    bounds = np.zeros((n_t, n_q))
    if n_t == 0 or n_q == 0 or not qmask.any():
        return scores, bounds
    dev = _resolve_device(device)
    n_chunks = -(-dim // DOT_CHUNK)
    per_task = 8 * dim * (n_q + s) * 2 + 4 * n_q * s * (n_chunks + 2)
    tc = block_size or max(1, int(BLOCK_BYTES // per_task))
    for t0 in range(0, n_t, tc):
        t1 = min(n_t, t0 + tc)
        qm, bm = qmask[t0:t1], bmask[t0:t1]
        if not qm.any():
            continue
        b64 = np.where(bm[..., None], b[t0:t1], 0.0)
        centre = b64.sum(axis=1) / np.maximum(bm.sum(axis=1), 1)[:, None]
        b64 = np.where(bm[..., None], b64 - centre[:, None, :], 0.0)
        q64 = np.where(qm[..., None], q[t0:t1] - centre[:, None, :], 0.0)
        nb = _sq_norms(b64, "banks")
        nq = _sq_norms(q64, "queries")
        if not _f32_safe(nq, nb):
            exact = knn_score_batched(q[t0:t1], b[t0:t1], k, query_mask=qm, bank_mask=bm, exclude=excl[t0:t1],
                                      device=device, precision="float64")
            scores[t0:t1] = exact
            continue
        q32 = torch.from_numpy(q64.astype(np.float32)).to(dev)
        b32 = torch.from_numpy(b64.astype(np.float32)).to(dev)
        nb32 = torch.from_numpy(np.where(bm, nb, np.inf).astype(np.float32)).to(dev)
        dist = _chunked_dots(q32, b32).mul_(-2.0).add_(nb32[:, None, :]).add_(torch.from_numpy(nq.astype(np.float32)).to(dev)[:, :, None])
        ex = torch.from_numpy(excl[t0:t1]).to(dev)
        hit = ex >= 0
        if bool(hit.any()):
            ti, wi = torch.nonzero(hit, as_tuple=True)
            dist[ti, wi, ex[ti, wi]] = _INF
        smallest = torch.topk(dist, k, dim=2, largest=False, sorted=False).values.to(torch.float64).sum(-1).cpu().numpy()
        scores[t0:t1] = np.where(qm, smallest, np.nan)
        max_nb = nb.max(axis=1, initial=0.0)[:, None]
        bounds[t0:t1] = np.where(qm, _score_bounds(k, dim, nq, max_nb, np.nan_to_num(smallest), _matmul_input_roundoff(dev)), 0.0)
    return scores, bounds


def _k_smallest_mid(g: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest values of g (B, S, T) along axis 1, ascending, as (B, T, k).

    A running insertion network of elementwise min/max over the S slices: 2k cheap
    vectorised passes per slice, much faster than ``torch.topk`` over millions of tiny rows.
    """
    s = g.shape[1]
    best = [g[:, j, :].clone() for j in range(min(k, s))]
    # sort the first k slices elementwise (insertion)
    for j in range(1, len(best)):
        x = best[j]
        for i in range(j):
            lo = torch.minimum(best[i], x)
            x = torch.maximum(best[i], x)
            best[i] = lo
        best[j] = x
    for j in range(len(best), s):
        x = g[:, j, :]
        for i in range(k):
            lo = torch.minimum(best[i], x)
            if i < k - 1:
                x = torch.maximum(best[i], x)
            best[i] = lo
    return torch.stack(best, dim=-1)
