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
import warnings
from dataclasses import dataclass
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

__all__ = ["knn_score", "knn_score_batched", "knn_score_batched_bounded", "knn_score_gathered", "knn_score_bounded",
           "CentredRows", "centre_rows", "bounded_knn_shared", "bounded_knn_tasks", "exact_knn_candidates"]


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


def _as_numpy(x: Any) -> np.ndarray:
    """An array or a torch tensor (any device) as a NumPy array, without copying a NumPy input."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_real(x: Any, name: str, ndim: int, shape_doc: str) -> np.ndarray:
    arr = _as_numpy(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real numeric array of shape {shape_doc}, got dtype {arr.dtype}; "
                         f"convert it with np.asarray({name}, dtype=np.float32)")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dimensions), got shape {arr.shape}; reshape it to {shape_doc}")
    return arr


def _as_index(x: Any, name: str, shape: tuple[int, ...], shape_doc: str, high: int, what: str) -> np.ndarray:
    arr = _as_numpy(x)
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
    arr = _as_numpy(x)
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


def _check_same_dim(dim: int, other_dim: int, other: str) -> None:
    if dim != other_dim:
        raise ValueError(
            f"queries have D={dim} features per row but {other} have D={other_dim}; "
            f"both must come from the same backbone / feature layer"
        )


def _drop_if_unused(excl: np.ndarray) -> np.ndarray | None:
    """``excl``, or None when it excludes nothing (the kernels then skip the exclusion work)."""
    return excl if (excl >= 0).any() else None


def _check_run_options(block_size: Any, device: Any, precision: Any, default_precision: str | None = None
                       ) -> tuple[int | None, torch.device, str]:
    """Validated ``(block_size, device, precision)``; ``precision=None`` means ``default_precision``,
    or, when that is None too, float64 on CPU and float32 on CUDA."""
    block_size = _check_block(block_size)
    dev = _resolve_device(device)
    if precision is None and default_precision is not None:
        return block_size, dev, default_precision
    return block_size, dev, _resolve_precision(precision, dev)


def _task_exclusions(exclude: Any, query_mask: np.ndarray, bank_mask: np.ndarray) -> np.ndarray:
    """Validated (T, Q) per-task exclusions; excluding for a masked query, or a padding row, is a no-op (-1)."""
    excl = _as_index(exclude, "exclude", query_mask.shape, "(T, Q)", high=bank_mask.shape[1], what="a row of that task's bank")
    excl_hit = query_mask & (excl >= 0) & np.take_along_axis(bank_mask, np.maximum(excl, 0), axis=1)
    return np.where(excl_hit, excl, -1)


def _check_task_rows(k: int, q: np.ndarray, b: np.ndarray, query_mask: np.ndarray, bank_mask: np.ndarray,
                     excl: np.ndarray | None) -> None:
    """Raise unless every real query (T, Q) keeps >= k usable rows of its bank and every real row is finite."""
    usable = bank_mask.sum(axis=1)[:, None] - (excl >= 0 if excl is not None else 0)
    short = query_mask & (usable < k)
    if short.any():
        tasks = np.flatnonzero(short.any(axis=1))
        low = np.where(query_mask, usable, np.iinfo(np.int64).max).min(axis=1)
        raise ValueError(_too_small_message(k, [(int(t), int(low[t])) for t in tasks], "= real bank rows minus an excluded row"))
    _check_finite(q, "queries", query_mask, ("task", "row"))
    _check_finite(b, "banks", bank_mask, ("task", "row"))


def _safe_precision(mode: str, *norm_arrays: np.ndarray, caller: str | None = None) -> str:
    """``mode``, or float64 where float32 would overflow or underflow on these squared norms
    (said at DEBUG level when ``caller`` names the public function)."""
    if mode == "float32" and not _f32_safe(*norm_arrays):
        if caller:
            LOG.debug("%s: squared norms outside the float32-safe range; using float64", caller)
        return "float64"
    return mode


def _log_plan(work: float, message: str, *args: Any) -> None:
    """Say how the work is split into blocks: at INFO level when it is big enough to take a while."""
    (LOG.info if work > 2e9 else LOG.debug)(message, *args)


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


def _torch_error_coefficient(dim: int, precision: str, device: torch.device) -> float:
    """:func:`_error_coefficient` of a torch matrix product on ``device`` in ``precision``."""
    return _error_coefficient(dim, precision, _matmul_input_roundoff(device) if precision == "float32" else 0.0)


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


def _without_excluded(cand_valid, idx, n_real, ex):
    """``(cand_valid, n_usable)`` once each query's excluded bank row is taken out.

    cand_valid, idx (..., kc) whether each candidate is a real bank row, and its position;
    n_real (broadcasting to ...) real bank rows; ex (...) excluded position (-1 none), or None.
    """
    if ex is None:
        return cand_valid, n_real
    return cand_valid & (idx != ex[..., None]), n_real - (ex >= 0).long()


def _exact_candidates(b_tab, b_idx, q_rows, cand_valid):
    """Float64 ``((q - b) ** 2).sum(-1)`` of the candidates ``b_tab[b_idx]`` (..., kc, D) against
    ``q_rows`` (broadcasting, e.g. (..., 1, D)); +inf where ``cand_valid`` is False → (..., kc)."""
    rows = b_tab[b_idx]  # a fresh gather, worked on in place
    return rows.sub_(q_rows).square_().sum(-1).masked_fill_(~cand_valid, _INF)


def _recompute_uncertified(sums, good, exact_scores) -> int:
    """Overwrite the scores ``sums`` (A, B) whose certificate failed (``good`` False) with
    ``exact_scores(i, j)`` for their positions; returns how many there were."""
    if bool(good.all()):
        return 0
    i, j = torch.nonzero(~good, as_tuple=True)
    sums[i, j] = exact_scores(i, j)
    return int(i.numel())


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
    q, b, excl = _check_one_bank(queries, bank, k, exclude)
    block_size, dev, mode = _check_run_options(block_size, device, precision, default_precision="float32")
    _check_finite(q, "queries")
    _check_finite(b, "bank")
    if q.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    one = _OneBank.prepare(q, b, excl, k, dev)
    mode = _safe_precision(mode, one.nq, one.nb, caller="knn_score")
    use_faiss = mode == "float32" and _use_faiss(dev)
    kc, qb = _plan_one_bank(one, mode, use_faiss, block_size)
    coef, search = _faiss_search(one, kc) if use_faiss else _torch_search(one, mode, kc, qb)
    out, ok = _first_tier(one, mode, coef, search, qb)
    _recertify_in_float64(one, out, ok, kc)
    return out.numpy()


def _check_one_bank(queries, bank, k: int, exclude) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated (Q, D) queries, (S, D) bank and (Q,) exclusions (None when none) of :func:`knn_score`."""
    q = _as_real(queries, "queries", 2, "(Q, D)")
    b = _as_real(bank, "bank", 2, "(S, D)")
    s = b.shape[0]
    _check_same_dim(q.shape[1], b.shape[1], "bank rows")
    excl = None
    if exclude is not None:
        excl = _drop_if_unused(_as_index(exclude, "exclude", (q.shape[0],), "(Q,)", high=s, what="a row of bank"))
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
        nq = _sq_norms(q64, "queries")
        nb = _sq_norms(b64, "bank")
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


