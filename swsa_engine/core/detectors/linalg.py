"""Batched linear algebra that several detector families share (Mahalanobis, PCA, residual).

Every function works on a batch of tasks at once, in float64.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["eigh", "take_rows", "centred_gram"]


def eigh(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched symmetric eigendecomposition (B, S, S) → ascending eigenvalues (B, S), vectors (B, S, S), float64.

    torch's batched LAPACK call on one thread: for many small matrices, threads inside each
    decomposition only contend (7x slower on a busy 2-core machine)."""
    if matrices.shape[-1] == 0:
        return np.zeros(matrices.shape[:-1]), np.zeros(matrices.shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lam, vec = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(matrices, dtype=np.float64)))
    finally:
        torch.set_num_threads(threads)
    return lam.numpy(), vec.numpy()


def take_rows(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``x[t, index[t, w]]`` for x (T, S, ...) and index (T, W) → (T, W, ...)."""
    return x[np.arange(len(x))[:, None], index]


def centred_gram(bank: np.ndarray, bank_mask: np.ndarray):
    """Per task, for a bank (T, S, D) and its mask (T, S) bool: the number of real rows n (T,),
    their mean (T, D), the centred rows E (T, S, D) (padding 0) and the Gram matrix G = E Eᵀ (T, S, S)."""
    weight = bank_mask.astype(np.float64)
    n = weight.sum(axis=1)
    mean = (weight[:, None, :] @ bank)[:, 0, :] / np.maximum(n, 1)[:, None]
    centred = (bank - mean[:, None, :]) * weight[..., None]
    return n, mean, centred, centred @ centred.transpose(0, 2, 1)
