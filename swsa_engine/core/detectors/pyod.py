"""PyOD detectors over any stored embedding: ``pyod(model=iforest,n_estimators=100,max_features=1.0,seed=0)``.

PyOD (Zhao et al., JMLR 2019) is the field's library of outlier detectors over feature vectors.
Each ``pyod(model=NAME, setting=value, ...)`` candidate fits PyOD's ``NAME`` on a task's usable
bank rows and scores queries with its ``decision_function`` (higher = more anomalous, as PyOD's).
Models and their settings (defaults in brackets; the label always lists every setting):

* ``iforest`` (IForest): ``n_estimators`` [100], ``max_features`` [1.0], ``seed`` [0] (its random_state).
* ``lof`` (LOF, novelty mode): ``n_neighbors`` [5]; needs more bank rows than ``n_neighbors``.
* ``ocsvm`` (OCSVM): ``kernel`` [rbf] (linear, poly, rbf, sigmoid), ``nu`` [0.5], ``gamma`` [auto] (auto, scale or a number).
* ``ecod``, ``copod``: no settings.
* ``pca`` (PCA, standardised): ``n_components`` [0.95]: an integer, or a fraction of the variance to
  keep (scikit-learn's rule); exact SVD (``svd_solver="full"``). PyOD's default keeps every axis and
  divides by the last one's near-zero variance ratio, so its scores are rounding noise on a bank of
  fewer images than dimensions: hence the fraction.
* ``knn`` (KNN): ``n_neighbors`` [5], ``method`` [largest] (largest, mean, median).
* ``loda`` (LODA): ``n_bins`` [10], ``n_random_cuts`` [100], ``seed`` [0].

``n_neighbors`` defaults to 5 (PyOD's KNN default; LOF's 20 would exceed most few-shot support
sets). Randomised models take a fixed ``seed``, so scores are deterministic.

Leak-free protocol: a query that leaves out bank rows (a held-out normal itself, a synthetic
anomaly its parents) is scored by a model fitted on the bank minus those rows; queries are grouped
by their distinct exclusion set per task and each set is fitted once (``max_exclusions = None``).
ECOD and COPOD are transductive in PyOD (``decision_function`` recomputes the empirical CDFs on the
training rows *and the whole batch*), so they score one query at a time: a query's score never
depends on the other queries. PyOD is an optional extra (``pip install 'swsa[pyod]'``), imported
only when a model is fitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from swsa_engine.core.detectors.base import (Detector, check_batch, check_shared, float_setting, int_setting,
                                             register_detector)

__all__ = ["PyodDetector", "PyodModel", "PYOD_MODELS", "PYOD_EXTRA", "pyod_estimator", "pyod_scores"]

PYOD_EXTRA = "pip install 'swsa[pyod]'"


# --------------------------------------------------------------------------- setting readers


def _int_at_least(minimum: int) -> Callable:
    def read(value, what: str) -> int:
        number = int_setting(value, what)
        if number < minimum:
            raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
        return number
    return read


def _fraction(value, what: str) -> float:
    """A float in (0, 1]."""
    number = float_setting(value, what)
    if not 0.0 < number <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")
    return number


def _choice(*options: str) -> Callable:
    def read(value, what: str) -> str:
        if str(value) not in options:
            raise ValueError(f"{what} must be one of {', '.join(options)}, got {value!r}")
        return str(value)
    return read


def _gamma(value, what: str):
    """``auto``, ``scale`` or a positive number (scikit-learn's SVM gamma)."""
    if str(value) in ("auto", "scale"):
        return str(value)
    number = float_setting(value, f"{what} (auto, scale or a number)")
    if not (np.isfinite(number) and number > 0):
        raise ValueError(f"{what} must be auto, scale or a positive number, got {value!r}")
    return number


def _components(value, what: str):
    """A number of principal axes (integer >= 1) or a fraction of the variance in (0, 1)."""
    text = str(value).strip()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) or text.lstrip("-").isdigit():
        return _int_at_least(1)(int(text), what)
    number = float_setting(value, f"{what} (an integer or a fraction)")
    if not 0.0 < number < 1.0:
        raise ValueError(f"{what} must be an integer >= 1 or a fraction of the variance in (0, 1), got {value!r}")
    return number


