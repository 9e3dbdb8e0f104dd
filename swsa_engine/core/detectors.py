"""The detector extension point: a candidate of the AUROC cube is (feature source, detector, settings).

A detector turns a task's support features (its bank) into anomaly scores of query features.
Register one with ``@register_detector("name")``; ``create_detector("name", **settings)``
builds it and ``parse_detector("knn(k=5,metric=cosine)")`` builds it from its readable label.
The sweep names a candidate ``<feature source>`` for the paper's default detector
(:data:`DEFAULT_DETECTOR`, kNN with k = 3 on squared L2) and ``<feature source>/<label>`` for
every other detector, e.g. ``vit_b_16/knn(k=5,cosine)``.

Detectors shipped:

* ``knn`` (Bergman et al.'s DN2): the sum of squared L2 distances to the ``k`` nearest bank rows;
  ``metric="cosine"`` L2-normalises every feature first, so the score is ``2 Σ (1 − cos)``.
  Held-out normals, which are in the bank, are scored leave-one-out.
* ``mahalanobis`` (Rippel et al. 2020): squared Mahalanobis distance to a Gaussian fitted to the
  bank (mean + Ledoit–Wolf shrunk covariance, exactly as ``sklearn.covariance.LedoitWolf``);
  computed through the bank's Gram matrix (Woodbury), so 10 images in 2,048 dimensions cost an
  ``S × S`` eigendecomposition per task; leave-one-out refits use a closed-form downdate.
* ``residual`` (InCTRL's image-level residual, training-free): ``K`` references drawn from the
  bank by a seeded hash of (seed, task id, bank position); ``mean`` = squared L2 distance to the
  references' mean, ``min`` = to the nearest reference. A query that is a reference is scored
  against the other ``K − 1``.
* ``nagl`` (NAGL's normal–abnormal guided idea, training-free): kNN score against the normal bank
  minus ``beta`` × kNN score against the task's abnormal references
  (:mod:`swsa_store.references`).
* ``pca``: squared reconstruction error of the query from the bank mean and the bank's top ``n``
  principal axes (on ``pixels@N`` features: PCA of pixels fitted on the task's support only);
  leave-one-out refits by a rank-one downdate through the secular equation.

Every detector scores all tasks of a batch at once through one interface, the one the sweep
calls (:mod:`swsa_engine.run.detector_sweep`)::

    score_tasks(queries (T, W, D), query_mask (T, W), bank (T, S, D), bank_mask (T, S),
                exclude (T, W), *, task_ids (T,), abnormal (T, R, D) = None,
                abnormal_mask (T, R) = None) -> (T, W) float64, NaN where ~query_mask
    score_shared(queries (Q, D), bank (T, S, D), bank_mask (T, S), *, task_ids, abnormal,
                 abnormal_mask) -> (T, Q)           # one set of queries shared by every task
    min_bank(has_heldout) -> int                    # smallest bank that can score
    needs = "features";  needs_abnormal: bool;  label;  family;  prepare(features)

``exclude[t, w]`` is the bank row left out for query ``w`` (leave-one-out: a fitted detector is
refitted without it), or -1. Everything is float64; results equal plain per-task references
(scikit-learn, scipy, explicit loops) to about 1e-10 relative (``tests/test_detectors_more.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from swsa_store.registry import Registry

DETECTORS: Registry = Registry("detector")


def register_detector(name: str):
    """Decorator registering a detector factory ``factory(**settings) -> detector``."""
    return DETECTORS.register(name)


def create_detector(name: str, /, **settings):
    """Build the registered detector ``name`` with ``settings``."""
    return DETECTORS.create(name, **settings)


def list_detectors() -> list[str]:
    return DETECTORS.names()


class Detector:
    """Defaults of the detector interface (see the module docstring): detectors compare
    features as given (``prepare`` is the identity) and need no abnormal references."""

    needs: ClassVar[str] = "features"
    needs_abnormal: ClassVar[bool] = False

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features as the detector compares them."""
        return features


