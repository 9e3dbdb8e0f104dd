"""The detector protocol, the detector registry, readable labels and the shared input checks.

A detector turns a task's support features (its bank) into anomaly scores of query features.
Every detector subclasses :class:`Detector`, which declares what it needs (class attributes,
read by the sweep as plain attributes, never probed) and what it returns. Register a factory
with ``@register_detector("name")``; ``create_detector("name", **settings)`` builds it and
``parse_detector("knn(k=5,metric=cosine)")`` builds it from its readable label (the families
register when :mod:`swsa_engine.core.detectors` is imported).
"""

from __future__ import annotations

import abc
import re
from typing import ClassVar

import numpy as np

from swsa_store.registry import Registry

from swsa_engine.core.knn.checks import distinct_exclusions, exclusion_array
from swsa_engine.core.validation import as_bool_mask, as_real_array, zero_unusable_rows

__all__ = [
    "DETECTORS", "Detector", "register_detector", "create_detector", "list_detectors", "parse_detector",
    "check_int_setting", "int_setting", "float_setting", "check_batch", "check_shared",
]

DETECTORS: Registry = Registry("detector")


def register_detector(name: str):
    """Decorator registering a detector factory ``factory(**settings) -> detector``."""
    return DETECTORS.register(name)


def create_detector(name: str, /, **settings):
    """Build the registered detector ``name`` with ``settings``."""
    return DETECTORS.create(name, **settings)


def list_detectors() -> list[str]:
    """Names of the registered detectors, sorted."""
    return DETECTORS.names()


class Detector(abc.ABC):
    """What every detector declares and returns; the sweep reads these attributes directly.

    Capabilities (class attributes):

    * ``needs``: what :meth:`score_tasks` compares — ``"features"``: rows of a feature source,
      queries (T, W, D), after :meth:`prepare`; ``"patches"``: patch tokens (T, W, P, D)
      (:func:`swsa_engine.run.patch_features.load_patch_features`).
    * ``needs_abnormal``: the scores also take the task's abnormal references ``abnormal``
      (T, R, D) with ``abnormal_mask`` (T, R), at least :attr:`min_abnormal` per task.
    * ``supports_shared``: :meth:`score_shared` scores one set of queries shared by every task.
    * ``draws_references``: the detector draws references from each bank (:meth:`references`,
      :attr:`reference_rule`, ``seed``); the sweep records the draw.
    * ``max_exclusions``: how many bank rows one query may leave out (None = any number; 1 for a
      detector whose fit is downdated for one left-out row).  :func:`check_batch` refuses more.

    Everything is float64; ``exclude[t, w]`` (T, W) is the bank row left out for query ``w``
    (leave-one-out: a fitted detector is refitted without it), or -1; ``exclude[t, w, :]``
    (T, W, E) the rows a query leaves out (its *origins*: a held-out normal itself, a synthetic
    anomaly the images it was made from), -1 padded.
    """

    needs: ClassVar[str] = "features"
    needs_abnormal: ClassVar[bool] = False
    supports_shared: ClassVar[bool] = True
    draws_references: ClassVar[bool] = False
    #: the seed of the reference draw (detectors with ``draws_references``; 0 for the others)
    seed: ClassVar[int] = 0
    #: the most distinct bank rows one query may leave out (None: any number)
    max_exclusions: ClassVar[int | None] = 1

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """The readable label, e.g. ``knn(k=5,cosine)``: :func:`parse_detector` rebuilds the detector from it."""

    @property
    @abc.abstractmethod
    def family(self) -> str:
        """The detector family ("knn", "gaussian", "residual", "nagl", "pca", "patch", ...)."""

    @abc.abstractmethod
    def min_bank(self, has_heldout: bool) -> int:
        """Usable bank rows a task needs to be scored (``has_heldout``: with leave-one-out queries;
        detectors whose :attr:`max_exclusions` exceeds 1 also take an int, the most rows a query leaves out)."""

    @property
    def min_abnormal(self) -> int:
        """Usable abnormal references a task needs (detectors with ``needs_abnormal``)."""
        return 0

    @property
    def bank_hint(self) -> str:
        """How to fix a bank smaller than :meth:`min_bank`, for error messages and skips."""
        return "use a larger support set or other settings"

    @property
    def text_prior(self) -> float:
        """Weight of CLIP's two-prompt anomaly probability that the sweep adds to every score (0: none)."""
        return 0.0

    @property
    def reference_rule(self) -> str:
        """How :meth:`references` draws, in words, for the sweep's record ("" when it draws none)."""
        return ""

    def references(self, bank_mask: np.ndarray, task_ids: np.ndarray) -> np.ndarray:
        """(T, K) int64 bank positions each task's references are drawn from (-1 where none), for
        ``bank_mask`` (T, S) bool and ``task_ids`` (T,); only detectors with ``draws_references``."""
        raise NotImplementedError(f"{self.label} draws no references")

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features (or (N, P, D) patch tokens) as the detector compares them; the identity here."""
        return features

    @abc.abstractmethod
    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """Scores of per-task queries: (T, W) float64, NaN where ``~query_mask``.

        queries (T, W, D) (patch detectors: (T, W, P, D)), query_mask (T, W) bool, bank (T, S, D)
        (or (T, S, P, D)), bank_mask (T, S) bool, exclude (T, W) int (bank row or -1) or (T, W, E)
        (up to :attr:`max_exclusions` distinct rows per query, -1 padded),
        task_ids (T,); abnormal (T, R, D) and abnormal_mask (T, R) for ``needs_abnormal``.
        """

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) float64 scores of queries (Q, D) shared by every task against each bank (T, S, D)
        with bank_mask (T, S); only detectors with ``supports_shared``."""
        raise NotImplementedError(f"{self.label} scores per-task queries only (score_tasks)")


