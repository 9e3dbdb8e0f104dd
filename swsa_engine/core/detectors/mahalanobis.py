"""The Gaussian detector (Rippel et al. 2020): squared Mahalanobis distance to a Gaussian fitted to the bank.

Mean + Ledoit–Wolf shrunk covariance, exactly as ``sklearn.covariance.LedoitWolf``; computed
through the bank's Gram matrix (Woodbury), so 10 images in 2,048 dimensions cost an ``S × S``
eigendecomposition per task; leave-one-out refits use a closed-form downdate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from swsa_engine.core.detectors.base import Detector, check_batch, check_shared, register_detector
from swsa_engine.core.detectors.linalg import centred_gram, eigh, take_rows

__all__ = ["MahalanobisDetector", "ledoit_wolf_from_gram"]


def ledoit_wolf_from_gram(trace, frob2, diag4, n, dim: int):
    """scikit-learn's Ledoit–Wolf estimate for ``n`` centred rows in ``dim`` dimensions, from their
    Gram matrix G alone: ``trace`` = tr G, ``frob2`` = ||G||²_F (= ||XᵀX||²_F), ``diag4`` = Σ_k G_kk².

    Returns ``(alpha, beta, shrinkage)`` with the shrunk covariance ``alpha · XᵀX + beta · I``
    (``alpha = (1 − s) / n``, ``beta = s · tr(XᵀX) / (n · dim)``), arrays broadcast over tasks.
    """
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = trace / (n * dim)
        delta_ = frob2 / n**2
        beta = (diag4 / n - delta_) / (dim * n)
        delta = delta_ / dim - mu**2
        beta = np.minimum(beta, delta)
        shrinkage = np.where(beta == 0, 0.0, beta / delta)
    if dim == 1:  # scikit-learn: one feature, no shrinkage
        shrinkage = np.zeros_like(shrinkage)
    return (1.0 - shrinkage) / n, shrinkage * mu, shrinkage


@dataclass(frozen=True)
class MahalanobisDetector(Detector):
    """Rippel et al.'s Gaussian detector: squared Mahalanobis distance to mean + Ledoit–Wolf covariance.

    With the bank's centred rows E (n × D), scatter M = EᵀE and Σ = α M + β I (Ledoit–Wolf), the
    score of d = x − mean is dᵀΣ⁻¹d. When D > S it is computed through the n × n Gram matrix
    G = E Eᵀ = U Λ Uᵀ (Woodbury): dᵀΣ⁻¹d = ||d||²/β − (α/β) Σᵢ wᵢ² / (αλᵢ + β) with w = Uᵀ(E d);
    when D ≤ S through the eigendecomposition of M. A leave-one-out fit (bank row j left out)
    has its own Ledoit–Wolf (α′, β′), from G in O(S) per row, and M′ = M − n/(n−1) e_j e_jᵀ,
    inverted by Sherman–Morrison: no refit, no loop.  One left-out row per query (``max_exclusions``).
    """

    max_exclusions: ClassVar[int | None] = 1

    @property
    def label(self) -> str:
        return "mahalanobis"

    @property
    def family(self) -> str:
        return "gaussian"

    def min_bank(self, has_heldout: bool) -> int:
        """3 rows (2 centred rows give no shrinkage and a singular covariance); 4 for leave-one-out."""
        return 3 + int(bool(has_heldout))

    @property
    def bank_hint(self) -> str:
        return "a shrunk covariance needs at least 3 support images (4 with leave-one-out); use a larger support set"

    def _fit(self, bank, bank_mask):
        n, mean, centred, gram = centred_gram(bank, bank_mask)
        diag = np.einsum("tss->ts", gram)
        alpha, beta, _ = ledoit_wolf_from_gram(diag.sum(1), (gram**2).sum((1, 2)), (diag**2).sum(1), n, bank.shape[2])
        dense = bank.shape[2] <= bank.shape[1]  # D <= S: eigendecomposition of the D × D scatter
        lam, basis = eigh(centred.transpose(0, 2, 1) @ centred if dense else gram)
        return dict(n=n, mean=mean, centred=centred, gram=gram, diag=diag, alpha=alpha, beta=beta, lam=lam,
                    basis=basis, dense=dense)

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) squared Mahalanobis distances (module docstring); NaN where ~query_mask."""
        q, qm, b, bm, ex, task_ids = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids)
        ex = ex[..., 0]  # max_exclusions = 1: each query's one left-out row (or -1)
        f = self._fit(b, bm)
        n, gram, diag, lam, basis = f["n"], f["gram"], f["diag"], f["lam"], f["basis"]
        dim = b.shape[2]
        d = q - f["mean"][:, None, :]  # (T, W, D)
        v = d @ f["centred"].transpose(0, 2, 1)  # (T, W, S): E d
        has = ex >= 0
        j = np.maximum(ex, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(has, 1.0 / (n[:, None] - 1), 0.0)  # d' = d + e_j / (n − 1)
            c = n / (n - 1)
        # the leave-one-out fits, one per bank row j: Ledoit–Wolf from the downdated Gram quantities
        col2 = (gram**2).sum(axis=1)  # ||G[:, j]||²
        inv = 1.0 / np.maximum(n - 1, 1)[:, None, None]
        norms = diag[:, :, None] + 2 * gram * inv + diag[:, None, :] * inv**2  # ||e'_k||² for row k, left-out j
        keep = bm[:, :, None] & bm[:, None, :] & ~np.eye(b.shape[1], dtype=bool)[None]
        diag4_j = np.where(keep, norms**2, 0.0).sum(axis=1)
        trace_j = diag.sum(1)[:, None] - c[:, None] * diag
        frob2_j = (gram**2).sum((1, 2))[:, None] - 2 * c[:, None] * col2 + c[:, None] ** 2 * diag**2
        alpha_j, beta_j, _ = ledoit_wolf_from_gram(trace_j, frob2_j, diag4_j, (n - 1)[:, None], dim)
        alpha = np.where(has, np.take_along_axis(alpha_j, j, 1), f["alpha"][:, None])
        beta = np.where(has, np.take_along_axis(beta_j, j, 1), f["beta"][:, None])
        v_j = np.take_along_axis(v, j[..., None], 2)[..., 0]
        g_jj = np.take_along_axis(diag, j, 1)
        if f["dense"]:
            coords = d @ basis  # Qᵀd
            e_coords = take_rows(f["centred"] @ basis, j) * has[..., None]  # Qᵀe_j
            coords = coords + shift[..., None] * e_coords
            den = alpha[..., None] * lam[:, None, :] + beta[..., None]
            with np.errstate(divide="ignore", invalid="ignore"):
                q_dd = (coords**2 / den).sum(-1)
                q_ee = (e_coords**2 / den).sum(-1)
                q_ed = (e_coords * coords / den).sum(-1)
        else:
            dd = (d**2).sum(-1) + 2 * shift * v_j + shift**2 * g_jj
            w = (v + shift[..., None] * take_rows(gram, j)) @ basis  # Uᵀ(E d')
            u_j = take_rows(basis, j) * has[..., None]  # U[j, :]
            den = alpha[..., None] * lam[:, None, :] + beta[..., None]
            with np.errstate(divide="ignore", invalid="ignore"):
                q_dd = dd / beta - alpha / beta * (w**2 / den).sum(-1)
                q_ee = (lam[:, None, :] * u_j**2 / den).sum(-1)
                q_ed = (u_j * w / den).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ac = alpha * c[:, None]
            score = q_dd + np.where(has, ac * q_ed**2 / (1.0 - ac * q_ee), 0.0)
        return np.where(qm, score, np.nan)

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) squared Mahalanobis distances of shared queries (Q, D), by matrix products."""
        q, b, bm, task_ids = check_shared(self, queries, bank, bank_mask, task_ids)
        f = self._fit(b, bm)
        alpha, beta, lam, basis, mean = f["alpha"][:, None], f["beta"][:, None], f["lam"], f["basis"], f["mean"]
        with np.errstate(divide="ignore", invalid="ignore"):
            if f["dense"]:
                coords = q @ basis - (mean[:, None, :] @ basis)
                return (coords**2 / (alpha[..., None] * lam[:, None, :] + beta[..., None])).sum(-1)
            sq = (q**2).sum(1)[None, :] - 2 * mean @ q.T + (mean**2).sum(1)[:, None]  # ||x − mean||² (T, Q)
            v = (f["centred"] @ q.T).transpose(0, 2, 1) - (f["centred"] @ mean[:, :, None])[..., 0][:, None, :]
            w = v @ basis
            return sq / beta - alpha / beta * (w**2 / (alpha[..., None] * lam[:, None, :] + beta[..., None])).sum(-1)


@register_detector("mahalanobis")
def mahalanobis() -> MahalanobisDetector:
    """``mahalanobis``: the Gaussian detector (it takes no settings)."""
    return MahalanobisDetector()