def check_int_setting(detector: str, name: str, value, minimum: int, why: str = "") -> None:
    """One-line ValueError unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{detector} needs an integer {name} >= {minimum}{why}, got {value!r}")


class NeighbourBank:
    """What detectors built on kNN distances to the bank share: ``k`` neighbours, a metric
    ("l2" = squared L2, "cosine" = squared L2 of L2-normalised rows), leave-one-out by one more row."""

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features as the detector compares them (L2-normalised rows for cosine)."""
        return features if self.metric == "l2" else _unit_rows(features)

    def min_bank(self, has_heldout: bool) -> int:
        """Usable bank rows needed: k (one more when held-out queries are scored leave-one-out)."""
        return self.k + int(bool(has_heldout))

    @property
    def bank_hint(self) -> str:
        return "use a smaller k or a larger support set"


@dataclass(frozen=True)
class KnnDetector(NeighbourBank, Detector):
    """kNN anomaly score. ``k`` neighbours; ``metric`` "l2" (squared L2) or "cosine"."""

    k: int = 3
    metric: str = "l2"

    def __post_init__(self):
        check_int_setting("knn", "k", self.k, 1)
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"knn metric must be 'l2' or 'cosine', got {self.metric!r}")

    @property
    def label(self) -> str:
        return f"knn(k={self.k},{self.metric})"

    @property
    def family(self) -> str:
        return "knn"

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) kNN scores of per-task queries (see the module docstring); NaN where ~query_mask."""
        from swsa_engine.core.knn import knn_score_batched

        q, qm, b, bm, ex, task_ids = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids)
        return knn_score_batched(q, b, k=self.k, query_mask=qm, bank_mask=bm, exclude=ex)

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) kNN scores of queries (Q, D) shared by every task against each bank (T, S, D)."""
        q, b, bm, task_ids = check_shared(self, queries, bank, bank_mask, task_ids)
        return _knn_shared(q, b, bm, self.k)