def check_int_setting(detector: str, name: str, value, minimum: int, why: str = "") -> None:
    """One-line ValueError unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{detector} needs an integer {name} >= {minimum}{why}, got {value!r}")


def int_setting(value, what: str) -> int:
    """``value`` (a setting read from a label or given by a caller) as an int, else a one-line ValueError."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def float_setting(value, what: str) -> float:
    """``value`` as a float, else a one-line ValueError naming ``what``."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


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


# --------------------------------------------------------------------------- input checks


def _as_features(x, name: str, ndim: int, doc: str) -> np.ndarray:
    return as_real_array(x, name, ndim=ndim, shape_doc=doc).astype(np.float64, copy=False)


def _task_ids(task_ids, n_tasks: int) -> np.ndarray:
    ids = np.arange(n_tasks, dtype=np.int64) if task_ids is None else np.asarray(task_ids, dtype=np.int64)
    if ids.shape != (n_tasks,):
        raise ValueError(f"task_ids must have shape ({n_tasks},), got {ids.shape}")
    return ids


def check_batch(detector: Detector, queries, query_mask, bank, bank_mask, exclude, task_ids, abnormal=None,
                abnormal_mask=None):
    """Validate the inputs of ``score_tasks``; returns float64 arrays (padding zeroed), bool masks,
    ``exclude`` ((T, W) or (T, W, E) in) as (T, W, E') int64 — each query's distinct real bank rows
    first, then -1 (masked queries, padding rows and repeats are -1; E' >= 1) — and ``task_ids``
    (T,), then (abnormal, abnormal mask) when the detector needs them. Raises a one-line ValueError
    on bad shapes, non-boolean masks, non-finite real rows, a query leaving out more rows than
    ``detector.max_exclusions``, or a bank smaller than ``detector.min_bank``."""
    q = _as_features(queries, "queries", 3, "(T, W, D)")
    n_tasks, width, dim = q.shape
    b = _as_features(bank, "bank", 3, f"(T, S, D) = ({n_tasks}, S, {dim})")
    if b.shape[0] != n_tasks or b.shape[2] != dim:
        raise ValueError(f"bank must have shape (T, S, D) = ({n_tasks}, S, {dim}) to match queries {q.shape}, got {b.shape}")
    qm = as_bool_mask(query_mask, "query_mask", (n_tasks, width), "(T, W)")
    bm = as_bool_mask(bank_mask, "bank_mask", (n_tasks, b.shape[1]), "(T, S)")
    ids = _task_ids(task_ids, n_tasks)
    if exclude is None:
        ex = np.full((n_tasks, width, 1), -1, dtype=np.int64)
    else:
        ex = distinct_exclusions(exclusion_array(exclude, (n_tasks, width), b.shape[1], "a bank row", "(T, W)"), qm, bm)
        _check_exclusion_count(detector, ex, ids)
    q = zero_unusable_rows(q, qm, "queries")
    b = zero_unusable_rows(b, bm, "bank")
    _check_bank(detector, bm, qm.any(axis=1), (ex >= 0).sum(axis=2).max(axis=1, initial=0), ids)
    out = (q, qm, b, bm, ex, ids)
    if detector.needs_abnormal:
        out += _check_abnormal(detector, abnormal, abnormal_mask, qm.any(axis=1), ids, n_tasks, dim)
    return out


def check_shared(detector: Detector, queries, bank, bank_mask, task_ids, abnormal=None, abnormal_mask=None):
    """Validate the inputs of ``score_shared``: queries (Q, D), bank (T, S, D), bank_mask (T, S) bool;
    returns (queries, bank, bank_mask, task_ids) as :func:`check_batch` does (then abnormal, abnormal mask)."""
    q = _as_features(queries, "queries", 2, "(Q, D)")
    b = _as_features(bank, "bank", 3, f"(T, S, {q.shape[1]})")
    if b.shape[2] != q.shape[1]:
        raise ValueError(f"bank rows have D={b.shape[2]} but queries have D={q.shape[1]}; both must come from one feature source")
    bm = as_bool_mask(bank_mask, "bank_mask", b.shape[:2], "(T, S)")
    ids = _task_ids(task_ids, len(b))
    q = zero_unusable_rows(q, np.ones(len(q), bool), "queries")
    b = zero_unusable_rows(b, bm, "bank")
    active = np.full(len(b), len(q) > 0)
    _check_bank(detector, bm, active, np.zeros(len(b), dtype=np.int64), ids)
    out = (q, b, bm, ids)
    if detector.needs_abnormal:
        out += _check_abnormal(detector, abnormal, abnormal_mask, active, ids, len(b), q.shape[1])
    return out


def _check_exclusion_count(detector: Detector, ex: np.ndarray, task_ids: np.ndarray) -> None:
    """Raise unless no query of ``ex`` (T, W, E) (:func:`distinct_exclusions`) leaves out more
    distinct bank rows than ``detector.max_exclusions``."""
    limit = detector.max_exclusions
    if limit is None or ex.shape[2] <= limit:
        return
    count = (ex >= 0).sum(axis=2)
    over = count > limit
    if over.any():
        t, w = (int(i) for i in np.argwhere(over)[0])
        raise ValueError(
            f"{detector.label} leaves out at most {limit} bank row(s) per query, but query {w} of task {task_ids[t]} "
            f"excludes {count[t, w]} distinct bank rows ({int(over.sum())} such queries); use the protocol \"paper\" "
            f"or another detector (knn, nagl and patch leave out any number)")


def _check_bank(detector: Detector, bank_mask: np.ndarray, active: np.ndarray, n_excluded: np.ndarray,
                task_ids: np.ndarray) -> None:
    """Raise unless every ``active`` task has ``detector.min_bank`` usable rows, given the most
    bank rows ``n_excluded`` (T,) one of its queries leaves out."""
    n_bank = bank_mask.sum(axis=1)
    # 0 and 1 as False / True (the plain leave-one-out call), more as the count
    counts, which = np.unique(n_excluded, return_inverse=True)
    need = np.array([detector.min_bank(int(c) if c > 1 else bool(c)) for c in counts], dtype=np.int64)[which]
    bad = np.flatnonzero(active & (n_bank < need))
    if bad.size:
        t = bad[0]
        raise ValueError(f"{detector.label} needs at least {need[t]} usable bank rows per task, task {task_ids[t]} has "
                         f"{n_bank[t]} ({bad.size} task(s) too small); {detector.bank_hint}")


def _check_abnormal(detector: Detector, abnormal, abnormal_mask, active, task_ids, n_tasks: int, dim: int):
    if abnormal is None:
        raise ValueError(f"{detector.label} needs abnormal references (abnormal=(T, R, D)); hold some synthetic "
                         "anomalies apart with `swsa split-refs --store STORE --source SOURCE --share 0.25`")
    a = _as_features(abnormal, "abnormal", 3, f"({n_tasks}, R, {dim})")
    if a.shape[0] != n_tasks or a.shape[2] != dim:
        raise ValueError(f"abnormal must have shape ({n_tasks}, R, {dim}), got {a.shape}")
    am = as_bool_mask(abnormal_mask, "abnormal_mask", a.shape[:2], "(T, R)")
    a = zero_unusable_rows(a, am, "abnormal")
    n_abnormal = am.sum(axis=1)
    bad = np.flatnonzero(active & (n_abnormal < detector.min_abnormal))
    if bad.size:
        t = bad[0]
        raise ValueError(f"{detector.label} needs at least {detector.min_abnormal} abnormal references per task, task "
                         f"{task_ids[t]} has {n_abnormal[t]}; use a larger `swsa split-refs --share` or a smaller k")
    return a, am