# --------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class PyodModel:
    """One PyOD model: its class, its settings (name → (default, reader)), the PyOD keyword each
    setting feeds (``seed`` → ``random_state``), fixed keywords, and the bank rows it needs."""

    cls: str
    settings: dict = field(default_factory=dict)
    rename: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    neighbours: str = ""  # the setting that needs more bank rows than its value ("" = none)
    transductive: bool = False  # decision_function depends on the whole batch: one query at a time


_SEED = (0, _int_at_least(0))
_NEIGHBOURS = (5, _int_at_least(1))

PYOD_MODELS: dict[str, PyodModel] = {
    "iforest": PyodModel("IForest", {"n_estimators": (100, _int_at_least(1)), "max_features": (1.0, _fraction),
                                     "seed": _SEED}, {"seed": "random_state"}, {"n_jobs": 1}),
    "lof": PyodModel("LOF", {"n_neighbors": _NEIGHBOURS}, fixed={"n_jobs": 1}, neighbours="n_neighbors"),
    "ocsvm": PyodModel("OCSVM", {"kernel": ("rbf", _choice("linear", "poly", "rbf", "sigmoid")), "nu": (0.5, _fraction),
                                 "gamma": ("auto", _gamma)}),
    "ecod": PyodModel("ECOD", fixed={"n_jobs": 1}, transductive=True),
    "copod": PyodModel("COPOD", fixed={"n_jobs": 1}, transductive=True),
    "pca": PyodModel("PCA", {"n_components": (0.95, _components)}, fixed={"svd_solver": "full"}),
    "knn": PyodModel("KNN", {"n_neighbors": _NEIGHBOURS, "method": ("largest", _choice("largest", "mean", "median"))},
                     fixed={"n_jobs": 1}, neighbours="n_neighbors"),
    "loda": PyodModel("LODA", {"n_bins": (10, _int_at_least(1)), "n_random_cuts": (100, _int_at_least(1)),
                               "seed": _SEED}, {"seed": "random_state"}),
}


def _pyod_class(name: str):
    """PyOD's class ``name``, imported here: PyOD is an optional extra."""
    try:
        from pyod.models import copod, ecod, iforest, knn, loda, lof, ocsvm, pca
    except ImportError as error:
        raise ImportError(f"PyOD detectors need the optional extra PyOD ({PYOD_EXTRA}): {error}") from None
    return {"IForest": iforest.IForest, "LOF": lof.LOF, "OCSVM": ocsvm.OCSVM, "ECOD": ecod.ECOD, "COPOD": copod.COPOD,
            "PCA": pca.PCA, "KNN": knn.KNN, "LODA": loda.LODA}[name]


def pyod_estimator(model: str, settings: dict):
    """A fresh, unfitted PyOD estimator of ``model`` (a key of :data:`PYOD_MODELS`) with ``settings``
    (read by the model's readers: what :class:`PyodDetector` holds) — what a user would build by hand."""
    spec = PYOD_MODELS[model]
    kwargs = {spec.rename.get(name, name): value for name, value in settings.items()}
    return _pyod_class(spec.cls)(**kwargs, **spec.fixed)


