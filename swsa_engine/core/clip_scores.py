"""CLIP anomaly scores as pure batched array functions: prompt ensembles, the zero-shot
two-prompt score (SWSA paper, Section 4.3) and BLISS (Goodge et al., Sections 4.1–4.3).

Every function takes all tasks (and all images) at once; nothing loops over images or tasks.

Two-prompt score. For an image embedding ``z`` and the normal / anomaly prompt embeddings
``t_n``, ``t_a`` (all L2-normalised), the anomaly probability is

    p(x) = softmax(s · [cos(z, t_n), cos(z, t_a)])[1] = sigmoid(s · (cos(z, t_a) − cos(z, t_n)))

with ``s`` the model's own learned logit scale (``exp(logit_scale)``, 100 for the OpenAI and
LAION models): the same scaling CLIP uses for zero-shot classification, so ``p`` is CLIP's
own two-class probability. ``p`` is a strictly increasing function of the logit
``s · (cos_a − cos_n)``, so every AUROC is the same for both — but in floating point the
sigmoid saturates (``p == 1.0`` exactly once the logit exceeds ~37 in float64) and would create
ties; the sweeps therefore rank by :func:`two_prompt_logit`, the exact preimage.

Prompt ensemble (Radford et al.): per side, the mean of the L2-normalised embeddings of the
templates, re-normalised (:func:`prompt_ensemble`); the two-prompt score is then computed
with the two ensembled embeddings.

BLISS, for a task whose normal classes ``C_i`` have support images ``Z_i`` (the SWSA tasks
have one normal class):

    IC(x, C_i) = −(sim(z, C_i) − μ_i) / (σ_i + ε),   μ_i, σ_i over sim(z', C_i), z' ∈ Z_i
    ET(x, C_i) = mean over the K dictionary entries d most similar to z of
                 (sim(z, d) − μ_i(d)) / (σ_i(d) + ε),  μ_i(d), σ_i(d) over sim(z', d), z' ∈ Z_i
    s(x, C_i) = IC(x, C_i) + λ · ET(x, C_i),          s(x) = min_i s(x, C_i)

``sim`` is the cosine similarity, σ the standard deviation with ``ddof`` (default 0, the
population standard deviation, defined for a single support image), ε = 1e-6 by default. The
top-K entries depend on the image only, so they are found once per image for the largest K and
every smaller K is a prefix. ``exclude`` leaves one support image out of the statistics for the
query that *is* that image (leave-one-out, as the kNN sweep does for held-out normals).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit

__all__ = [
    "DEFAULT_EPS", "bliss_from_similarities", "bliss_score", "l2_normalize", "prompt_ensemble", "support_sums",
    "topk_similarities", "two_prompt_logit", "two_prompt_score",
]

DEFAULT_EPS = 1e-6


def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """``x / ||x||`` along ``axis`` (float64 unless ``x`` is float32); zero vectors stay zero."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def prompt_ensemble(embeddings, axis: int = -2) -> np.ndarray:
    """Mean of the L2-normalised template embeddings along ``axis``, re-normalised.

    ``embeddings``: ``(..., P, D)`` (``axis=-2``) → ``(..., D)`` unit vectors.
    """
    return l2_normalize(l2_normalize(embeddings, axis=-1).mean(axis=axis), axis=-1)


