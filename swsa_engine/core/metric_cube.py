"""The field's metrics beside AUROC for every candidate: AUPR, F1-max and FPR@95TPR cubes from a score cube.

:func:`metric_arrays` reduces a :class:`~swsa_engine.core.score_cube.ScoreCube` to the arrays of
the AUROC cube for each metric of :data:`~swsa_engine.core.metrics.DETECTION_METRICS`, over the very
image sets :func:`~swsa_engine.core.score_cube.score_aurocs` uses:

* ``real[..., 0]`` one-vs-rest: the task's normals against its anomalies in ``real_in_rest``;
* ``per_class[..., g]``: the normals against the anomalies of group ``g`` alone;
* ``real[..., 1]`` one-vs-closest: the worst ``per_class`` value — as the AUROC cube's minimum
  (its "closest" class is the one on which the candidate does worst): the minimum for AUPR and
  F1-max, the maximum for FPR@95TPR (lower is better);
* ``synthetic``: held-out normals (``synthetic_part == 0``) against each base source's anomalies,
  then against each source's ``N`` hardest anomalies (its ``N`` lowest scores) for ``N`` in
  ``hardest``, in the order of ``score_aurocs``' columns.

A NaN score leaves that image out; a cell with one class only is NaN.

:func:`metric_cube` makes an :class:`~swsa_engine.core.cube.AurocCube` whose ``real``, ``per_class``
and ``synthetic`` arrays hold one metric, **oriented so that higher is better** (:func:`oriented`:
FPR@95TPR becomes TNR@95TPR, the true-negative rate at 95 % TPR, ``1 − FPR@95TPR``; the one place
its sign is handled), so the selection strategies and Tables 1 and the strategies comparison run on it unchanged:
synthetic validation by that metric, real outcome by that metric. Cells the AUROC cube leaves out
(self-validation, skips) stay out. The ``recommended`` strategy's rule is a bootstrap test of
synthetic AUROCs (:mod:`swsa_engine.core.recommendation`); on a metric cube it runs as
:data:`RECOMMENDED_BY_AUROC`, which decides on the AUROCs recomputed from the cube's per-image scores,
so its pick is the one ``swsa export-detector --pick recommended`` exports, measured in the metric.

Pure arrays: no I/O.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from swsa_engine.core.cube import AurocCube, hard_source_name
from swsa_engine.core.metrics import (DETECTION_METRICS, UndefinedMetricWarning, detection_metrics,
                                      grouped_detection_metrics)
from swsa_engine.core.recommendation import RECOMMENDED
from swsa_engine.core.score_cube import ScoreCube, score_aurocs, synthetic_column_parts
from swsa_engine.core.selection import create_strategy, default_strategies, register_strategy

__all__ = ["METRICS", "MetricSpec", "DEFAULT_METRIC", "RECOMMENDED_BY_AUROC", "metric_arrays", "real_metrics",
           "synthetic_metrics", "two_part_metrics", "oriented", "metric_cube", "metric_strategies", "check_metric",
           "require_scores"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric of ``--metric``: ``label`` as the report prints it, ``key`` its name among
    :func:`metric_arrays`' outputs (None: AUROC, the cube itself), ``lower_is_better`` and the label
    of its higher-is-better form (:func:`oriented`)."""

    label: str
    key: str | None
    lower_is_better: bool = False
    oriented_label: str = ""

    @property
    def selection_label(self) -> str:
        """The label of the values a metric cube holds (higher is better)."""
        return self.oriented_label or self.label


#: ``--metric`` choices → their spec; the DETECTION_METRICS key of each
METRICS = {
    "auroc": MetricSpec("AUROC", None),
    "aupr": MetricSpec("AUPR", "aupr"),
    "f1max": MetricSpec("F1-max", "f1_max"),
    "fpr95": MetricSpec("FPR@95TPR", "fpr_at_95_tpr", lower_is_better=True, oriented_label="TNR@95TPR"),
}
DEFAULT_METRIC = "auroc"
#: the strategy that decides the recommendation on AUROCs whatever the context's metric
RECOMMENDED_BY_AUROC = "recommended_by_auroc"
#: the one-vs-rest metrics sort blocks of tasks of about this many scores (temporaries ~15 × 8 bytes each)
TASK_BLOCK_ENTRIES = 2 ** 22