def pyod_scores(model: str, settings: dict, bank_rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(Q,) float64 PyOD ``decision_function`` of ``queries`` (Q, D) by ``model`` fitted on
    ``bank_rows`` (n, D); transductive models (ECOD, COPOD) score one query at a time."""
    estimator = pyod_estimator(model, settings).fit(bank_rows)
    if len(queries) == 0:
        return np.zeros(0)
    if PYOD_MODELS[model].transductive:
        return np.array([float(estimator.decision_function(queries[i: i + 1])[0]) for i in range(len(queries))])
    return np.asarray(estimator.decision_function(queries), dtype=np.float64).reshape(len(queries))


# --------------------------------------------------------------------------- the detector


def _exclusion_groups(exclude: np.ndarray, query_mask: np.ndarray, n_bank: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct exclusion sets of one task's queries: ``(keys (G, E), group (W,))`` with each
    key the sorted left-out bank rows (``n_bank`` pads), ``group[w]`` the set of query ``w`` (-1
    where ``~query_mask``)."""
    rows = np.sort(np.where(exclude >= 0, exclude, n_bank), axis=1)
    group = np.full(len(query_mask), -1, dtype=np.int64)
    if not query_mask.any():
        return rows[:0], group
    keys, inverse = np.unique(rows[query_mask], axis=0, return_inverse=True)
    group[query_mask] = np.asarray(inverse).reshape(-1)
    return keys, group


@dataclass(frozen=True)
class PyodDetector(Detector):
    """A PyOD model fitted on each task's bank (module docstring). ``model`` a key of
    :data:`PYOD_MODELS`; ``settings`` ((name, value), ...) every setting of the model, in its order."""

    model: str
    settings: tuple = ()
    max_exclusions: ClassVar[int | None] = None

    @property
    def spec(self) -> PyodModel:
        return PYOD_MODELS[self.model]

    @property
    def label(self) -> str:
        shown = "".join(f",{name}={float(v)!r}" if isinstance(v, float) else f",{name}={v}" for name, v in self.settings)
        return f"pyod(model={self.model}{shown})"

    @property
    def family(self) -> str:
        return "pyod"

    def min_bank(self, has_heldout: bool | int) -> int:
        """Bank rows needed: more than ``n_neighbors`` for LOF / KNN, more than an integer
        ``n_components`` for PCA, else 2; plus the most rows a query leaves out."""
        values = dict(self.settings)
        base = 2
        if self.spec.neighbours:
            base = values[self.spec.neighbours] + 1
        elif isinstance(values.get("n_components"), int):
            base = values["n_components"] + 1
        return max(base, 2) + int(has_heldout)

    @property
    def bank_hint(self) -> str:
        if self.spec.neighbours:
            return f"{self.model.upper()} needs more bank rows than n_neighbors; use a smaller n_neighbors or a larger support set"
        if self.model == "pca":
            return "PCA needs more bank rows than n_components; use a smaller n_components or a fraction such as 0.95"
        return "use a larger support set"

    def _check_dim(self, dim: int) -> None:
        components = dict(self.settings).get("n_components")
        if isinstance(components, int) and components > dim:
            raise ValueError(f"{self.label} keeps {components} principal axes but the features have {dim} dimensions; "
                             f"use n_components <= {dim} or a fraction such as 0.95")

    def _scores(self, bank_rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
        return pyod_scores(self.model, dict(self.settings), bank_rows, queries)

    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids, abnormal=None,
                    abnormal_mask=None) -> np.ndarray:
        """(T, W) PyOD scores of per-task queries (T, W, D), each by a model fitted on its task's
        usable bank (T, S, D) minus its excluded rows; one fit per distinct exclusion set; NaN where ~query_mask."""
        q, qm, b, bm, ex, task_ids = check_batch(self, queries, query_mask, bank, bank_mask, exclude, task_ids)
        self._check_dim(q.shape[2])
        scores = np.full(qm.shape, np.nan)
        n_bank = b.shape[1]
        for t in np.flatnonzero(qm.any(axis=1)):
            keys, group = _exclusion_groups(ex[t], qm[t], n_bank)
            for g, key in enumerate(keys):
                keep = bm[t].copy()
                keep[key[key < n_bank]] = False
                members = np.flatnonzero(group == g)
                scores[t, members] = self._scores(b[t, keep], q[t, members])
        return scores

    def score_shared(self, queries, bank, bank_mask, *, task_ids=None, abnormal=None, abnormal_mask=None) -> np.ndarray:
        """(T, Q) PyOD scores of queries (Q, D) shared by every task, one fit per task's bank."""
        q, b, bm, task_ids = check_shared(self, queries, bank, bank_mask, task_ids)
        self._check_dim(q.shape[1])
        scores = np.full((len(b), len(q)), np.nan)
        if len(q):
            for t in range(len(b)):
                scores[t] = self._scores(b[t, bm[t]], q)
        return scores


@register_detector("pyod")
def pyod(model: str | None = None, **settings) -> PyodDetector:
    """``pyod(model=NAME, setting=value, ...)``: PyOD's model NAME (:data:`PYOD_MODELS`) fitted on each task's bank."""
    names = ", ".join(PYOD_MODELS)
    if model is None:
        raise ValueError(f"pyod needs a model: pyod(model=NAME, ...) with NAME one of {names}")
    key = str(model).strip().lower()
    if key not in PYOD_MODELS:
        raise ValueError(f"unknown PyOD model {model!r}; valid models: {names}")
    spec = PYOD_MODELS[key]
    unknown = sorted(set(settings) - set(spec.settings))
    if unknown:
        takes = ", ".join(spec.settings) or "no settings"
        raise ValueError(f"pyod model {key} does not take {', '.join(unknown)}; it takes {takes}")
    values = tuple((name, read(settings.get(name, default), f"pyod {key} {name}"))
                   for name, (default, read) in spec.settings.items())
    return PyodDetector(key, values)