def _plan_one_bank(one: _OneBank, mode: str, use_faiss: bool, block_size: int | None) -> tuple[int, int]:
    """``(kc, qb)``: candidates per query and queries per block of :func:`knn_score`, logged."""
    n_q = one.q64.shape[0]
    s, dim = one.b64.shape
    kc = min(s, one.k + EXTRA_CANDIDATES + (1 if one.excl is not None else 0))
    per_query = 8 * kc * dim * 2 + 4 * dim * 2 + 8 * max(kc, 1) * 4
    if not use_faiss:
        per_query += 8 * min(s, 4096) * 3
    qb = block_size or max(1, min(n_q, int(BLOCK_BYTES // per_query)))
    _log_plan(
        n_q * s * dim, "knn_score: Q=%d S=%d D=%d k=%d %s %s; blocks of %d queries, ~%.1f MiB per block",
        n_q, s, dim, one.k, mode, "faiss" if use_faiss else "torch", qb, qb * per_query / 2**20,
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

    return _error_coefficient(one.dim, "float32", 2.0**-11 if one.dev.type == "cuda" else 0.0), search


def _torch_search(one: _OneBank, mode: str, kc: int, qb: int):
    """First-tier candidates from torch in ``mode`` on the device, as :func:`_faiss_search`
    (excluded rows are +inf; float64 finds just the k nearest, certified without refinement)."""
    dtype = torch.float64 if mode == "float64" else torch.float32
    bank = one.bank_dev.to(dtype)
    norms = (bank * bank).sum(-1)
    s = bank.shape[0]
    block_s = max(1, min(s, int(BLOCK_BYTES // max(1, 24 * qb))))
    n_found = kc if mode == "float32" else one.k
    q_t = torch.from_numpy(one.q64)

    def search(q0: int, q1: int, ex):
        qc = q_t[q0:q1].to(one.dev, dtype)
        vals, idx = _torch_candidates(qc, bank, norms, n_found, ex.to(one.dev) if ex is not None else None, block_s)
        return vals.cpu(), idx.cpu()

    return _torch_error_coefficient(one.dim, mode, one.dev), search


def _first_tier(one: _OneBank, mode: str, coef: float, search, qb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, certified)`` (Q,) float64 and bool of every query from its ``search`` candidates,
    block by block: refined exactly and certified (float32), or certified directly (float64)."""
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
        if mode == "float64":
            out[q0:q1], ok[q0:q1] = _direct_certify(vals.to(torch.float64), err, one.k)
        else:
            out[q0:q1], ok[q0:q1] = _certify_one_bank(vals, idx, ex, b64_t, q_t[q0:q1], err, one.k)
    return out, ok


def _certify_one_bank(vals, idx, ex, bank64, q64, err, k: int):
    """Float32 route against one bank: candidates (vals, idx) (n, kc) of queries q64 (n, D)
    refined exactly against the float64 bank64 (S, D) and certified → (sums, ok) (n,)."""
    s = bank64.shape[0]
    n_all = torch.full((idx.shape[0],), s, device=idx.device)
    cand_valid, n_usable = _without_excluded(idx >= 0, idx, n_all, ex)
    exact = _exact_candidates(bank64, idx.clamp(min=0), q64[:, None, :], cand_valid)
    return _refine_certify(exact, cand_valid, vals.max(dim=1).values, n_usable, err, k)


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
    err = _error_coefficient(one.dim, "float64") * (torch.from_numpy(one.nq).to(dev)[bad.to(dev)] + one.max_nb)
    sums, good = _certify_one_bank(vals, idx, exf, bank_t, qf, err, k)
    out[bad] = sums.cpu()
    still = bad[~good.cpu()]
    if still.numel():
        LOG.debug("knn_score: %d scores recomputed exactly against the whole bank", still.numel())
        out[still] = _exact_shared(q_t[still].to(dev), bank_t, excl_t[still].to(dev) if excl_t is not None else None, k).cpu()


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
    q, b, qmask, bmask, excl = _check_task_arrays(queries, banks, query_mask, bank_mask, exclude)
    block_size, dev, mode = _check_run_options(block_size, device, precision)
    _check_task_rows(k, q, b, qmask, bmask, excl)
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
    """Validated (T, Q, D) queries, (T, S, D) banks, their masks and the (T, Q) exclusions of
    :func:`knn_score_batched` (None when no real query excludes a real row)."""
    q = _as_real(queries, "queries", 3, "(T, Q, D)")
    b = _as_real(banks, "banks", 3, "(T, S, D)")
    n_t, n_q, dim = q.shape
    if b.shape[0] != n_t:
        raise ValueError(f"queries hold T={n_t} tasks but banks hold T={b.shape[0]}; both must have one entry per task along axis 0")
    _check_same_dim(dim, b.shape[2], "bank rows")
    qmask = _as_mask(query_mask, "query_mask", (n_t, n_q), "(T, Q)")
    bmask = _as_mask(bank_mask, "bank_mask", (n_t, b.shape[1]), "(T, S)")
    excl = _drop_if_unused(_task_exclusions(exclude, qmask, bmask)) if exclude is not None else None
    return q, b, qmask, bmask, excl


def _plan_task_chunks(q_shape: tuple[int, int, int], s: int, k: int, mode: str, dev: torch.device,
                      block_size: int | None) -> tuple[int, int, int]:
    """``(kc, tc, qc)``: candidates per query, tasks per chunk and queries per block of
    :func:`knn_score_batched`, logged."""
    n_t, n_q, dim = q_shape
    kc = min(s, k + EXTRA_CANDIDATES)
    per_query = dim * 8 * 2 + s * 8 * 3 + (kc * (dim * 8 * 2 + 40) if mode == "float32" else 0)
    qc = max(1, min(n_q, int(BLOCK_BYTES // per_query)))
    per_task = qc * per_query + s * dim * 8 * 3
    tc = block_size or max(1, min(n_t, int(BLOCK_BYTES // per_task)))
    _log_plan(
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
        return cls(torch.from_numpy(b_np).to(dev), real, norms, max_norm, real.sum(1), _safe_precision(mode, nb_np))

    def distances(self, q64: torch.Tensor, nq: torch.Tensor, mode: str) -> torch.Tensor:
        """(t, q, S) expanded-form squared distances of queries q64 (t, q, D) with squared norms
        nq (t, q), in ``mode``; +inf for padding rows."""
        if mode == "float64":
            bank, queries, nb, nq_c = self.bank, q64, self.norms, nq
        else:
            bank, queries = self.bank.to(torch.float32), q64.to(torch.float32)
            nb, nq_c = (bank * bank).sum(-1), (queries * queries).sum(-1)
        nb = nb.masked_fill(~self.real, _INF)
        return torch.baddbmm(nb[:, None, :], queries, bank.transpose(1, 2), alpha=-2.0).add_(nq_c[:, :, None])

    def exact_scores(self, q64: torch.Tensor, ex: torch.Tensor | None, ti: torch.Tensor, qi: torch.Tensor, k: int) -> torch.Tensor:
        """Exact scores of queries ``(ti, qi)`` of q64 (t, q, D) from the differences against
        every usable row of their bank."""
        n_qb, dim = q64.shape[1], q64.shape[2]
        s = self.bank.shape[1]
        slots = torch.arange(s, device=q64.device)[None, :]
        usable = self.real[ti]
        if ex is not None:
            usable = usable & (slots != ex[ti, qi][:, None])
        return _exact_rows(q64.reshape(-1, dim), ti * n_qb + qi, self.bank.reshape(-1, dim), ti[:, None] * s + slots, usable, k)


def _score_task_block(chunk: _TaskChunk, queries: np.ndarray, query_mask: np.ndarray, excl: np.ndarray | None,
                      k: int, kc: int) -> tuple[torch.Tensor, int]:
    """Certified scores (t, q) of a block of queries (t, q, D) against their chunk's banks, and
    how many needed the exact fall-back.  Masked queries hold anything; excl (t, q) or None."""
    dev = chunk.bank.device
    q_np = np.array(queries, dtype=np.float64)
    q_np[~query_mask] = 0.0
    nq_np = np.einsum("tqd,tqd->tq", q_np, q_np)
    mode = _safe_precision(chunk.mode, nq_np)
    q64 = torch.from_numpy(q_np).to(dev)
    nq = torch.from_numpy(nq_np).to(dev)
    dist = chunk.distances(q64, nq, mode)
    ex = _exclude_in_place(dist, excl)
    err = _torch_error_coefficient(q64.shape[2], mode, dev) * (nq + chunk.max_norm[:, None])
    if mode == "float64":
        vals = torch.topk(dist, k, dim=-1, largest=False, sorted=True).values
        sums, good = _direct_certify(vals, err, k)
    else:
        vals, idx = torch.topk(dist, kc, dim=-1, largest=False, sorted=True)
        real = torch.gather(chunk.real[:, None, :].expand(-1, idx.shape[1], -1), 2, idx)
        cand_valid, n_usable = _without_excluded(real, idx, chunk.n_real[:, None], ex)
        tasks = torch.arange(idx.shape[0], device=dev)[:, None, None]
        exact = _exact_candidates(chunk.bank, (tasks, idx), q64[:, :, None, :], cand_valid)
        sums, good = _refine_certify(exact, cand_valid, vals.max(dim=-1).values, n_usable, err, k)
    good = good | ~torch.from_numpy(query_mask).to(dev)
    return sums, _recompute_uncertified(sums, good, lambda ti, qi: chunk.exact_scores(q64, ex, ti, qi, k))


def _exclude_in_place(dist: torch.Tensor, excl: np.ndarray | None) -> torch.Tensor | None:
    """Set each query's excluded bank column of dist (t, q, S) to +inf; returns the exclusions
    (t, q) as a tensor, None when this block has none."""
    if excl is None or not (excl >= 0).any():
        return None
    ex = torch.from_numpy(excl).to(dist.device)
    col = ex.clamp(min=0)[:, :, None]
    cur = dist.gather(2, col)
    dist.scatter_(2, col, torch.where(ex[:, :, None] >= 0, torch.full_like(cur, _INF), cur))
    return ex


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
    q, f, bi, excl = _check_gathered_arrays(queries, features, bank_index, exclude)
    block_size, dev, mode = _check_run_options(block_size, device, precision)
    _check_gathered_support(k, bi, excl, q.shape[0])
    _check_finite(q, "queries")
    used = _used_bank_rows(f, bi)
    out = np.empty((bi.shape[0], q.shape[0]), dtype=np.float64)
    if out.size == 0:
        return out
    q64 = np.ascontiguousarray(q, dtype=np.float64)
    nq = _sq_norms(q64, "queries")
    rows64 = np.concatenate([np.asarray(f[used], dtype=np.float64), np.zeros((1, q.shape[1]))], axis=0)  # + padding row
    norms = np.append(_sq_norms(rows64[:-1], "features"), _INF)
    mode = _safe_precision(mode, nq, norms[:-1], caller="knn_score_gathered")
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
    q = _as_real(queries, "queries", 2, "(Q, D)")
    f = _as_real(features, "features", 2, "(N, D)")
    n_f = f.shape[0]
    _check_same_dim(q.shape[1], f.shape[1], "features rows")
    if isinstance(bank_index, torch.Tensor):
        bank_index = bank_index.detach().cpu().numpy()
    bi = np.asarray(bank_index)
    if bi.ndim != 2:
        raise ValueError(f"bank_index must have shape (T, S) (2 dimensions), got shape {bi.shape}; use -1 to pad shorter banks")
    bi = _as_index(bi, "bank_index", bi.shape, "(T, S)", high=n_f, what="a row of features")
    excl = None
    if exclude is not None:
        excl = _as_index(exclude, "exclude", (bi.shape[0], q.shape[0]), "(T, Q)", high=n_f, what="a row of features")
        excl = _drop_if_unused(excl)
    return q, f, bi, excl


def _check_gathered_support(k: int, bi: np.ndarray, excl: np.ndarray | None, n_q: int) -> None:
    """Raise unless every task keeps >= k usable bank rows for each of its ``n_q`` queries."""
    if n_q == 0:
        return
    low = _fewest_usable_rows(k, bi, excl)
    short = np.flatnonzero(low < k)
    if short.size:
        raise ValueError(_too_small_message(k, [(int(t), int(low[t])) for t in short], "= bank rows minus excluded row(s)"))


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
    fin = np.isfinite(f[used]).all(axis=1) if f.dtype.kind == "f" else np.ones(used.size, bool)
    if not fin.all():
        row = int(used[np.argmin(fin)])
        task = int(np.argwhere(bi == row)[0, 0])
        raise ValueError(
            f"features contains NaN or inf at row {row} (first bad row used by a bank, e.g. task {task}; "
            f"{int((~fin).sum())} bad row(s) in use); re-embed those rows or drop them from bank_index"
        )
    return used


def _local_bank_index(bank_ids: np.ndarray, used: np.ndarray) -> np.ndarray:
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
    if mode == "float32":
        per_query += n_t * kc * (dim * 8 * 2 + 40)
    qb = block_size or max(1, min(n_q, int(_block_budget(dev) // per_query)))
    _log_plan(
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
        except Exception:  # pragma: no cover
            pass
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
        local = _local_bank_index(bi, used)
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
        return _exact_rows(qd, qi, self.rows64, self.local[ti], usable, k)


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
        g.masked_fill_(hit, _INF)
    coef = _torch_error_coefficient(qd.shape[1], banks.mode, dev)
    err = coef * (torch.from_numpy(nq).to(dev)[:, None] + banks.max_norm[None, :])
    if banks.mode == "float64":
        vals = _k_smallest_mid(g, k) if k <= 8 else torch.topk(g, k, dim=1, largest=False, sorted=True).values.transpose(1, 2)
        sums, good = _direct_certify(vals, err, k)
    else:
        sums, good = _refine_gathered(banks, g, qd, hit, err, k, kc)
    return sums, _recompute_uncertified(sums, good, lambda qi, ti: banks.exact_scores(qd, hit, qi, ti, k))


def _refine_gathered(banks: _GatheredBanks, g: torch.Tensor, qd: torch.Tensor, hit: torch.Tensor | None,
                     err: torch.Tensor, k: int, kc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 route of :func:`_score_gathered_block`: the kc nearest slots per task of g (Qb, S, T)
    refined exactly and certified → (sums, ok) (Qb, T)."""
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
        exact[block] = _exact_candidates(banks.rows64, rows_local[block], qd[block, None, None, :], cand_valid[block])
    return _refine_certify(exact.transpose(1, 2), cand_valid.transpose(1, 2), vals.max(dim=1).values, n_usable, err, k)


#: features per float32 partial dot product of the bounded kernels; the partial sums are added
#: separately, so each product passes through at most ``DOT_CHUNK + D / DOT_CHUNK`` roundings
#: instead of ``D`` and the a priori error bound is that much tighter (see :func:`_score_bounds`).
DOT_CHUNK = 256


@dataclass(frozen=True)
class CentredRows:
    """Feature rows prepared for the bounded float32 kernels (:func:`bounded_knn_shared`,
    :func:`bounded_knn_tasks`): every distance is taken between rows ``fl32(row - centre)``.

    Attributes
    ----------
    values : (N, D) float32 tensor; float32 input rows as they are (centred inside the kernels,
        one exact-up-to-rounding subtraction), float64 input rows already centred in float64.
    centre : (D,) float32 tensor subtracted from ``values`` (zeros when they are centred).
    sq_norms : (N,) float64 ``||row - centre||²`` from float64 arithmetic; NaN for rows not prepared.
    source : (N, D) the input array, for the exact fall-back when float32 is not safe.
    safe : whether every prepared squared norm lies in float32's safe range.
    """

    values: torch.Tensor
    centre: torch.Tensor
    sq_norms: np.ndarray
    source: np.ndarray
    safe: bool

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """``fl32(values[ids] - centre)`` for an integer tensor of any shape (-1 → a zero row)."""
        padding = ids < 0
        rows = self.values.index_select(0, ids.clamp(min=0).reshape(-1)).sub_(self.centre)
        rows = rows.view(*ids.shape, self.dim)
        return rows.masked_fill_(padding[..., None], 0.0) if bool(padding.any()) else rows


#: features per float32 partial sum of a squared norm in :func:`centre_rows` (see :func:`_score_bounds`).
NORM_CHUNK = 32


def centre_rows(features: np.ndarray, rows: np.ndarray, centre_on: np.ndarray, *, name: str = "features",
                device="cpu") -> CentredRows:
    """Prepare ``features[rows]`` for the bounded kernels, centred on the mean of ``features[centre_on]``.

    ``features`` (N, D) float32 (kept as is: no copy on CPU) or float64 (centred in float64, then
    rounded).  Centring shrinks the norms the error bound grows with.  Squared norms are those of
    the float32 centred rows the kernels use, summed in float32 over :data:`NORM_CHUNK` features
    and in float64 across chunks (relative error below ``γ_40``).  Raises a one-line error naming
    the first prepared row that holds NaN or inf.
    """
    f = _as_real(features, name, 2, "(N, D)")
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    centre_on = np.unique(np.asarray(centre_on, dtype=np.int64))
    dev = _resolve_device(device)
    n, dim = f.shape
    centre64 = f[centre_on].astype(np.float64).mean(axis=0) if centre_on.size else np.zeros(dim)
    if f.dtype == np.float32:
        centre = torch.from_numpy(centre64.astype(np.float32)).to(dev)
        with warnings.catch_warnings():  # a read-only input is fine: the kernels never write to it
            warnings.simplefilter("ignore", UserWarning)
            values = torch.from_numpy(np.ascontiguousarray(f)).to(dev)
    else:
        centre = torch.zeros(dim, dtype=torch.float32, device=dev)
        values = torch.zeros((n, dim), dtype=torch.float32, device=dev)
    prepared = CentredRows(values, centre, np.full(n, np.nan), f, True)
    pad = -dim % NORM_CHUNK
    per = max(1, (2 << 20) // max(1, 4 * dim))  # blocks that stay in cache: one pass over memory
    for lo in range(0, rows.size, per):
        block = rows[lo : lo + per]
        ids = torch.from_numpy(block).to(dev)
        if f.dtype != np.float32:
            with np.errstate(over="ignore", invalid="ignore"):
                values[ids] = torch.from_numpy((f[block].astype(np.float64) - centre64).astype(np.float32)).to(dev)
        centred = prepared.gather(ids)
        if pad:
            centred = torch.nn.functional.pad(centred, (0, pad))
        partial = torch.linalg.vector_norm(centred.view(len(block), -1, NORM_CHUNK), dim=-1)
        prepared.sq_norms[block] = partial.to(torch.float64).square_().sum(-1).cpu().numpy()
    norms = prepared.sq_norms[rows]
    finite = np.isfinite(norms)
    if not finite.all():
        raw_bad = rows[~finite][~np.isfinite(f[rows[~finite]]).all(axis=1)]
        if raw_bad.size:
            raise ValueError(f"{name} row {int(raw_bad[0])} contains NaN or inf ({raw_bad.size} such row(s)); "
                             "re-embed or drop those rows")
    return CentredRows(values, centre, prepared.sq_norms, f, bool(finite.all()) and _f32_safe(norms))


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
    local = _local_bank_index(bank_ids, used)
    direct = n_t * s <= 1.25 * n_u
    cols = torch.from_numpy(local.T.reshape(-1)).to(dev)  # slot-major: (S*T,)
    bank = torch.zeros((n_u + 1, dim), dtype=torch.float32, device=dev)  # last row: padding, never a neighbour
    bank[:n_u] = rows.gather(torch.from_numpy(used).to(dev))
    norms = torch.from_numpy(np.append(rows.sq_norms[used], _INF).astype(np.float32)).to(dev)
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
        scores[:, q0:q1] = _k_smallest_mid(g, k).to(torch.float64).sum(-1).T.cpu().numpy()
    max_nb = np.where(valid, rows.sq_norms[np.maximum(bank_ids, 0)], 0.0).max(axis=1)
    bounds[:] = _score_bounds(k, dim, nq[None, :], max_nb[:, None], scores, _matmul_input_roundoff(dev))
    return scores, bounds


def bounded_knn_tasks(rows: CentredRows, query_ids, bank_ids, k: int = 3, *, exclude=None,
                      block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Float32 kNN scores of per-task queries against per-task banks, each with an error bound.

    Parameters
    ----------
    rows : prepared features (:func:`centre_rows`) holding every query and bank row.
    query_ids : (T, W) row ids, -1 = padding (its score is NaN, its bound 0).
    bank_ids : (T, S) row ids, -1 = padding; every task with a query has >= k usable rows.
    exclude : (T, W) position in the task's bank of a row each query must not count (leave-one-out), or -1.

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
    excl = np.full((n_t, n_w), -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    if not rows.safe:
        scores[:] = knn_score_batched(rows.source[np.maximum(query_ids, 0)], rows.source[np.maximum(bank_ids, 0)], k,
                                      query_mask=present, bank_mask=bank_ids >= 0, exclude=excl, precision="float64")
        return scores, bounds
    dim = rows.dim
    u_in = _matmul_input_roundoff(rows.values.device)
    for tasks, cols, _, dist, nq, max_nb in _task_distances(rows, query_ids, bank_ids, excl, block_bytes):
        smallest = torch.topk(dist, k, dim=2, largest=False, sorted=False).values.to(torch.float64).sum(-1).cpu().numpy()
        del dist
        mine = present[tasks[:, None], cols]
        scores[tasks[:, None], cols] = np.where(mine, smallest, np.nan)
        bounds[tasks[:, None], cols] = np.where(mine, _score_bounds(k, dim, nq, max_nb, np.nan_to_num(smallest), u_in), 0.0)
    return scores, bounds


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
    squared norms; ``max_nb`` (t, 1) each task's largest bank squared norm.
    """
    dev = rows.values.device
    present = query_ids >= 0
    in_bank = bank_ids >= 0
    q_order = np.argsort(~present, axis=1, kind="stable")
    b_order = np.argsort(~in_bank, axis=1, kind="stable")
    b_position = np.argsort(b_order, axis=1)  # input bank column → packed column
    packed_excl = np.where(excl >= 0, np.take_along_axis(b_position, np.maximum(excl, 0), axis=1), -1)
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
        dist = _chunked_dots(q32, b32).mul_(-2.0)
        del q32, b32
        nb = np.where(b_ids >= 0, rows.sq_norms[np.maximum(b_ids, 0)], _INF)
        nq = np.where(q_ids >= 0, rows.sq_norms[np.maximum(q_ids, 0)], 0.0)
        dist.add_(torch.from_numpy(nb.astype(np.float32)).to(dev)[:, None, :])
        dist.add_(torch.from_numpy(nq.astype(np.float32)).to(dev)[:, :, None])
        ex = packed_excl[tasks[:, None], cols]
        ti, wi = np.nonzero((ex >= 0) & (ex < s) & (q_ids >= 0))
        if ti.size:
            dist[torch.from_numpy(ti).to(dev), torch.from_numpy(wi).to(dev), torch.from_numpy(ex[ti, wi]).to(dev)] = _INF
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
    excl = np.full((n_t, n_w), -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    m = min(k + extra, s)
    dim = rows.dim
    u_in = _matmul_input_roundoff(rows.values.device)
    for tasks, cols, bank_cols, dist, nq, max_nb in _task_distances(rows, query_ids, bank_ids, excl, block_bytes):
        width = dist.shape[2]
        ranked = torch.topk(dist, min(m + 1, width), dim=2, largest=False, sorted=True)
        del dist
        values = ranked.values.to(torch.float64).cpu().numpy()
        positions = ranked.indices[..., :m].cpu().numpy()
        boundary = values[..., m] if m < width else np.full(values.shape[:2], _INF)
        tt, ww = np.nonzero(query_ids[tasks[:, None], cols] >= 0)
        cand_ids = bank_ids[tasks[tt, None], bank_cols[tt[:, None], positions[tt, ww]]]  # (n, m')
        usable = np.isfinite(values[tt, ww, : positions.shape[2]])  # padding / excluded rows are +inf
        exact = _exact_distances(rows, query_ids[tasks[tt], cols[tt, ww]], cand_ids, usable, block_bytes)
        exact.sort(axis=1)
        error = _score_bounds(1, dim, nq[tt, ww], max_nb[tt, 0], 0.0, u_in)  # one distance's bound
        scores[tasks[tt], cols[tt, ww]] = exact[:, :k].sum(axis=1)
        certified[tasks[tt], cols[tt, ww]] = boundary[tt, ww] - error >= exact[:, k - 1]
    return scores, certified


def _exact_distances(rows: CentredRows, query_ids: np.ndarray, candidate_ids: np.ndarray, usable: np.ndarray,
                     block_bytes: int) -> np.ndarray:
    """(n, m) float64 squared distances ``((q - b) ** 2).sum()`` from the input rows (+inf where not usable)."""
    n, m = candidate_ids.shape
    out = np.full((n, m), _INF)
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
        out[lo:hi] = np.where(usable[lo:hi], dist, _INF)
    return out


def knn_score_bounded(queries, features, bank_index, k: int = 3, *, device="cpu", block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fast kNN scores of shared queries against many banks, each with a rigorous error bound.

    The float32 form of :func:`knn_score_gathered` without its exact refinement: for rank
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
    k = _check_k(k)
    q = _as_real(queries, "queries", 2, "(Q, D)")
    f = _as_real(features, "features", 2, "(N, D)")
    if np.ndim(bank_index) != 2 or q.shape[1] != f.shape[1]:
        raise ValueError(f"bank_index must be (T, S) and queries/features must share D; got {np.shape(bank_index)}, {q.shape}, {f.shape}")
    bi = _as_index(bank_index, "bank_index", np.shape(bank_index), "(T, S)", high=f.shape[0], what="a row of features")
    valid = bi >= 0
    short = np.flatnonzero(valid.sum(axis=1) < k)
    if short.size:
        raise ValueError(_too_small_message(k, [(int(t), int(valid[t].sum())) for t in short], "= bank rows"))
    block_size = _check_block(block_size)
    if bi.shape[0] == 0 or q.shape[0] == 0:
        return np.empty((bi.shape[0], q.shape[0])), np.zeros((bi.shape[0], q.shape[0]))
    used = np.unique(bi[valid])
    _check_finite(q, "queries")
    _check_finite(f[used], "features rows used by a bank")
    dtype = np.result_type(q.dtype, f.dtype, np.float32)
    stacked = np.concatenate([f[used].astype(dtype, copy=False), q.astype(dtype, copy=False)])
    local = np.where(valid, np.searchsorted(used, np.maximum(bi, 0)), -1)
    rows = centre_rows(stacked, np.arange(len(stacked)), np.arange(used.size), device=device)
    return bounded_knn_shared(rows, used.size + np.arange(q.shape[0]), local, k, block_size=block_size)


def _score_bounds(k: int, dim: int, nq: np.ndarray, max_nb: np.ndarray, scores: np.ndarray, u_in: float = 0.0) -> np.ndarray:
    """Bound on ``|score - exact|`` for the chunked float32 expanded form (broadcasting arrays).

    The kernels compute exactly with the float32 centred rows ``x' = fl32(x - c)``; per distance:
    the dot product of ``x'`` rows (``γ_h``, ``h`` roundings per product, on ``2 ||q|| ||b||``);
    their squared norms (``γ_40``, :func:`centre_rows`); the norms rounded to float32 and the two
    additions (``3u``); and the distance between the ``x'`` rows against the one between the
    exact centred rows (``|x' - x| <= u |x|`` elementwise: ``2u (||q|| + ||b||)²``).  Times ``k``
    for the sum of the ``k`` smallest (each order statistic moves by at most the largest error),
    plus its float64 sum.  ``u_in``: the rounding of the inputs inside the product (TF32 on
    CUDA, see :func:`_matmul_input_roundoff`).
    """
    n_chunks = -(-dim // DOT_CHUNK)
    depth = (DOT_CHUNK + n_chunks + 1) if n_chunks > 1 else dim + 1
    u = _U32
    gamma = depth * u / (1.0 - depth * u)
    gamma_norm = 40 * u / (1.0 - 40 * u)
    cross = 2.0 * np.sqrt(nq * max_nb)
    per_distance = ((gamma + 2.02 * u_in) * cross + gamma_norm * (nq + max_nb)
                    + (5.2 * u + 8 * _U64) * (nq + max_nb + cross))
    return 1.01 * k * per_distance + 4.0 * k * _U64 * np.abs(scores)


def _chunked_dots(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, W, D) · (B, S, D) → (B, W, S) float32 dot products: one fresh product per
    :data:`DOT_CHUNK`-feature slice (strided views, no copies), the slices' results added one
    after another, so each product passes through at most ``DOT_CHUNK + D / DOT_CHUNK`` roundings
    (see :func:`_score_bounds`)."""
    dim = q.shape[-1]
    out = torch.bmm(q[..., :DOT_CHUNK], b[..., :DOT_CHUNK].transpose(1, 2))
    for lo in range(DOT_CHUNK, dim, DOT_CHUNK):
        out.add_(torch.bmm(q[..., lo : lo + DOT_CHUNK], b[..., lo : lo + DOT_CHUNK].transpose(1, 2)))
    return out


def knn_score_batched_bounded(queries, banks, k: int = 3, *, query_mask=None, bank_mask=None, exclude=None,
                              device="cpu", block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Float32 kNN scores of per-task queries against per-task banks, each with an error bound.

    The bounded form of :func:`knn_score_batched` (same parameters, leave-one-out included):
    returns ``scores`` (T, Q) float64 (NaN where ``query_mask`` is False) and ``bounds`` (T, Q)
    with ``|scores - exact| <= bounds`` (0 where masked).  Validates its input, then runs
    :func:`bounded_knn_tasks` on rows centred on the mean of all banks; ``block_size`` tasks per chunk.
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
    block_size = _check_block(block_size)
    excl = np.full((n_t, n_q), -1, dtype=np.int64) if exclude is None else _task_exclusions(exclude, qmask, bmask)
    _check_task_rows(k, q, b, qmask, bmask, excl)
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