def check_metric(metric: str) -> MetricSpec:
    """The spec of ``metric``; a one-line error naming the choices otherwise."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return METRICS[metric]


def oriented(values: np.ndarray, metric: str) -> np.ndarray:
    """``values`` of ``metric`` as higher-is-better: ``1 − FPR`` for FPR@95TPR, unchanged otherwise."""
    return 1.0 - values if check_metric(metric).lower_is_better else values


def _quiet_metrics(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`detection_metrics` without its undefined-row warning (those cells are NaN by design);
    all NaN when the rows are empty."""
    if scores.shape[-1] == 0:
        empty = np.full(np.broadcast_shapes(scores.shape, labels.shape, mask.shape)[:-1], np.nan)
        return {key: empty.copy() for key in ("aupr", "f1_max", "fpr_at_95_tpr")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return detection_metrics(np.where(mask, scores, 0.0), labels, mask)


def two_part_metrics(normal, normal_mask, anomaly, anomaly_mask) -> dict[str, np.ndarray]:
    """AUPR, F1-max and FPR@95TPR (...) of ``normal`` (..., A) against ``anomaly`` (..., B) scores over
    their masks (True = included); NaN where a row lacks a class. The metric twin of
    :func:`~swsa_engine.core.score_cube.two_part_auroc`."""
    scores = np.concatenate([normal, anomaly], axis=-1)
    labels = np.concatenate([np.zeros(np.shape(normal), bool), np.ones(np.shape(anomaly), bool)], axis=-1)
    mask = np.concatenate([normal_mask, anomaly_mask], axis=-1)
    return _quiet_metrics(scores, labels, mask)


def real_metrics(scores: ScoreCube, candidates: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Metric name → ``{"real": (T, C, 2), "per_class": (T, C, G)}`` on the real test images, the
    settings of :func:`~swsa_engine.core.score_cube.score_aurocs` (module docstring);
    ``candidates``: indices to compute (default all).

    One sort of each task × candidate's scores per setting: one-vs-rest by :func:`detection_metrics`
    a block of tasks at a time, every class from one sort by :func:`grouped_detection_metrics` (the
    same floats as one :func:`detection_metrics` per class)."""
    index = np.arange(len(scores.candidates)) if candidates is None else np.asarray(candidates)
    values = scores.real_scores[:, index]
    label = np.where(np.isfinite(values), scores.real_label[:, None, :], -1).astype(np.int8)
    rest = _rest_metrics(values, label, scores.real_in_rest)
    n_groups = scores.group_names.shape[1]
    per_group = grouped_detection_metrics(values, label, scores.real_group[:, None, :], n_groups)
    out = {}
    for key, spec in ((s.key, s) for s in METRICS.values() if s.key):
        per_class = per_group[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a candidate with no defined class: NaN
            worst = (np.nanmax if spec.lower_is_better else np.nanmin)(per_class, axis=2) if n_groups else np.nan
        out[key] = {"real": np.stack([rest[key], np.broadcast_to(worst, rest[key].shape)], axis=2), "per_class": per_class}
    return out


def _rest_metrics(values: np.ndarray, label: np.ndarray, in_rest: np.ndarray) -> dict[str, np.ndarray]:
    """(T, C) one-vs-rest metrics of ``values`` (T, C, Q) with ``label`` (T, C, Q) (-1 out) over
    ``in_rest`` (T, Q), :data:`TASK_BLOCK_ENTRIES` scores at a time (rows are independent)."""
    n_tasks, n_candidates, width = values.shape
    out = {key: np.full((n_tasks, n_candidates), np.nan) for key in DETECTION_METRICS}
    step = max(1, TASK_BLOCK_ENTRIES // max(1, n_candidates * width))
    for start in range(0, n_tasks, step):
        block = slice(start, start + step)
        mask = (label[block] >= 0) & in_rest[block, None, :]
        for key, value in _quiet_metrics(values[block], label[block] == 1, mask).items():
            out[key][block] = value
    return out


def synthetic_metrics(scores: ScoreCube, hardest: tuple[int, ...] = (10, 5),
                      candidates: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Metric name → (T, C, V × (1 + len(hardest))) synthetic values (each base source, then each
    source's ``N`` hardest anomalies for ``N`` in ``hardest``), and the column names
    (:func:`~swsa_engine.core.cube.hard_source_name`), as :func:`score_aurocs`."""
    index = np.arange(len(scores.candidates)) if candidates is None else np.asarray(candidates)
    synth = scores.synthetic_scores[:, index]
    every = [two_part_metrics(*parts) for parts in synthetic_column_parts(synth, scores.synthetic_part,
                                                                          len(scores.sources), hardest)]
    n_columns = len(scores.sources) * (1 + len(hardest))
    keys = [s.key for s in METRICS.values() if s.key]
    out = {key: np.stack([c[key] for c in every], axis=2) if every else np.full(synth.shape[:2] + (n_columns,), np.nan)
           for key in keys}
    return out, list(scores.sources) + [hard_source_name(s, n) for s in scores.sources for n in hardest]


def metric_arrays(scores: ScoreCube, hardest: tuple[int, ...] = (10, 5), candidates: np.ndarray | None = None) -> dict:
    """Every metric of every candidate from its scores: metric name (``aupr``, ``f1_max``,
    ``fpr_at_95_tpr``) → ``{"real": (T, C, 2), "per_class": (T, C, G), "synthetic": (T, C, V × (1 +
    len(hardest)))}`` (raw values: FPR lower is better), and ``sources`` the synthetic columns' names."""
    real = real_metrics(scores, candidates)
    synthetic, names = synthetic_metrics(scores, hardest, candidates)
    return {**{key: {**real[key], "synthetic": synthetic[key]} for key in real}, "sources": names}


def require_scores(cube: AurocCube, metric: str) -> ScoreCube | None:
    """``cube.scores`` when ``metric`` needs them (every metric but AUROC), else None; a one-line error
    when they are missing or belong to other tasks or candidates."""
    if check_metric(metric).key is None:
        return None
    scores = cube.scores
    if scores is None:
        raise ValueError(f"--metric {metric} needs the per-image scores of the cube, which it does not hold; re-run "
                         "`swsa score` (it keeps them by default), or use --metric auroc")
    if list(scores.candidates) != cube.candidate_names or not np.array_equal(scores.task_ids, cube.tasks["task_id"]):
        raise ValueError(f"--metric {metric}: the per-image scores list other tasks or candidates than the cube; "
                         "re-run `swsa score`")
    return scores


def metric_cube(cube: AurocCube, metric: str) -> AurocCube:
    """``cube`` with its ``real``, ``per_class`` and ``synthetic`` arrays replaced by ``metric``
    oriented higher-is-better (:func:`oriented`), NaN where ``cube``'s are; ``config["metric"]`` says
    which. ``"auroc"`` returns ``cube`` itself. Needs ``cube.scores`` (the per-image scores)."""
    spec = check_metric(metric)
    if spec.key is None:
        return cube
    scores = require_scores(cube, metric)
    hardest = tuple(int(n) for n in cube.config.get("hardest", (10, 5)))
    arrays = metric_arrays(scores, hardest)
    names = arrays["sources"]
    missing = [s for s in cube.sources if s not in names]
    if missing:
        raise ValueError(f"--metric {metric}: the cube's synthetic sources {missing} cannot be computed from the "
                         f"per-image scores (sources {list(scores.sources)}, hardest {list(hardest)}); re-run `swsa score`")
    values = arrays[spec.key]
    synthetic = values["synthetic"][:, :, [names.index(s) for s in cube.sources]]
    keep = lambda new, old: np.where(np.isnan(old), np.nan, oriented(new, metric))  # noqa: E731
    return dataclasses.replace(
        cube, real=keep(values["real"], cube.real), per_class=keep(values["per_class"], cube.per_class),
        synthetic=keep(synthetic, cube.synthetic), config={**cube.config, "metric": metric},
        self_validated=cube.self_validated.copy(), scores=scores)


def metric_strategies(cube: AurocCube, metric: str) -> list[tuple[str, str, dict]]:
    """:func:`~swsa_engine.core.selection.default_strategies` of ``cube`` for a selection by ``metric``:
    the same rows, the recommendation's as :data:`RECOMMENDED_BY_AUROC` when ``metric`` is not AUROC."""
    rows = default_strategies(cube)
    if check_metric(metric).key is None:
        return rows
    return [(label, RECOMMENDED_BY_AUROC, settings) if name == RECOMMENDED else (label, name, settings)
            for label, name, settings in rows]


@register_strategy(RECOMMENDED_BY_AUROC)
def recommended_by_auroc(**settings):
    """The ``recommended`` strategy decided on synthetic AUROCs recomputed from ``ctx.scores`` (its
    bootstrap rule is defined on AUROCs), for a context whose synthetic arrays hold another metric
    (:func:`metric_cube`); cells NaN in the context stay out. Without scores: ``recommended`` itself
    (its fallback, which needs no AUROC)."""
    recommended = create_strategy(RECOMMENDED, **settings)

    def pick(ctx):
        if ctx.scores is None:
            return recommended(ctx)
        aurocs = score_aurocs(ctx.scores, hardest=())["synthetic"]  # (T, C, V): the base sources
        order = [list(ctx.scores.sources).index(s) for s in ctx.base_sources if s in ctx.scores.sources]
        if len(order) != len(ctx.base_sources):
            raise ValueError(f"{RECOMMENDED_BY_AUROC}: the per-image scores' sources {list(ctx.scores.sources)} lack "
                             f"some of the cube's base sources {list(ctx.base_sources)}; re-run `swsa score`")
        base = ctx.synthetic_base
        auroc_ctx = dataclasses.replace(ctx, synthetic=np.where(np.isnan(base), np.nan, aurocs[:, :, order]),
                                        sources=tuple(ctx.base_sources))
        return recommended(auroc_ctx)

    return pick
