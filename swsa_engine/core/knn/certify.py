"""Error bounds and certificates of the kNN scores, and the exact fall-backs.

A distance computed in the expanded form ``||q||² + ||b||² - 2 q·b`` is off by at most
``c · (||q||² + ||b||²)`` (:func:`error_coefficient`).  Float32 scores are refined exactly from
their candidates and certified (:func:`refine_certify`), and so are float64 ones (their candidates'
distances recomputed from the differences, so ties stay exact); scores that fail are recomputed from the differences against every
usable bank row (:func:`exact_rows`, :func:`exact_shared`).
"""

from __future__ import annotations

import torch

from swsa_engine.core.knn.checks import BLOCK_BYTES, INF, U32, U64

__all__ = [
    "matmul_input_roundoff", "error_coefficient", "torch_error_coefficient", "refine_certify",
    "without_excluded", "exact_candidates", "recompute_uncertified", "exact_rows", "exact_shared", "k_smallest_mid",
]


def matmul_input_roundoff(device: torch.device | None) -> float:
    """Unit roundoff of the inputs of a float32 matrix product (TF32/bf16 if torch allows them)."""
    if device is None:  # FAISS on CPU: plain sgemm
        return 0.0
    try:
        prec = torch.get_float32_matmul_precision()
    except AttributeError:  # pragma: no cover - very old torch
        prec = "medium"
    u_in = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}.get(prec, 2.0**-8)
    if device.type == "cuda":
        try:
            if torch.backends.cuda.matmul.allow_tf32:
                u_in = max(u_in, 2.0**-11)
        except AttributeError:  # pragma: no cover - very old torch: assume TF32
            u_in = max(u_in, 2.0**-11)
    return u_in


def error_coefficient(dim: int, precision: str, u_in: float = 0.0) -> float:
    """``c`` with ``| computed - exact | <= c * (||q||² + ||b||²)`` for the expanded form.

    Norms (error ``γ_D``), the dot product (``2 (u_in + γ_D) |q||b|``, ``u_in`` the rounding of
    the inputs inside the product, e.g. TF32), rounding the inputs to float32 and the two final
    additions (a few ``u``) — with a margin.  ``γ_n = n u / (1 - n u)`` holds for any summation
    order, so it covers blocked BLAS kernels.
    """
    u = U64 if precision == "float64" else U32
    nu = max(dim, 1) * u
    if nu >= 0.5:
        return INF
    gamma = nu / (1.0 - nu)
    return 2.02 * gamma + 2.02 * u_in + 16.0 * u


def torch_error_coefficient(dim: int, precision: str, device: torch.device) -> float:
    """:func:`error_coefficient` of a torch matrix product on ``device`` in ``precision``."""
    return error_coefficient(dim, precision, matmul_input_roundoff(device) if precision == "float32" else 0.0)


def refine_certify(exact_c, cand_valid, boundary, n_usable, err, k):
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


def without_excluded(cand_valid, idx, n_real, ex):
    """``(cand_valid, n_usable)`` once each query's excluded bank rows are taken out.

    cand_valid, idx (..., kc) whether each candidate is a real bank row, and its position;
    n_real (broadcasting to ...) real bank rows; ex (..., E) the excluded positions (-1 none),
    distinct real rows of each query (:func:`~swsa_engine.core.knn.checks.distinct_exclusions`),
    or None.
    """
    if ex is None:
        return cand_valid, n_real
    hit = (idx[..., :, None] == ex[..., None, :]).any(-1) if ex.shape[-1] > 1 else idx == ex
    return cand_valid & ~hit, n_real - (ex >= 0).sum(-1)


def exact_candidates(b_tab, b_idx, q_rows, cand_valid):
    """Float64 ``((q - b) ** 2).sum(-1)`` of the candidates ``b_tab[b_idx]`` (..., kc, D) against
    ``q_rows`` (broadcasting, e.g. (..., 1, D)); +inf where ``cand_valid`` is False → (..., kc)."""
    # a fresh gather, worked on in place (index_select: faster than advanced indexing by one tensor)
    if isinstance(b_idx, torch.Tensor):
        rows = b_tab.index_select(0, b_idx.reshape(-1)).view(*b_idx.shape, b_tab.shape[1])
    else:
        rows = b_tab[b_idx]
    return rows.sub_(q_rows).square_().sum(-1).masked_fill_(~cand_valid, INF)


def recompute_uncertified(sums, good, exact_scores) -> int:
    """Overwrite the scores ``sums`` (A, B) whose certificate failed (``good`` False) with
    ``exact_scores(i, j)`` for their positions; returns how many there were."""
    if bool(good.all()):
        return 0
    i, j = torch.nonzero(~good, as_tuple=True)
    sums[i, j] = exact_scores(i, j)
    return int(i.numel())


def exact_rows(q_tab, q_idx, b_tab, b_idx, valid, k: int) -> torch.Tensor:
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
        d.masked_fill_(~valid[lo:hi], INF)
        out[lo:hi] = torch.topk(d, k, dim=-1, largest=False, sorted=True).values.sum(-1)
    return out


def exact_shared(q64: torch.Tensor, b64: torch.Tensor, excl: torch.Tensor | None, k: int) -> torch.Tensor:
    """(n,) exact scores of queries q64 (n, D) from the differences against one whole bank b64 (S, D),
    blockwise with a running top-k; excl (n,) the bank row each query must not count (-1 none), or None."""
    n, dim = q64.shape
    s = b64.shape[0]
    best = torch.full((n, k), INF, dtype=torch.float64, device=q64.device)
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
                d = d.masked_fill(hit, INF)
            run = torch.topk(torch.cat([run, d], dim=1), k, dim=1, largest=False, sorted=True).values
        best[q0:q1] = run
    return best.sum(-1)


#: :func:`k_smallest_mid` runs its insertion network when banks are this short or tasks this many.
NETWORK_MAX_BANK, NETWORK_MIN_TASKS = 128, 64


def k_smallest_mid(g: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest values of g (B, S, T) along axis 1, ascending, as (B, T, k).

    For short banks or many tasks, a running insertion network of elementwise min/max over the
    S slices: 2k cheap vectorised passes per slice, much faster than ``torch.topk`` over millions
    of tiny rows. For long banks of few tasks that network is S × 2k tiny operations (on a GPU,
    as many kernel launches: 14 s for one 20,000-row bank), so ``torch.topk`` runs instead; both
    return the same values in the same order.
    """
    s, n_tasks = g.shape[1], g.shape[2]
    if s > NETWORK_MAX_BANK and n_tasks < NETWORK_MIN_TASKS:
        return torch.topk(g.transpose(1, 2), min(k, s), dim=2, largest=False, sorted=True).values
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
