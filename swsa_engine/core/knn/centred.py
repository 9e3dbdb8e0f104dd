"""Feature rows centred for the bounded float32 kernels, and the error bound of those kernels."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from swsa_engine.core.knn.checks import U32, U64, as_feature_array, f32_safe, resolve_device
from swsa_engine.core.validation import finite_rows

__all__ = ["DOT_CHUNK", "NORM_CHUNK", "CentredRows", "centre_rows", "score_bounds", "chunked_dots"]


#: features per float32 partial dot product of the bounded kernels; the partial sums are added
#: separately, so each product passes through at most ``DOT_CHUNK + D / DOT_CHUNK`` roundings
#: instead of ``D`` and the a priori error bound is that much tighter (see :func:`score_bounds`).
DOT_CHUNK = 256


@dataclass(frozen=True)
class CentredRows:
    """Feature rows prepared for the bounded float32 kernels
    (:func:`~swsa_engine.core.knn.bounded.bounded_knn_shared`, :func:`~swsa_engine.core.knn.bounded.bounded_knn_tasks`):
    every distance is taken between rows ``fl32(row - centre)``.

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


#: features per float32 partial sum of a squared norm in :func:`centre_rows` (see :func:`score_bounds`).
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
    f = as_feature_array(features, name, 2, "(N, D)")
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    centre_on = np.unique(np.asarray(centre_on, dtype=np.int64))
    dev = resolve_device(device)
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
        raw_bad = rows[~finite][~finite_rows(f[rows[~finite]])]
        if raw_bad.size:
            raise ValueError(f"{name} row {int(raw_bad[0])} contains NaN or inf ({raw_bad.size} such row(s)); "
                             "re-embed or drop those rows")
    return CentredRows(values, centre, prepared.sq_norms, f, bool(finite.all()) and f32_safe(norms))


def score_bounds(k: int, dim: int, nq: np.ndarray, max_nb: np.ndarray, scores: np.ndarray, u_in: float = 0.0) -> np.ndarray:
    """Bound on ``|score - exact|`` for the chunked float32 expanded form (broadcasting arrays).

    The kernels compute exactly with the float32 centred rows ``x' = fl32(x - c)``; per distance:
    the dot product of ``x'`` rows (``γ_h``, ``h`` roundings per product, on ``2 ||q|| ||b||``);
    their squared norms (``γ_40``, :func:`centre_rows`); the norms rounded to float32 and the two
    additions (``3u``); and the distance between the ``x'`` rows against the one between the
    exact centred rows (``|x' - x| <= u |x|`` elementwise: ``2u (||q|| + ||b||)²``).  Times ``k``
    for the sum of the ``k`` smallest (each order statistic moves by at most the largest error),
    plus its float64 sum.  ``u_in``: the rounding of the inputs inside the product (TF32 on
    CUDA, see :func:`~swsa_engine.core.knn.certify.matmul_input_roundoff`).
    """
    n_chunks = -(-dim // DOT_CHUNK)
    depth = (DOT_CHUNK + n_chunks + 1) if n_chunks > 1 else dim + 1
    u = U32
    gamma = depth * u / (1.0 - depth * u)
    gamma_norm = 40 * u / (1.0 - 40 * u)
    cross = 2.0 * np.sqrt(nq * max_nb)
    per_distance = ((gamma + 2.02 * u_in) * cross + gamma_norm * (nq + max_nb)
                    + (5.2 * u + 8 * U64) * (nq + max_nb + cross))
    return 1.01 * k * per_distance + 4.0 * k * U64 * np.abs(scores)


def chunked_dots(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, W, D) · (B, S, D) → (B, W, S) float32 dot products: one fresh product per
    :data:`DOT_CHUNK`-feature slice (strided views, no copies), the slices' results added one
    after another, so each product passes through at most ``DOT_CHUNK + D / DOT_CHUNK`` roundings
    (see :func:`score_bounds`)."""
    dim = q.shape[-1]
    out = torch.bmm(q[..., :DOT_CHUNK], b[..., :DOT_CHUNK].transpose(1, 2))
    for lo in range(DOT_CHUNK, dim, DOT_CHUNK):
        out.add_(torch.bmm(q[..., lo : lo + DOT_CHUNK], b[..., lo : lo + DOT_CHUNK].transpose(1, 2)))
    return out