def _unit_rows(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def _knn_shared(queries: np.ndarray, bank: np.ndarray, bank_mask: np.ndarray, k: int) -> np.ndarray:
    """(T, Q) kNN scores of shared queries against every bank, one distance block per query block."""
    from swsa_engine.core.knn import knn_score_gathered

    n_tasks, width, dim = bank.shape
    index = np.where(bank_mask, np.arange(n_tasks * width).reshape(n_tasks, width), -1)
    return knn_score_gathered(queries, bank.reshape(n_tasks * width, dim), index, k=k)


@register_detector("knn")
def knn(k: int = 3, metric: str = "l2") -> KnnDetector:
    return KnnDetector(int(k), metric)


DEFAULT_DETECTOR = KnnDetector(3, "l2")

#: the setting a bare word in a label sets, per detector (``knn(k=5,cosine)``, ``residual(K=4,min)``)
_BARE_SETTING = {"knn": "metric", "nagl": "metric", "residual": "reduce"}

_LABEL = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$")


def parse_detector(text: str):
    """A detector from its label: ``knn``, ``knn(k=5)``, ``knn(k=5,metric=cosine)`` or ``knn(k=5,cosine)``."""
    match = _LABEL.match(text)
    if not match:
        raise ValueError(f"cannot read detector {text!r}; write it as name(setting=value, ...), e.g. knn(k=5,metric=cosine)")
    name, body = match.group(1), match.group(2) or ""
    settings: dict = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
        elif name in _BARE_SETTING:  # the label forms knn(k=5,cosine), residual(K=4,mean)
            key, value = _BARE_SETTING[name], part
        else:
            raise ValueError(f"cannot read setting {part!r} of detector {text!r}; write setting=value")
        settings[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
    try:
        return create_detector(name, **settings)
    except TypeError as error:
        raise ValueError(f"detector {name!r} does not take these settings {sorted(settings)}: {error}") from None


def candidate_name(feature_source: str, detector) -> str:
    """The cube's name of a (feature source, detector) candidate."""
    return feature_source if detector == DEFAULT_DETECTOR else f"{feature_source}/{detector.label}"


# --------------------------------------------------------------------------- input checks


def _as_mask(mask, shape: tuple, name: str) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {mask.shape}")
    return mask.astype(bool, copy=False)


def _as_features(x, name: str, ndim: int, doc: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be a real array of shape {doc}, got {x.dtype} of shape {x.shape}")
    return x.astype(np.float64, copy=False)


def _zero_masked(x: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    """``x`` with rows outside ``mask`` set to 0; raises on a non-finite row inside it."""
    bad = mask & ~np.isfinite(x).all(axis=-1)
    if bad.any():
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite rows that its mask marks as real; mask those "
                         "images out (they are unusable) or re-embed them")
    return np.where(mask[..., None], x, 0.0)


def check_batch(detector, queries, query_mask, bank, bank_mask, exclude, task_ids, abnormal=None, abnormal_mask=None):
    """Validate the inputs of ``score_tasks``; returns float64 arrays (padding zeroed), bool masks,
    ``exclude`` as int64 (-1 where it names padding) and ``task_ids`` (T,), then (abnormal,
    abnormal mask) when the detector needs them. Raises a one-line ValueError on bad shapes,
    non-finite real rows, or a bank smaller than ``detector.min_bank``."""
    q = _as_features(queries, "queries", 3, "(T, W, D)")
    n_tasks, width, dim = q.shape
    b = _as_features(bank, "bank", 3, f"(T, S, D) = ({n_tasks}, S, {dim})")
    if b.shape[0] != n_tasks or b.shape[2] != dim:
        raise ValueError(f"bank must have shape (T, S, D) = ({n_tasks}, S, {dim}) to match queries {q.shape}, got {b.shape}")
    qm = _as_mask(query_mask, (n_tasks, width), "query_mask")
    bm = _as_mask(bank_mask, (n_tasks, b.shape[1]), "bank_mask")
    ex = np.full((n_tasks, width), -1, dtype=np.int64) if exclude is None else np.asarray(exclude)
    if ex.shape != (n_tasks, width) or not np.issubdtype(ex.dtype, np.integer):
        raise ValueError(f"exclude must be an integer array of shape {(n_tasks, width)} (bank row or -1), got {ex.dtype} {ex.shape}")
    if ex.size and (ex.min() < -1 or ex.max() >= b.shape[1]):
        raise ValueError(f"exclude must hold bank rows in [0, {b.shape[1]}) or -1, got values in [{ex.min()}, {ex.max()}]")
    ex = ex.astype(np.int64)
    if b.shape[1]:
        ex = np.where((ex >= 0) & np.take_along_axis(bm, np.maximum(ex, 0), axis=1) & qm, ex, -1)
    ids = np.arange(n_tasks, dtype=np.int64) if task_ids is None else np.asarray(task_ids, dtype=np.int64)
    if ids.shape != (n_tasks,):
        raise ValueError(f"task_ids must have shape ({n_tasks},), got {ids.shape}")
    q = _zero_masked(q, qm, "queries")
    b = _zero_masked(b, bm, "bank")
    _check_bank(detector, bm, qm.any(axis=1), (ex >= 0).any(axis=1), ids)
    out = (q, qm, b, bm, ex, ids)
    if getattr(detector, "needs_abnormal", False):
        out += _check_abnormal(detector, abnormal, abnormal_mask, qm.any(axis=1), ids, n_tasks, dim)
    return out


def check_shared(detector, queries, bank, bank_mask, task_ids, abnormal=None, abnormal_mask=None):
    """Validate the inputs of ``score_shared``: queries (Q, D), bank (T, S, D), bank_mask (T, S)."""
    q = _as_features(queries, "queries", 2, "(Q, D)")
    b = _as_features(bank, "bank", 3, f"(T, S, {q.shape[1]})")
    if b.shape[2] != q.shape[1]:
        raise ValueError(f"bank rows have D={b.shape[2]} but queries have D={q.shape[1]}; both must come from one feature source")
    bm = _as_mask(bank_mask, b.shape[:2], "bank_mask")
    ids = np.arange(len(b), dtype=np.int64) if task_ids is None else np.asarray(task_ids, dtype=np.int64)
    if ids.shape != (len(b),):
        raise ValueError(f"task_ids must have shape ({len(b)},), got {ids.shape}")
    q = _zero_masked(q, np.ones(len(q), bool), "queries")
    b = _zero_masked(b, bm, "bank")
    active = np.full(len(b), len(q) > 0)
    _check_bank(detector, bm, active, np.zeros(len(b), bool), ids)
    out = (q, b, bm, ids)
    if getattr(detector, "needs_abnormal", False):
        out += _check_abnormal(detector, abnormal, abnormal_mask, active, ids, len(b), q.shape[1])
    return out


def _check_bank(detector, bank_mask: np.ndarray, active: np.ndarray, has_heldout: np.ndarray, task_ids: np.ndarray) -> None:
    n_bank = bank_mask.sum(axis=1)
    need = np.where(has_heldout, detector.min_bank(True), detector.min_bank(False))
    bad = np.flatnonzero(active & (n_bank < need))
    if bad.size:
        t = bad[0]
        raise ValueError(f"{detector.label} needs at least {need[t]} usable bank rows per task, task {task_ids[t]} has "
                         f"{n_bank[t]} ({bad.size} task(s) too small); "
                         f"{getattr(detector, 'bank_hint', 'use a larger support set or other settings')}")


def _check_abnormal(detector, abnormal, abnormal_mask, active, task_ids, n_tasks: int, dim: int):
    if abnormal is None:
        raise ValueError(f"{detector.label} needs abnormal references (abnormal=(T, R, D)); hold some synthetic "
                         "anomalies apart with `swsa split-refs --store STORE --source SOURCE --share 0.25`")
    a = _as_features(abnormal, "abnormal", 3, f"({n_tasks}, R, {dim})")
    if a.shape[0] != n_tasks or a.shape[2] != dim:
        raise ValueError(f"abnormal must have shape ({n_tasks}, R, {dim}), got {a.shape}")
    am = _as_mask(abnormal_mask, a.shape[:2], "abnormal_mask")
    a = _zero_masked(a, am, "abnormal")
    n_abnormal = am.sum(axis=1)
    bad = np.flatnonzero(active & (n_abnormal < detector.min_abnormal))
    if bad.size:
        t = bad[0]
        raise ValueError(f"{detector.label} needs at least {detector.min_abnormal} abnormal references per task, task "
                         f"{task_ids[t]} has {n_abnormal[t]}; use a larger `swsa split-refs --share` or a smaller k")
    return a, am


def _eigh(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched symmetric eigendecomposition (B, S, S) → ascending eigenvalues (B, S), vectors (B, S, S), float64.

    torch's batched LAPACK call on one thread: for many small matrices, threads inside each
    decomposition only contend (7x slower on a busy 2-core machine)."""
    import torch

    if matrices.shape[-1] == 0:
        return np.zeros(matrices.shape[:-1]), np.zeros(matrices.shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lam, vec = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(matrices, dtype=np.float64)))
    finally:
        torch.set_num_threads(threads)
    return lam.numpy(), vec.numpy()


def _take_rows(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``x[t, index[t, w]]`` for x (T, S, ...) and index (T, W) → (T, W, ...)."""
    return x[np.arange(len(x))[:, None], index]


# --------------------------------------------------------------------------- Gaussian (Mahalanobis)


def _centred_gram(bank: np.ndarray, bank_mask: np.ndarray):
    """Per task: n (T,), mean (T, D), centred rows E (T, S, D) (padding 0), Gram G = E Eᵀ (T, S, S)."""
    weight = bank_mask.astype(np.float64)
    n = weight.sum(axis=1)
    mean = (weight[:, None, :] @ bank)[:, 0, :] / np.maximum(n, 1)[:, None]
    centred = (bank - mean[:, None, :]) * weight[..., None]
    return n, mean, centred, centred @ centred.transpose(0, 2, 1)


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
    inverted by Sherman–Morrison: no refit, no loop.
    """


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
        n, mean, centred, gram = _centred_gram(bank, bank_mask)
        diag = np.einsum("tss->ts", gram)
        alpha, beta, _ = ledoit_wolf_from_gram(diag.sum(1), (gram**2).sum((1, 2)), (diag**2).sum(1), n, bank.shape[2])
        dense = bank.shape[2] <= bank.shape[1]  # D <= S: eigendecomposition of the D × D scatter
        lam, basis = _eigh(centred.transpose(0, 2, 1) @ centred if dense else gram)
        return dict(n=n, mean=mean, centred=centred, gram=gram, diag=diag, alpha=alpha, beta=beta, lam=lam,
                    basis=basis, dense=dense)

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) squared Mahalanobis distances (module docstring); NaN where ~query_mask."""
        q, qm, b, bm, ex, task_ids = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids)
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
            e_coords = _take_rows(f["centred"] @ basis, j) * has[..., None]  # Qᵀe_j
            coords = coords + shift[..., None] * e_coords
            den = alpha[..., None] * lam[:, None, :] + beta[..., None]
            with np.errstate(divide="ignore", invalid="ignore"):
                q_dd = (coords**2 / den).sum(-1)
                q_ee = (e_coords**2 / den).sum(-1)
                q_ed = (e_coords * coords / den).sum(-1)
        else:
            dd = (d**2).sum(-1) + 2 * shift * v_j + shift**2 * g_jj
            w = (v + shift[..., None] * _take_rows(gram, j)) @ basis  # Uᵀ(E d')
            u_j = _take_rows(basis, j) * has[..., None]  # U[j, :]
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
    return MahalanobisDetector()


# --------------------------------------------------------------------------- few-shot residual (InCTRL)


@dataclass(frozen=True)
class ResidualDetector(Detector):
    """InCTRL's image-level residual without training: ``K`` normal references per task.

    References are the ``K`` usable bank rows with the smallest ``hash_uniform(seed, task_id,
    bank position)`` (:meth:`references`), so the draw is seeded, reproducible and recorded by
    the sweep. ``reduce="mean"``: squared L2 distance of the query to the references' mean;
    ``"min"``: to the nearest reference. A query whose excluded bank row is a reference is
    scored against the other ``K − 1`` references.

    ``text`` > 0 adds InCTRL's text prior, training-free: ``text ×`` CLIP's two-prompt anomaly
    probability of the image (the "paper" prompt set's ensemble, the store's CLIP model; see
    :class:`swsa_engine.run.detector_sweep.TextPrior`), in the units of the squared residual, so a
    weight near the typical residual of a normal image balances the two.  The sweep adds it;
    :meth:`score_tasks` is the image-level residual alone.
    """

    K: int = 4
    reduce: str = "mean"
    seed: int = 0
    text: float = 0.0

    def __post_init__(self):
        check_int_setting("residual", "K", self.K, 2, " (a reference scored leave-one-out keeps K-1)")
        if self.reduce not in ("mean", "min"):
            raise ValueError(f"residual reduce must be 'mean' or 'min', got {self.reduce!r}")
        if not (np.isfinite(self.text) and self.text >= 0):
            raise ValueError(f"residual text (the weight of the CLIP text prior) must be a finite number >= 0, got {self.text!r}")

    @property
    def label(self) -> str:
        settings = [f"K={self.K}", self.reduce] + ([f"seed={self.seed}"] if self.seed else []) + \
            ([f"text={self.text:g}"] if self.text else [])
        return f"residual({','.join(settings)})"

    @property
    def text_prior(self) -> float:
        """Weight of the CLIP two-prompt probability added to the score (0: none)."""
        return float(self.text)

    @property
    def family(self) -> str:
        return "residual"

    def min_bank(self, has_heldout: bool) -> int:
        return self.K

    @property
    def bank_hint(self) -> str:
        return "use a smaller K or a larger support set"

    def references(self, bank_mask, task_ids) -> np.ndarray:
        """(T, K) bank positions of each task's references, ascending; -1 where a task has fewer
        than K usable rows. ``bank_mask`` (T, S) bool, ``task_ids`` (T,)."""
        from swsa_store.references import hash_uniform

        bank_mask = np.asarray(bank_mask, dtype=bool)
        task_ids = np.asarray(task_ids, dtype=np.int64)
        if bank_mask.ndim != 2 or task_ids.shape != (len(bank_mask),):
            raise ValueError(f"references needs bank_mask (T, S) and task_ids (T,), got {bank_mask.shape} and {task_ids.shape}")
        keys = hash_uniform(self.seed, task_ids[:, None], np.arange(bank_mask.shape[1])[None, :])
        keys = np.where(bank_mask, keys, np.inf)
        chosen = np.argsort(keys, axis=1, kind="stable")[:, : self.K]
        chosen = np.where(np.take_along_axis(bank_mask, chosen, 1), chosen, bank_mask.shape[1])
        chosen = np.sort(chosen, axis=1)
        chosen = np.where(chosen < bank_mask.shape[1], chosen, -1)
        if chosen.shape[1] < self.K:
            chosen = np.concatenate([chosen, np.full((len(chosen), self.K - chosen.shape[1]), -1)], axis=1)
        return chosen

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) squared L2 residuals to the references (mean or nearest); NaN where ~query_mask."""
        q, qm, b, bm, ex, task_ids = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids)
        refs = self.references(bm, task_ids)
        valid = refs >= 0
        ref_rows = _take_rows(b, np.maximum(refs, 0)) * valid[..., None]  # (T, K, D)
        is_self = (ex[:, :, None] == refs[:, None, :]) & (ex[:, :, None] >= 0)  # (T, W, K)
        if self.reduce == "mean":
            total = ref_rows.sum(axis=1)[:, None, :] - is_self.astype(np.float64) @ ref_rows
            count = valid.sum(axis=1)[:, None] - is_self.sum(axis=2)
            with np.errstate(divide="ignore", invalid="ignore"):
                score = ((q - total / count[..., None]) ** 2).sum(-1)
        else:
            score = np.full(q.shape[:2], np.inf)
            for r in range(self.K):  # K <= a few: one (T, W, D) difference per reference
                dist = ((q - ref_rows[:, r : r + 1, :]) ** 2).sum(-1)
                score = np.minimum(score, np.where(valid[:, r : r + 1] & ~is_self[:, :, r], dist, np.inf))
        return np.where(qm, score, np.nan)

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) residuals of shared queries (Q, D); distances by matrix products."""
        q, b, bm, task_ids = check_shared(self, queries, bank, bank_mask, task_ids)
        refs = self.references(bm, task_ids)
        valid = refs >= 0
        ref_rows = _take_rows(b, np.maximum(refs, 0)) * valid[..., None]
        q2 = (q**2).sum(1)
        if self.reduce == "mean":
            centre = ref_rows.sum(1) / valid.sum(1, keepdims=True)
            return np.maximum(q2[None, :] - 2 * centre @ q.T + (centre**2).sum(1)[:, None], 0.0)
        dist = q2[None, None, :] - 2 * ref_rows @ q.T + (ref_rows**2).sum(-1)[..., None]  # (T, K, Q)
        return np.maximum(np.where(valid[..., None], dist, np.inf).min(axis=1), 0.0)


@register_detector("residual")
def residual(K: int = 4, reduce: str = "mean", seed: int = 0, text: float = 0.0) -> ResidualDetector:
    return ResidualDetector(_as_int(K, "residual K"), reduce, _as_int(seed, "residual seed"), _as_float(text, "residual text"))


def _as_int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _as_float(value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


# --------------------------------------------------------------------------- normal–abnormal guided (NAGL)


@dataclass(frozen=True)
class NaglDetector(NeighbourBank, Detector):
    """NAGL's normal–abnormal guided score without training: kNN score (sum of the ``k`` smallest
    squared L2 distances) to the normal bank minus ``beta`` × the same against the task's abnormal
    references (held-apart synthetic anomalies, :mod:`swsa_store.references`). ``metric="cosine"``
    L2-normalises features first, as for ``knn``."""

    k: int = 3
    beta: float = 1.0
    metric: str = "l2"
    needs_abnormal: ClassVar[bool] = True

    def __post_init__(self):
        check_int_setting("nagl", "k", self.k, 1)
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"nagl needs a finite beta >= 0, got {self.beta!r}")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"nagl metric must be 'l2' or 'cosine', got {self.metric!r}")

    @property
    def label(self) -> str:
        return f"nagl(k={self.k},beta={float(self.beta)!r}" + (",cosine)" if self.metric == "cosine" else ")")

    @property
    def family(self) -> str:
        return "nagl"

    @property
    def min_abnormal(self) -> int:
        return self.k

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) guided scores; ``abnormal`` (T, R, D) with ``abnormal_mask`` (T, R) required."""
        from swsa_engine.core.knn import knn_score_batched

        q, qm, b, bm, ex, task_ids, a, am = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids,
                                                        abnormal, abnormal_mask)
        normal = knn_score_batched(q, b, k=self.k, query_mask=qm, bank_mask=bm, exclude=ex)
        if self.beta == 0:
            return normal
        return normal - self.beta * knn_score_batched(q, a, k=self.k, query_mask=qm, bank_mask=am)

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) guided scores of shared queries (Q, D)."""
        q, b, bm, task_ids, a, am = check_shared(self, queries, bank, bank_mask, task_ids, abnormal, abnormal_mask)
        normal = _knn_shared(q, b, bm, self.k)
        return normal if self.beta == 0 else normal - self.beta * _knn_shared(q, a, am, self.k)


