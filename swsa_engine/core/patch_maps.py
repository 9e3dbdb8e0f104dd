"""Per-patch anomaly maps of the patch-level residual: where in an image its score comes from.

:class:`~swsa_engine.core.detectors.PatchDetector` scores a query image with patch tokens
``x_1 .. x_P`` against the patches ``y`` of its ``K`` reference images as
``max_p min_y ||x_p − y||²``. :func:`patch_score_maps` returns the inner term for every query
patch, ``m_p = min_y ||x_p − y||²``: reshaped to the backbone's patch grid and upsampled, it is
the image's anomaly heat map, and its maximum is the image's score.

The nearest reference patch of every query patch is found from float64 distances in the
expanded form ``||x||² + ||y||² − 2 x·y`` (one matrix product per block of queries); its distance
is then recomputed from the difference, ``Σ (x − y)²`` in float64, as the detector computes it,
so the map's maximum equals the detector's score up to float64 rounding wherever the nearest
patch is not a near-tie (and to within the expanded form's error, ~1e-13 of the norms, where it is).
"""

from __future__ import annotations

import numpy as np

from swsa_engine.core.validation import as_real_array

__all__ = ["patch_score_maps"]


def patch_score_maps(queries, references, *, block_bytes: int = 64 << 20) -> np.ndarray:
    """(N, P) float64 ``min_y ||x_p − y||²`` for query patch tokens ``queries`` (N, P, D) against
    the reference patches ``references`` (R, D) (the reference images' tokens stacked); blocks
    of queries keep the (block, P, R) distance array near ``block_bytes``."""
    q = as_real_array(queries, "queries", ndim=3, shape_doc="(N, P, D)").astype(np.float64, copy=False)
    r = as_real_array(references, "references", ndim=2, shape_doc="(R, D)").astype(np.float64, copy=False)
    n, p, d = q.shape
    if r.shape[1] != d:
        raise ValueError(f"references have D={r.shape[1]} but queries have D={d}; both must be one backbone's patch tokens")
    if len(r) == 0:
        raise ValueError("patch_score_maps needs at least one reference patch, got references of shape (0, D)")
    out = np.empty((n, p))
    r_norms = np.einsum("rd,rd->r", r, r)
    step = max(1, int(block_bytes // max(1, 8 * p * len(r))))
    for lo in range(0, n, step):
        x = q[lo : lo + step].reshape(-1, d)
        dist = np.einsum("xd,xd->x", x, x)[:, None] + r_norms[None, :] - 2.0 * (x @ r.T)
        nearest = np.argmin(dist, axis=1)
        diff = x - r[nearest]
        out[lo : lo + step] = np.einsum("xd,xd->x", diff, diff).reshape(-1, p)
    return out
