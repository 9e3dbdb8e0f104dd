"""PCA reconstruction error: the query against the bank mean and the bank's top ``n`` principal axes.

On ``pixels@N`` features this is PCA of pixels fitted on the task's support only. Leave-one-out
refits are a rank-one downdate solved through the secular equation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from swsa_engine.core.detectors.base import Detector, check_batch, check_int_setting, check_shared, int_setting, register_detector
from swsa_engine.core.detectors.linalg import centred_gram, eigh, take_rows

__all__ = ["PcaDetector", "downdated_top_axes", "DEFLATION_TOL", "SECULAR_STEPS"]


#: a gap between the top eigenvalues, or a weight of the left-out row on a top axis, below this
#: share of the largest eigenvalue sends a leave-one-out fit to the plain refit (deflation)
DEFLATION_TOL = 1e-11
#: most steps for one root of the secular equation (rational Newton converges in ~5-10; bisection
#: fallback needs ~10 on log x from 1e-300 of the gap, then 53 on x)
SECULAR_STEPS = 80


def downdated_top_axes(lam, u_row, coords, rho, n: int, chunk_elements: int = 1 << 22):
    """Top-``n`` principal axes after one bank row is left out, from the full fit's eigenpairs.

    The full fit's scatter on its own axes is Λ (the Gram eigenvalues); leaving row j out makes it
    Λ − ρ z zᵀ with z = √λ ⊙ U[j, :] and ρ = n/(n − 1) (the mean moves too). Its eigenvalues μ_i are
    the roots of the secular equation 1 − ρ Σ_k z_k² / (λ_k − μ) = 0, one in each (λ_{i+1}, λ_i),
    and its eigenvectors y_i ∝ z / (λ − μ_i) (Golub 1973; Bunch, Nielsen & Sorensen 1978). Each
    root is bisected from the nearer end of its interval (relative accuracy, as LAPACK's dlaed4),
    so a refit costs O(n · S) per step instead of an O(S³) eigendecomposition.

    lam (L, S): eigenvalues, descending, 0 for discarded axes; u_row (L, S): U[j, :] in the same
    order; coords (L, S): the query's coordinates on the full fit's axes; rho (L,).
    Returns ``weights`` (L, S) with the projection's coefficients on the bank rows = U · weights,
    and ``ok`` (L,) bool: False where a top gap or a top z_k is below ``DEFLATION_TOL`` × λ_1
    (the equation deflates; the caller refits those exactly); their weights are 0.
    """
    n_rows, width = lam.shape
    top = min(n + 1, width)
    lead = np.maximum(lam[:, :1], np.finfo(float).tiny)
    z = np.sqrt(np.maximum(lam, 0.0)) * u_row
    upper = lam[:, :n]  # the pole above root i
    lower = np.concatenate([lam[:, 1 : n + 1], np.zeros((n_rows, max(0, n + 1 - width)))], axis=1)[:, :n]
    nonzero = lam[:, :top] > 0
    ok = ((lam[:, :n] > 0).all(axis=1)
          & ((upper - lower > DEFLATION_TOL * lead) | ~(lower > 0)).all(axis=1)
          & ((rho[:, None] * z[:, :top] ** 2 > DEFLATION_TOL * lead) | ~nonzero).all(axis=1))
    weights = np.zeros((n_rows, width))
    rows = np.nonzero(ok)[0]
    step = max(1, chunk_elements // max(1, n * width))
    for lo in range(0, rows.size, step):
        r = rows[lo : lo + step]
        weights[r] = _secular_projection(lam[r], z[r], u_row[r], coords[r], rho[r], upper[r], lower[r])
    return weights, ok


def _secular_projection(lam, z, u_row, coords, rho, upper, lower):
    """:func:`downdated_top_axes` for rows that do not deflate: (L, S) weights."""
    z2 = (rho[:, None] * z**2)[:, None, :]  # (L, 1, S)
    gap = upper - lower  # (L, n)

    def secular(origin, offset):  # 1 − ρ Σ z² / (λ − μ) at μ = origin + offset
        return 1.0 - (z2 / ((lam[:, None, :] - origin[..., None]) - offset[..., None])).sum(-1)

    from_upper = secular(lower, gap / 2) >= 0  # root in the upper half: measure it from λ_i
    origin = np.where(from_upper, upper, lower)
    sign = np.where(from_upper, -1.0, 1.0)  # μ = origin + sign · x, x in (0, gap/2]
    base = lam[:, None, :] - origin[..., None]  # λ_k − origin, (L, n, S)
    # h(x) = sign · f(origin + sign · x) falls from +inf (or a finite value when the origin is no
    # pole) to -inf on (0, gap). Li's "middle way": the terms of each side are modelled as a constant
    # plus their nearest pole (h ≈ κ + B_o/x + B_f/(x − gap), matched in value and slope), the
    # model's root in (0, gap) is the next step; bisection inside the bracket [lo, hi] when a step
    # leaves it. Converges in a handful of steps.
    n_axes = gap.shape[1]
    above = np.arange(lam.shape[1])[None, :] <= np.arange(n_axes)[:, None]  # pole λ_k >= λ_i, (n, S)
    origin_side = np.where(from_upper[..., None], above[None], ~above[None])  # (L, n, S)
    lo, hi = gap * 1e-300, gap / 2
    x = gap / 4
    active = np.ones(x.shape, dtype=bool)
    for _ in range(SECULAR_STEPS):
        diff = base - (sign * x)[..., None]
        ratio = z2 / diff
        slope_terms = ratio / diff
        h = sign * (1.0 - ratio.sum(-1))
        lo, hi = np.where(h > 0, x, lo), np.where(h > 0, hi, x)
        near = np.where(origin_side, ratio, 0.0).sum(-1)
        near_slope = np.where(origin_side, slope_terms, 0.0).sum(-1)
        far, far_slope = ratio.sum(-1) - near, slope_terms.sum(-1) - near_slope
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            b_origin = near_slope * x**2
            b_far = far_slope * (x - gap) ** 2
            kappa = sign - sign * near - b_origin / x - sign * far - b_far / (x - gap)
            a1 = b_origin + b_far - kappa * gap
            q = -0.5 * (a1 + np.copysign(np.sqrt(np.maximum(a1**2 + 4 * kappa * b_origin * gap, 0.0)), a1))
            step = np.where(a1 > 0, -b_origin * gap / q, q / kappa)
        inside = (step > lo) & (step < hi)
        bisect = np.where(hi > 4 * lo, np.sqrt(lo * hi), 0.5 * (lo + hi))
        new = np.where(inside, step, bisect)
        eps = np.finfo(float).eps
        # done: the step is below rounding, or h is within its own rounding error (as dlaed4)
        active &= (np.abs(new - x) > 4 * eps * x) & (np.abs(h) > 16 * eps * (1.0 + np.abs(ratio).sum(-1)))
        x = np.where(active, new, x)
        if not active.any():
            break
    diff = base - (sign * x)[..., None]  # λ_k − μ_i
    mu = origin + sign * x
    vectors = np.sqrt(rho)[:, None, None] * z[:, None, :] / diff  # y_i unnormalised (L, n, S)
    norm = np.sqrt((vectors**2).sum(-1))
    keep = mu > 1e-12 * np.maximum(mu[:, :1], 0.0)  # as the plain refit: axes of a rank-deficient fit dropped
    scale = np.where(keep & (norm > 0), 1.0 / np.where(norm > 0, norm, 1.0), 0.0)
    along = (vectors * coords[:, None, :]).sum(-1) * scale**2  # (y_i · coords) / ||y_i||²
    # Σ_i (y_i·a) y_i / √λ, with y_i/√λ = √ρ u_row / (λ − μ_i): no division by small eigenvalues
    return np.sqrt(rho)[:, None] * (along[..., None] * (u_row[:, None, :] / diff)).sum(1)


@dataclass(frozen=True)
class PcaDetector(Detector):
    """Squared reconstruction error of the query from the bank mean and the top ``n`` principal
    axes of the bank (fitted on the bank only; a leave-one-out query refits without its row).

    Axes come from the eigendecomposition of the bank's centred Gram matrix (S × S), so D may be
    far larger than S. An axis whose eigenvalue is below 1e-12 × the largest (a bank of rank < n)
    is left out. A leave-one-out refit is a rank-one downdate of the full fit, solved through the
    secular equation (:func:`downdated_top_axes`, O(n · S) per bisection step); the rare fits
    where that equation deflates (tied top eigenvalues, a left-out row orthogonal to a top axis)
    are refitted by an eigendecomposition of their own Gram matrix.
    """

    n: int = 8
    #: the leave-one-out refit is a rank-one downdate: one left-out row per query
    max_exclusions: ClassVar[int | None] = 1
    #: memory that one batch of plain leave-one-out refits may take (bytes)
    refit_bytes: ClassVar[int] = 128 << 20

    def __post_init__(self):
        check_int_setting("pca", "n", self.n, 1, " (principal axes)")

    @property
    def label(self) -> str:
        return f"pca(n={self.n})"

    @property
    def family(self) -> str:
        return "pca"

    def min_bank(self, has_heldout: bool) -> int:
        return self.n + 1 + int(bool(has_heldout))

    @property
    def bank_hint(self) -> str:
        return "n principal axes need n + 1 support images (n + 2 with leave-one-out); use a smaller n"

    def _coefficients(self, gram: np.ndarray, v: np.ndarray, eig=None) -> np.ndarray:
        """c = U_n diag(1/λ_n) U_nᵀ v for Gram matrices (B, S, S) and vectors (B, W, S): the
        projection of d on the top-n axes is Eᵀc. ``eig``: the Gram's ``eigh`` when known."""
        lam, basis = eig if eig is not None else eigh(gram)
        lam, basis = lam[:, -self.n :], basis[:, :, -self.n :]
        keep = lam > 1e-12 * np.maximum(lam[:, -1:], 0.0)
        inv = np.where(keep, 1.0 / np.where(keep, lam, 1.0), 0.0)
        return ((v @ basis) * inv[:, None, :]) @ basis.transpose(0, 2, 1)

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) squared reconstruction errors; NaN where ~query_mask."""
        q, qm, b, bm, ex, task_ids = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids)
        ex = ex[..., 0]  # max_exclusions = 1: each query's one left-out row (or -1)
        n, mean, centred, gram = centred_gram(b, bm)
        d = q - mean[:, None, :]
        v = d @ centred.transpose(0, 2, 1)  # (T, W, S)
        eig = eigh(gram)
        coef = self._coefficients(gram, v, eig)  # projection of d = Eᵀ coef
        shift = np.zeros(ex.shape)  # leave-one-out: d' = d + e_j/(n−1), rows e'_k = e_k + e_j/(n−1)
        t_idx, w_idx = np.nonzero(ex >= 0)
        if t_idx.size:
            j = ex[t_idx, w_idx]
            inv = 1.0 / (n[t_idx] - 1)
            lam = eig[0][:, ::-1]  # descending
            basis = eig[1][:, :, ::-1]
            kept = lam > 1e-12 * np.maximum(lam[:, :1], 0.0)
            root = np.sqrt(np.where(kept, lam, 1.0))
            # coordinates of d' on the full fit's axes: Uᵀ E d' / √λ, with E d' = v + G[:, j]/(n−1)
            moved = np.zeros_like(v)
            moved[t_idx, w_idx] = v[t_idx, w_idx] + gram[t_idx, j] * inv[:, None]
            coords = (moved @ basis)[t_idx, w_idx] / root[t_idx] * kept[t_idx]
            weights, ok = downdated_top_axes(np.where(kept, lam, 0.0)[t_idx], basis[t_idx, j] * kept[t_idx], coords,
                                              n[t_idx] * inv, self.n)
            moved[t_idx, w_idx] = weights
            coef[t_idx, w_idx] = (moved @ basis.transpose(0, 2, 1))[t_idx, w_idx]
            shift[t_idx, w_idx] = inv
            self._refit(coef, t_idx[~ok], w_idx[~ok], ex, n, gram, v, bm)
        e_j = take_rows(centred, np.maximum(ex, 0))  # (T, W, D)
        score = ((d + shift[..., None] * e_j - coef @ centred) ** 2).sum(-1)
        return np.where(qm, score, np.nan)

    def _refit(self, coef, t_idx, w_idx, ex, n, gram, v, bm) -> None:
        """Leave-one-out coefficients by an eigendecomposition of each downdated Gram matrix, in
        batches of bounded memory; written into ``coef`` (T, W, S) at (t_idx, w_idx)."""
        width = gram.shape[1]
        step = max(1, self.refit_bytes // (8 * 6 * width * width))
        for lo in range(0, t_idx.size, step):
            t, w = t_idx[lo : lo + step], w_idx[lo : lo + step]
            j, rows = ex[t, w], np.arange(len(t))
            inv = 1.0 / (n[t] - 1)
            g_j = gram[t, j]  # (L, S): G[j, :]
            g_jj = g_j[rows, j]
            keep = bm[t]
            keep[rows, j] = False
            g2 = gram[t] + (g_j[:, :, None] + g_j[:, None, :]) * inv[:, None, None] + (g_jj * inv**2)[:, None, None]
            g2 *= keep[:, :, None] & keep[:, None, :]  # Gram of the rows e'_k, k ≠ j
            v_j = v[t, w, j]
            v2 = (v[t, w] + g_j * inv[:, None] + (v_j * inv + g_jj * inv**2)[:, None]) * keep  # E' d'
            c2 = self._coefficients(g2, v2[:, None, :])[:, 0, :] * keep
            # projection E'ᵀc' = Eᵀc' + (Σ c') e_j/(n−1): fold the e_j part into the coefficient of row j
            c2[rows, j] = c2.sum(1) * inv
            coef[t, w] = c2

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) squared reconstruction errors of shared queries (Q, D): ||d||² − ||projection||²."""
        q, b, bm, task_ids = check_shared(self, queries, bank, bank_mask, task_ids)
        n, mean, centred, gram = centred_gram(b, bm)
        sq = (q**2).sum(1)[None, :] - 2 * mean @ q.T + (mean**2).sum(1)[:, None]
        v = (centred @ q.T).transpose(0, 2, 1) - (centred @ mean[:, :, None])[..., 0][:, None, :]
        c = self._coefficients(gram, v)
        return np.maximum(sq - (c * v).sum(-1), 0.0)


@register_detector("pca")
def pca(n: int = 8) -> PcaDetector:
    """``pca(n=8)``: PCA reconstruction error with ``n`` principal axes."""
    return PcaDetector(int_setting(n, "pca n"))