@register_detector("nagl")
def nagl(k: int = 3, beta: float = 1.0, metric: str = "l2") -> NaglDetector:
    return NaglDetector(_as_int(k, "nagl k"), _as_float(beta, "nagl beta"), metric)


# --------------------------------------------------------------------------- PCA reconstruction error


#: a gap between the top eigenvalues, or a weight of the left-out row on a top axis, below this
#: share of the largest eigenvalue sends a leave-one-out fit to the plain refit (deflation)
DEFLATION_TOL = 1e-11
#: most steps for one root of the secular equation (rational Newton converges in ~5-10; bisection
#: fallback needs ~10 on log x from 1e-300 of the gap, then 53 on x)
SECULAR_STEPS = 80


def _downdated_top_axes(lam, u_row, coords, rho, n: int, chunk_elements: int = 1 << 22):
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
    """:func:`_downdated_top_axes` for rows that do not deflate: (L, S) weights."""
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
    secular equation (:func:`_downdated_top_axes`, O(n · S) per bisection step); the rare fits
    where that equation deflates (tied top eigenvalues, a left-out row orthogonal to a top axis)
    are refitted by an eigendecomposition of their own Gram matrix.
    """

    n: int = 8
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
        projection of d on the top-n axes is Eᵀc. ``eig``: the Gram's ``_eigh`` when known."""
        lam, basis = eig if eig is not None else _eigh(gram)
        lam, basis = lam[:, -self.n :], basis[:, :, -self.n :]
        keep = lam > 1e-12 * np.maximum(lam[:, -1:], 0.0)
        inv = np.where(keep, 1.0 / np.where(keep, lam, 1.0), 0.0)
        return ((v @ basis) * inv[:, None, :]) @ basis.transpose(0, 2, 1)

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) squared reconstruction errors; NaN where ~query_mask."""
        q, qm, b, bm, ex, task_ids = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids)
        n, mean, centred, gram = _centred_gram(b, bm)
        d = q - mean[:, None, :]
        v = d @ centred.transpose(0, 2, 1)  # (T, W, S)
        eig = _eigh(gram)
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
            weights, ok = _downdated_top_axes(np.where(kept, lam, 0.0)[t_idx], basis[t_idx, j] * kept[t_idx], coords,
                                              n[t_idx] * inv, self.n)
            moved[t_idx, w_idx] = weights
            coef[t_idx, w_idx] = (moved @ basis.transpose(0, 2, 1))[t_idx, w_idx]
            shift[t_idx, w_idx] = inv
            self._refit(coef, t_idx[~ok], w_idx[~ok], ex, n, gram, v, bm)
        e_j = _take_rows(centred, np.maximum(ex, 0))  # (T, W, D)
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
        n, mean, centred, gram = _centred_gram(b, bm)
        sq = (q**2).sum(1)[None, :] - 2 * mean @ q.T + (mean**2).sum(1)[:, None]
        v = (centred @ q.T).transpose(0, 2, 1) - (centred @ mean[:, :, None])[..., 0][:, None, :]
        c = self._coefficients(gram, v)
        return np.maximum(sq - (c * v).sum(-1), 0.0)


@register_detector("pca")
def pca(n: int = 8) -> PcaDetector:
    return PcaDetector(_as_int(n, "pca n"))


import swsa_engine.core.patch as _patch  # noqa: E402,F401  registers "patch" (patch-level residual on patch tokens)