def _cosines(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """cos(z, t) for images ``(..., Q, D)`` (or shared ``(Q, D)``) and texts ``(..., D)`` → ``(..., Q)``."""
    z = l2_normalize(images)
    t = l2_normalize(texts)
    return np.matmul(z, t[..., :, None])[..., 0]


def two_prompt_logit(images, normal_text, anomaly_text, logit_scale: float = 100.0) -> np.ndarray:
    """``s · (cos(z, t_a) − cos(z, t_n))``, the logit of :func:`two_prompt_score` (same ranking, no saturation).

    images: ``(..., Q, D)`` or ``(Q, D)`` shared by every leading index of the texts;
    normal_text, anomaly_text: ``(..., D)``. Returns ``(..., Q)`` float64.
    """
    direction = l2_normalize(np.asarray(anomaly_text, dtype=np.float64)) - l2_normalize(np.asarray(normal_text, dtype=np.float64))
    z = l2_normalize(np.asarray(images, dtype=np.float64))
    return float(logit_scale) * np.matmul(z, direction[..., :, None])[..., 0]


def two_prompt_score(images, normal_text, anomaly_text, logit_scale: float = 100.0) -> np.ndarray:
    """Zero-shot anomaly probability ``softmax(s · [cos(z, t_n), cos(z, t_a)])[1]`` (see module doc)."""
    return expit(two_prompt_logit(images, normal_text, anomaly_text, logit_scale))


# --------------------------------------------------------------------------------------------
# BLISS
# --------------------------------------------------------------------------------------------


def topk_similarities(images, dictionary, k: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest cosine similarities of each image to the dictionary, in decreasing order.

    images ``(N, D)``, dictionary ``(M, D)`` → values ``(N, k)`` float64, indices ``(N, k)`` int64.
    """
    z = np.asarray(images)
    d = torch.from_numpy(np.ascontiguousarray(l2_normalize(np.asarray(dictionary, dtype=np.float64))))
    k = int(k)
    if not 1 <= k <= d.shape[0]:
        raise ValueError(f"K must be between 1 and the dictionary size {d.shape[0]}, got {k}")
    values = np.empty((len(z), k), dtype=np.float64)
    index = np.empty((len(z), k), dtype=np.int64)
    for lo in range(0, len(z), chunk):
        block = l2_normalize(np.asarray(z[lo: lo + chunk], dtype=np.float64))
        sims = torch.from_numpy(np.ascontiguousarray(block)) @ d.T
        top = torch.topk(sims, k, dim=1, largest=True, sorted=True)
        values[lo: lo + chunk] = top.values.numpy()
        index[lo: lo + chunk] = top.indices.numpy()
    return values, index


def support_sums(sims, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, sum, sum of squares)`` over the support axis.

    sims ``(..., S, M)``, mask ``(..., S)`` bool → count ``(...)``, sums ``(..., M)`` float64.
    """
    sims = np.asarray(sims, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    w = mask[..., None].astype(np.float64)
    return mask.sum(axis=-1), (sims * w).sum(axis=-2), (sims * sims * w).sum(axis=-2)


def _mean_std(count, total, squares, ddof: int):
    """Mean and standard deviation from sums (float64); NaN where ``count - ddof < 1``."""
    count = np.asarray(count, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        var = (squares - count * mean * mean) / (count - ddof)
    var = np.where(count - ddof >= 1, np.maximum(var, 0.0), np.nan)
    return mean, np.sqrt(var)


def _leading_topk(query_topk, query_topk_index, ks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The first ``max(ks)`` top similarities and indices, ``(B or 1, Q, max(ks))``; rejects a K out of range."""
    topv = np.asarray(query_topk, dtype=np.float64)
    topi = np.asarray(query_topk_index, dtype=np.int64)
    if topv.ndim == 2:
        topv, topi = topv[None], topi[None]
    k_max = max(ks)
    if min(ks) < 1 or k_max > topv.shape[-1]:
        raise ValueError(f"every K must be in [1, {topv.shape[-1]}] (top entries given), got {ks}")
    return topv[..., :k_max], topi[..., :k_max]


def _class_sums_per_query(support_class: np.ndarray, support_mask: np.ndarray, query_shape) -> tuple:
    """(count, sum, sum of squares) of sim(z', C_i) over the support images, repeated per query: ``(B, N, Q)`` each."""
    count = support_mask.sum(axis=-1).astype(np.float64)  # (B, N)
    total = np.where(support_mask, support_class, 0.0).sum(axis=-1)
    squares = np.where(support_mask, support_class * support_class, 0.0).sum(axis=-1)
    return tuple(np.broadcast_to(x[..., None], query_shape).copy() for x in (count, total, squares))


def _dictionary_sums_at_topk(dict_count, dict_sum, dict_squares, topi: np.ndarray, query_shape) -> tuple:
    """The support statistics of each query's top dictionary entries, gathered in one indexing step.

    topi ``(B or 1, Q, K)``; query_shape ``(B, N, Q)`` → count, sum, sum of squares ``(B, N, Q, K)``.
    """
    d_count = np.asarray(dict_count, dtype=np.float64)
    d_sum = np.asarray(dict_sum, dtype=np.float64)
    d_sq = np.asarray(dict_squares, dtype=np.float64)
    n_b, n_n, n_q = query_shape
    b_idx = np.arange(n_b)[:, None, None, None]
    n_idx = np.arange(n_n)[None, :, None, None]
    gather_i = np.broadcast_to(topi[:, None], (n_b, n_n, n_q, topi.shape[-1]))
    g_sum = d_sum[b_idx, n_idx, gather_i]
    g_sq = d_sq[b_idx, n_idx, gather_i]
    g_count = np.broadcast_to(d_count[:, :, None, None], g_sum.shape).copy()
    return g_count, g_sum, g_sq


def _without_own(count, total, squares, left_out, own) -> tuple:
    """Sums with the left-out support image's own similarity ``own`` removed where ``left_out``."""
    return (count - left_out, total - np.where(left_out, own, 0.0), squares - np.where(left_out, own * own, 0.0))


def _min_over_classes(ic: np.ndarray, et: np.ndarray, lambdas, class_mask) -> np.ndarray:
    """``min_i IC + λ·ET`` over the existing classes: ic ``(B, N, Q)``, et ``(KK, B, N, Q)`` → ``(L, KK, B, Q)``."""
    lam = np.asarray(lambdas, dtype=np.float64)[:, None, None, None, None]
    per_class = ic[None, None] + lam * et[None]  # (L, KK, B, N, Q)
    if class_mask is not None:
        cm = np.asarray(class_mask, dtype=bool)[None, None, :, :, None]
        per_class = np.where(cm, per_class, np.inf)
    return per_class.min(axis=3)


def bliss_from_similarities(
    query_class, query_topk, query_topk_index, support_class, support_class_mask, dict_count, dict_sum, dict_squares,
    *, ks=(10,), lambdas=(0.5,), eps: float = DEFAULT_EPS, ddof: int = 0, exclude=None, class_mask=None,
) -> dict[str, np.ndarray]:
    """BLISS for a grid of K and λ, from precomputed similarities (the batched core).

    B task rows, N normal classes per task (padded with ``class_mask``), Q queries, S support
    images, M dictionary entries, K0 ≥ max(ks) top entries per query.

    Parameters
    ----------
    query_class : (B, N, Q) sim(z, C_i) of each query to each class prompt
    query_topk : (B, Q, K0) or (Q, K0) the query's top similarities to the dictionary, decreasing
    query_topk_index : same shape, int, their dictionary indices
    support_class : (B, N, S) sim(z', C_i) of the class's support images; ``support_class_mask`` (B, N, S)
    dict_count, dict_sum, dict_squares : (B, N), (B, N, M), (B, N, M) :func:`support_sums` of the
        support images' similarities to the whole dictionary
    exclude : optional (B, N, Q) int, position in the support axis of a support image to leave
        out of the statistics for that query (−1: none); its own similarities are the query's.
    class_mask : optional (B, N) bool, which classes exist (padding is ignored in the minimum)

    Returns
    -------
    dict with ``score`` (L, KK, B, Q) = min over classes of IC + λ·ET, ``ic`` (B, N, Q) and
    ``et`` (KK, B, N, Q), for ``L = len(lambdas)``, ``KK = len(ks)``.
    """
    qc = np.asarray(query_class, dtype=np.float64)
    sc = np.asarray(support_class, dtype=np.float64)
    ks = [int(k) for k in ks]
    topv, topi = _leading_topk(query_topk, query_topk_index, ks)
    c_count, c_sum, c_sq = _class_sums_per_query(sc, np.asarray(support_class_mask, dtype=bool), qc.shape)
    g_count, g_sum, g_sq = _dictionary_sums_at_topk(dict_count, dict_sum, dict_squares, topi, qc.shape)
    own_top = np.broadcast_to(topv[:, None], g_sum.shape)
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        left_out = exclude >= 0  # (B, N, Q)
        own_class = np.take_along_axis(sc, np.maximum(exclude, 0), axis=-1)  # (B, N, Q)
        c_count, c_sum, c_sq = _without_own(c_count, c_sum, c_sq, left_out, own_class)
        g_count, g_sum, g_sq = _without_own(g_count, g_sum, g_sq, left_out[..., None], own_top)
    mu, sigma = _mean_std(c_count, c_sum, c_sq, ddof)
    ic = -(qc - mu) / (sigma + eps)
    mu_d, sigma_d = _mean_std(g_count, g_sum, g_sq, ddof)
    standardized = (own_top - mu_d) / (sigma_d + eps)  # (B, N, Q, K)
    running = np.cumsum(standardized, axis=-1)
    et = np.stack([running[..., k - 1] / k for k in ks])  # (KK, B, N, Q)
    score = _min_over_classes(ic, et, lambdas, class_mask)
    return {"score": score, "ic": ic, "et": et}


def bliss_score(queries, class_text, support, dictionary, *, support_mask=None, class_mask=None, k: int | tuple = 10,
                lam: float | tuple = 0.5, eps: float = DEFAULT_EPS, ddof: int = 0, exclude=None) -> dict[str, np.ndarray]:
    """BLISS scores from embeddings, all task rows at once.

    queries ``(B, Q, D)`` (or ``(Q, D)`` shared), class_text ``(B, N, D)``, support
    ``(B, N, S, D)`` with ``support_mask`` ``(B, N, S)``, dictionary ``(M, D)``; embeddings
    need not be normalised. ``k`` and ``lam`` may be scalars or tuples (a grid). Returns
    ``score`` ``(B, Q)`` for scalar ``k`` and ``lam`` (else ``(L, KK, B, Q)``), ``ic``, ``et``.
    """
    ks = (k,) if np.isscalar(k) else tuple(k)
    lambdas = (lam,) if np.isscalar(lam) else tuple(lam)
    c = l2_normalize(np.asarray(class_text, dtype=np.float64))
    sup = l2_normalize(np.asarray(support, dtype=np.float64))
    d = l2_normalize(np.asarray(dictionary, dtype=np.float64))
    q = l2_normalize(np.asarray(queries, dtype=np.float64))
    n_b, n_n = c.shape[:2]
    if support_mask is None:
        support_mask = np.ones(sup.shape[:-1], dtype=bool)
    q_b = np.broadcast_to(q, (n_b,) + q.shape[-2:]) if q.ndim == 2 else q
    query_class = np.einsum("bqd,bnd->bnq", q_b, c)
    support_class = np.einsum("bnsd,bnd->bns", sup, c)
    count, total, squares = support_sums(sup @ d.T, support_mask)
    if q.ndim == 2:
        topv, topi = topk_similarities(q, d, max(ks))
    else:
        topv, topi = topk_similarities(q.reshape(-1, q.shape[-1]), d, max(ks))
        topv, topi = topv.reshape(q.shape[0], q.shape[1], -1), topi.reshape(q.shape[0], q.shape[1], -1)
    out = bliss_from_similarities(query_class, topv, topi, support_class, support_mask, count, total, squares, ks=ks,
                                  lambdas=lambdas, eps=eps, ddof=ddof, exclude=exclude, class_mask=class_mask)
    if np.isscalar(k) and np.isscalar(lam):
        out = {"score": out["score"][0, 0], "ic": out["ic"], "et": out["et"][0]}
    return out
