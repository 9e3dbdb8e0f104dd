"""The sweep: every task × candidate × validation source AUROC, computed with batched arrays.

For each candidate backbone (streamed one at a time) and each dataset's tasks at once:

* real validation: kNN scores of the shared real validation images against every task's
  bank (:func:`swsa_engine.core.knn.knn_score_gathered`), AUROC one-vs-rest (all out-classes
  together, or the task's ``rest_groups`` only: :func:`~swsa_engine.run.task_groups.rest_mask`) and per out-class (:func:`grouped_auroc`), whose minimum is one-vs-closest;
* synthetic validation per source: held-out normals (scored leave-one-out) against the
  source's anomalies (:func:`swsa_engine.core.knn.knn_score_batched`), AUROC over all anomalies and
  over the ``N`` hardest (the ``N`` with the lowest anomaly score, per candidate).

The result is an :class:`AurocCube`, saved in the store's ``/results/cube``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from swsa_store.references import REFERENCES_TABLE, read_references

from swsa_engine.core.detectors import KnnDetector, candidate_name, parse_detector
from swsa_engine.core.knn import bounded_knn_shared, bounded_knn_tasks, centre_rows, exact_knn_candidates, knn_score_batched
from swsa_engine.run.task_groups import TaskGroup, build_task_groups, rest_mask
from swsa_engine.core.metrics import UndefinedMetricWarning, auroc

log = logging.getLogger(__name__)

SETTINGS = ("one-vs-rest", "one-vs-closest")
CUBE_RESULT = "cube"


def hard_source_name(source: str, n: int) -> str:
    """Name of the validation source that keeps the ``n`` hardest anomalies of ``source``."""
    return f"{source}@hard{n}"


def grouped_auroc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """AUROC of the normals against each group of anomalies separately, all rows at once.

    Parameters
    ----------
    scores : (T, Q) float, higher = more anomalous; NaN where ``labels == -1``.
    labels : (T, Q) int8: -1 excluded, 0 normal, 1 anomaly.
    groups : (T, Q) int in ``[0, n_groups)`` for anomalies, ignored elsewhere.

    Returns
    -------
    (T, n_groups) float64: AUROC of normals vs the anomalies of group g (ties count one half,
    as in ``sklearn.metrics.roc_auc_score``); NaN where the row has no normal or no anomaly of g.

    Each anomaly's count of normals below it (+ half the ties) comes from two batched
    ``searchsorted`` calls over the row's sorted normal scores; per-group sums of those counts
    divided by ``n_normal * n_group`` are the Mann–Whitney AUROCs.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    n_tasks, _ = scores.shape
    normal = labels == 0
    anomaly = labels == 1
    normal_sorted = np.where(normal, scores, np.inf)
    normal_sorted.sort(axis=1)
    n_normal = normal.sum(axis=1)
    sorted_t = torch.from_numpy(normal_sorted)
    query_t = torch.from_numpy(np.where(anomaly, scores, 0.0))
    below = torch.searchsorted(sorted_t, query_t, right=False).numpy()
    below_or_equal = torch.searchsorted(sorted_t, query_t, right=True).numpy()
    below_or_equal = np.minimum(below_or_equal, n_normal[:, None])  # padding (+inf) never counts
    wins = below + 0.5 * (below_or_equal - below)
    flat_group = np.where(anomaly, np.arange(n_tasks)[:, None] * n_groups + groups, -1)
    chosen = flat_group >= 0
    win_sums = np.bincount(flat_group[chosen], weights=wins[chosen], minlength=n_tasks * n_groups)
    counts = np.bincount(flat_group[chosen], minlength=n_tasks * n_groups)
    win_sums = win_sums.reshape(n_tasks, n_groups)
    counts = counts.reshape(n_tasks, n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = win_sums / (counts * n_normal[:, None])
    result[(counts == 0) | (n_normal[:, None] == 0)] = np.nan
    return result


def order_uncertain(scores: np.ndarray, bounds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Which approximate scores could order differently against the other label than exact ones.

    Parameters
    ----------
    scores : (T, Q) approximate scores; bounds : (T, Q) with ``|scores - exact| <= bounds``.
    labels : (T, Q) int8: -1 excluded, 0 normal, 1 anomaly.

    Returns
    -------
    (T, Q) bool: True for a normal whose interval ``scores ± e_t`` (``e_t`` the task's largest
    bound) meets an anomaly's, and for such an anomaly.  With those scores replaced by exact
    ones, every normal–anomaly pair compares as with exact scores (a certain score's interval
    meets no interval of the other label, and every score lies in its interval), so every
    AUROC, per group or over all anomalies, is the exact one.
    """
    scores = np.asarray(scores, dtype=np.float64)
    member = labels >= 0
    width = 2.0 * np.where(member, bounds, 0.0).max(axis=1, initial=0.0)[:, None]  # (T, 1)
    out = np.zeros(scores.shape, dtype=bool)
    for mine, other in ((0, 1), (1, 0)):
        other_sorted = torch.from_numpy(np.sort(np.where(labels == other, scores, np.inf), axis=1))
        n_other = torch.from_numpy((labels == other).sum(axis=1))
        low = torch.from_numpy(np.where(labels == mine, scores, 0.0) - width)
        first = torch.searchsorted(other_sorted, low)  # first other-label score >= s - width
        nearest = torch.gather(other_sorted, 1, first.clamp(max=max(0, other_sorted.shape[1] - 1))).numpy()
        out |= (labels == mine) & (first < n_other[:, None]).numpy() & (nearest <= np.where(labels == mine, scores, 0.0) + width)
    return out


@dataclass
class AurocCube:
    """All AUROCs of a sweep. ``T`` tasks, ``C`` candidates, ``V`` synthetic sources, ``G`` classes.

    Attributes
    ----------
    tasks : DataFrame (task_id, dataset, normal_class), T rows
    candidates : DataFrame (name, n_params, feature_dim, weights_kind, family), C rows
    sources : V synthetic validation source names (e.g. "cutpaste", "cutpaste@hard10")
    real : (T, C, 2) real-validation AUROC for :data:`SETTINGS`
    synthetic : (T, C, V) synthetic-validation AUROC
    per_class : (T, C, G) real AUROC against each out-class alone (NaN padded)
    class_names : (T, G) the out-class of each ``per_class`` column ("" padded)
    skips : DataFrame (task_id, candidate, reason) of (task, candidate) cells left NaN, or scored
        with some images left out (the reason says how many and why)
    config : settings of the sweep (k, hardest counts, ...)
    """

    tasks: pd.DataFrame
    candidates: pd.DataFrame
    sources: list[str]
    real: np.ndarray
    synthetic: np.ndarray
    per_class: np.ndarray
    class_names: np.ndarray
    skips: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["task_id", "candidate", "reason"]))
    config: dict = field(default_factory=dict)

    @property
    def candidate_names(self) -> list[str]:
        return list(self.candidates["name"])

    def closest_class(self) -> np.ndarray:
        """(T, C) the out-class giving each one-vs-closest AUROC ("" where undefined)."""
        filled = np.where(np.isnan(self.per_class), np.inf, self.per_class)
        index = filled.argmin(axis=2)
        names = np.take_along_axis(np.broadcast_to(self.class_names[:, None, :], self.per_class.shape), index[..., None], 2)[..., 0]
        return np.where(np.isnan(self.per_class).all(axis=2), "", names)

    # ---- persistence
    def to_arrays(self) -> tuple[dict, dict]:
        arrays = {
            "real": self.real, "synthetic": self.synthetic, "per_class": self.per_class,
            "class_names": self.class_names.astype(object),
            "task_id": self.tasks["task_id"].to_numpy(), "dataset": self.tasks["dataset"].to_numpy().astype(object),
            "normal_class": self.tasks["normal_class"].to_numpy().astype(object),
        }
        attrs = {
            "sources": list(self.sources), "settings": list(SETTINGS),
            "candidates": self.candidates.to_dict(orient="list"),
            "skips": self.skips.to_dict(orient="list"), "config": self.config,
            "description": "AUROC cube: real (task, candidate, setting), synthetic (task, candidate, source)",
        }
        return arrays, attrs

    def save(self, store_path: str | os.PathLike, name: str = CUBE_RESULT) -> None:
        from swsa_store.store import save_result

        arrays, attrs = self.to_arrays()
        save_result(store_path, name, arrays, attrs)

    @classmethod
    def load(cls, store_path: str | os.PathLike, name: str = CUBE_RESULT) -> "AurocCube":
        from swsa_store import open_store

        with open_store(store_path) as store:
            group = store.result_group(name)
            attrs = {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v for k, v in group.attrs.items()}
            tasks = pd.DataFrame({
                "task_id": group["task_id"][...],
                "dataset": group["dataset"].asstr()[...].astype(object),
                "normal_class": group["normal_class"].asstr()[...].astype(object),
            })
            return cls(
                tasks=tasks, candidates=pd.DataFrame(attrs["candidates"]), sources=list(attrs["sources"]),
                real=group["real"][...], synthetic=group["synthetic"][...], per_class=group["per_class"][...],
                class_names=group["class_names"].asstr()[...].astype(object),
                skips=pd.DataFrame(attrs["skips"]) if attrs["skips"] else pd.DataFrame(columns=["task_id", "candidate", "reason"]),
                config=attrs["config"],
            )


def _features_for(features: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Gather rows ``features[ids]`` with -1 padding → zero rows (masked downstream)."""
    return features[np.where(ids >= 0, ids, 0)]


def empty_result(group: TaskGroup, sources: list[str], hardest: tuple[int, ...], skips: list) -> dict:
    """The all-NaN result of one candidate for one group, as the ``score_group*`` functions return it."""
    n_tasks = len(group.task_ids)
    return {
        "real": np.full((n_tasks, 2), np.nan),
        "synthetic": np.full((n_tasks, len(sources) * (1 + len(hardest))), np.nan),
        "per_class": np.full((n_tasks, len(group.group_names)), np.nan),
        "skips": skips,
        "knn_flops": 0.0,
    }


def _keep_usable(usable: np.ndarray):
    """``keep(ids)``: image ids (any shape, -1 padded) with those of rows that ``usable`` (N,) marks False set to -1."""
    def keep(ids: np.ndarray) -> np.ndarray:
        return np.where((ids >= 0) & usable[np.maximum(ids, 0)], ids, -1)

    return keep


def _usable_banks(group: TaskGroup, keep, min_bank: tuple[int, int], who: str, advice: str = ""):
    """Each task's usable support and held-out ids, and which tasks have a bank large enough.

    ``min_bank`` is the bank rows needed without and with held-out queries (scored leave-one-out,
    which takes one row from the bank); ``who`` and ``advice`` word the skip of a task with fewer.
    Returns ``support`` (T, S), ``heldout`` (T, H) (-1 padded), ``scoreable`` (T,) bool and
    ``skips`` [(task_id, reason)].
    """
    support = keep(group.support)
    heldout = keep(group.heldout)
    n_bank = (support >= 0).sum(axis=1)
    needed = np.where((heldout >= 0).any(axis=1), min_bank[1], min_bank[0])
    scoreable = n_bank >= needed
    skips = [(int(t), f"{who} needs at least {need} usable support images, the task has {n}{advice}")
             for t, n, need in zip(group.task_ids[~scoreable], n_bank[~scoreable], needed[~scoreable])]
    return support, heldout, scoreable, skips


def _own_real_queries(group: TaskGroup, member: np.ndarray, widest: int):
    """Per-task real validation queries, for tasks that each have their own real images.

    ``member`` (T', Q) marks each task's usable images of ``group.real_ids``; ``widest`` is the
    largest count. Returns ``order`` (T', widest) their positions in ``group.real_ids``,
    ``present`` (T', widest) bool and the image ids (T', widest), -1 padded.
    """
    order = np.argsort(~member, axis=1, kind="stable")[:, :widest]
    present = np.take_along_axis(member, order, axis=1)
    return order, present, np.where(present, group.real_ids[order], -1)


def _put_real(real_scores: np.ndarray, order: np.ndarray, present: np.ndarray, scores: np.ndarray, member: np.ndarray) -> None:
    """Write the scores of :func:`_own_real_queries` back into ``real_scores`` (T', Q), NaN off ``member``."""
    np.put_along_axis(real_scores, order, np.where(present, scores, np.nan), axis=1)
    real_scores[~member] = np.nan


def _leave_one_out(heldout: np.ndarray, support: np.ndarray, queries: np.ndarray, n_heldout: int) -> np.ndarray:
    """(T', W) the bank position of each query's own row in ``support`` (T', S), -1 for none.

    The held-out normals (``heldout`` (T', H), the first ``n_heldout`` columns of ``queries``)
    are also bank rows; each is scored without its own row.
    """
    exclude = np.full(queries.shape, -1, dtype=np.int64)
    match = (heldout[:, :, None] == support[:, None, :]) & (heldout[:, :, None] >= 0)
    exclude[:, :n_heldout] = np.where(match.any(axis=2), match.argmax(axis=2), -1)
    return exclude


@dataclass
class _KnnPass:
    """What every kNN call of one candidate over the scoreable tasks of one group shares."""

    features: np.ndarray  # (N, D) the candidate's rows, for exact recomputation
    prepared: object  # the rows the group uses, centred (swsa_engine.core.knn.CentredRows)
    support: np.ndarray  # (T', S) bank image ids, -1 padded
    k: int
    device: str
    chunk_bytes: int
    out: dict  # the result being built: knn_flops add up in it

    def scores(self, queries: np.ndarray, exclude: np.ndarray | None):
        """Float32 scores with error bounds of per-task queries (T', W): :func:`_batched_knn`."""
        return _batched_knn(self.prepared, queries, self.support, exclude, self.k, self.device, self.chunk_bytes, self.out)

    def refine(self, queries: np.ndarray, exclude: np.ndarray | None, scores: np.ndarray, uncertain: np.ndarray) -> int:
        """Exact scores in place of ``scores[uncertain]``: :func:`_refine`."""
        return _refine(self.features, self.prepared, queries, self.support, exclude, scores, uncertain, self.k,
                       self.device, self.chunk_bytes, self.out)


def score_group(
    features: np.ndarray,
    usable: np.ndarray,
    group: TaskGroup,
    sources: list[str],
    *,
    k: int = 3,
    hardest: tuple[int, ...] = (10, 5),
    device: str = "cpu",
    chunk_bytes: int = 256 << 20,
) -> dict:
    """AUROCs of one candidate for the tasks of one dataset.

    Parameters
    ----------
    features : (N, D) the candidate's embeddings for every catalogued image.
    usable : (N,) bool, rows that hold a finite embedding.
    sources : synthetic sources to evaluate (missing ones give NaN).

    Returns a dict: ``real`` (T, 2), ``synthetic`` (T, V) over ``sources`` then their hardest
    variants, ``per_class`` (T, G), ``skips`` [(task_id, reason)], ``knn_flops`` and
    ``refined_scores``.

    Scores are computed in float32 with a rigorous error bound each; the few whose bound could
    change an order that an AUROC or a hardest-N set depends on (:func:`order_uncertain`,
    :func:`hardest_uncertain`) are recomputed exactly (``refined_scores`` counts them), so every
    AUROC equals the one from exact float64 scores.
    """
    keep = _keep_usable(usable)
    support, heldout, scoreable, skips = _usable_banks(group, keep, (k, k + 1), f"k={k}")
    out = empty_result(group, sources, hardest, skips)
    rows = np.flatnonzero(scoreable)
    if rows.size == 0:
        return out
    support = support[rows]
    heldout = heldout[rows]
    queries, widths = synthetic_queries(group, rows, sources, keep)
    real_ok = usable[group.real_ids]
    # one centre and one float64 norm per row for every kernel call of this group
    prepared = centre_rows(features, np.r_[support[support >= 0], group.real_ids[real_ok], queries[queries >= 0]],
                           support[support >= 0], device=device)
    knn = _KnnPass(features, prepared, support, k, device, chunk_bytes, out)
    real_scores, refined_real = _real_knn_scores(knn, group, rows, real_ok)
    synth_scores, refined_synthetic = _synthetic_knn_scores(knn, heldout, queries, widths, hardest)
    out["refined_scores"] = refined_real + refined_synthetic
    aurocs = validation_aurocs(group, rows, real_scores, queries, synth_scores, widths, sources, hardest)
    for key in ("real", "synthetic", "per_class"):
        out[key][rows] = aurocs[key]
    return out


def _real_knn_scores(knn: _KnnPass, group: TaskGroup, rows: np.ndarray, real_ok: np.ndarray) -> tuple[np.ndarray, int]:
    """(T', Q) kNN scores of ``group.real_ids`` for tasks ``rows`` (NaN where not the task's or
    ``real_ok`` (Q,) is False), exact wherever an AUROC depends on it; and how many were refined."""
    support = knn.support
    member = (group.real_label[rows] >= 0) & real_ok[None, :]
    widest = int(member.sum(axis=1).max(initial=0))
    real_scores = np.full((len(rows), len(group.real_ids)), np.nan)
    dense_cost = int(real_ok.sum()) * len(np.unique(support[support >= 0]))
    sparse_cost = widest * len(rows) * support.shape[1]
    if dense_cost <= sparse_cost:
        # tasks share their real validation images (one-vs-rest over classes): one distance
        # block of every query against the union of the banks, gathered per task
        query_ids = group.real_ids[real_ok]
        approx, bounds = bounded_knn_shared(knn.prepared, query_ids, support, knn.k)
        knn.out["knn_flops"] += 2.0 * dense_cost * knn.features.shape[1]
        labels = np.where(member[:, real_ok], group.real_label[rows][:, real_ok], -1)
        uncertain = order_uncertain(approx, bounds, labels)
        refined = knn.refine(np.broadcast_to(query_ids, approx.shape), None, approx, uncertain)
        real_scores[:, real_ok] = approx
        return real_scores, refined
    # each task has its own real images (a product's test set): per-task queries
    order, present, own_queries = _own_real_queries(group, member, widest)
    scores, bounds = knn.scores(own_queries, None)
    labels = np.where(present, np.take_along_axis(group.real_label[rows], order, axis=1), -1)
    refined = knn.refine(own_queries, None, scores, order_uncertain(scores, bounds, labels))
    _put_real(real_scores, order, present, scores, member)
    return real_scores, refined


def _synthetic_knn_scores(knn: _KnnPass, heldout: np.ndarray, queries: np.ndarray, widths: list[int],
                          hardest: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """(T', W) kNN scores of the :func:`synthetic_queries` ``queries`` (held-out normals
    ``heldout`` (T', H) leave-one-out, then each source's anomalies), exact wherever a synthetic
    AUROC or hardest-N set depends on it; and how many were refined."""
    exclude = _leave_one_out(heldout, knn.support, queries, widths[0])
    scores, bounds = knn.scores(queries, exclude)
    uncertain = synthetic_uncertain(scores, bounds, queries >= 0, widths, hardest)
    refined = knn.refine(queries, exclude, scores, uncertain)
    return scores, refined


def _batched_knn(features, queries, support, exclude, k, device, chunk_bytes, out: dict, exact: bool = False):
    """kNN scores of per-task queries ``(T, W)`` (image ids, -1 padded) against per-task banks
    ``(T, S)``, in chunks of tasks that bound memory; NaN for padding.

    ``features``: the prepared rows (:class:`~swsa_engine.core.knn.CentredRows`) → ``(scores, bounds)``
    (T, W) from the float32 kernel with error bounds (:func:`~swsa_engine.core.knn.bounded_knn_tasks`);
    with ``exact``, the (N, D) array → exact scores and zero bounds.  Adds the floating-point
    operations to ``out["knn_flops"]``.
    """
    scores = np.full(queries.shape, np.nan)
    bounds = np.zeros(queries.shape)
    if queries.shape[1] == 0 or len(queries) == 0:
        return scores, bounds
    if not exact:
        out["knn_flops"] += 2.0 * (queries >= 0).sum() * support.shape[1] * features.dim
        return bounded_knn_tasks(features, queries, support, k, exclude=exclude, block_bytes=chunk_bytes)
    dim = features.shape[1]
    per_task_bytes = max(1, (queries.shape[1] + support.shape[1]) * dim * 4 * 3)
    chunk = max(1, chunk_bytes // per_task_bytes)
    for lo in range(0, len(queries), chunk):
        hi = min(lo + chunk, len(queries))
        q_ids, b_ids = queries[lo:hi], support[lo:hi]
        out["knn_flops"] += 2.0 * q_ids.size * b_ids.shape[1] * dim
        args = (_features_for(features, q_ids), _features_for(features, b_ids))
        kwargs = dict(k=k, query_mask=q_ids >= 0, bank_mask=b_ids >= 0,
                      exclude=None if exclude is None else exclude[lo:hi], device=device)
        scores[lo:hi] = knn_score_batched(*args, **kwargs)
    return scores, bounds


#: banks up to this size are refined by the float64 product over the whole bank, larger ones
#: from float32 candidates (:func:`~swsa_engine.core.knn.exact_knn_candidates`): with few bank rows
#: the product moves less memory than gathering ``k + 3`` candidate rows per score.
SMALL_BANK = 64


def _refine(features, prepared, queries, support, exclude, scores, uncertain, k, device, chunk_bytes, out) -> int:
    """Replace ``scores[uncertain]`` (T, W) in place by exact ones; returns how many.

    With banks larger than :data:`SMALL_BANK`, exact scores come from float32 candidates
    recomputed in float64 (:func:`~swsa_engine.core.knn.exact_knn_candidates`); the few it cannot
    certify, scores against small banks and every score where float32 is not safe, from the
    float64 computation over the whole bank.
    """
    rows = np.flatnonzero(uncertain.any(axis=1))
    if rows.size == 0:
        return 0
    width = int(uncertain.sum(axis=1).max())
    order = np.argsort(~uncertain[rows], axis=1, kind="stable")[:, :width]
    present = np.take_along_axis(uncertain[rows], order, axis=1)
    query_ids = np.where(present, np.take_along_axis(queries[rows], order, axis=1), -1)
    excluded = None if exclude is None else np.where(present, np.take_along_axis(exclude[rows], order, axis=1), -1)
    if prepared.safe and support.shape[1] > SMALL_BANK:
        exact, certified = exact_knn_candidates(prepared, query_ids, support[rows], k, exclude=excluded, block_bytes=chunk_bytes)
        out["knn_flops"] += 2.0 * present.sum() * support.shape[1] * prepared.dim
        left = present & ~certified
    else:
        exact, left = np.full(query_ids.shape, np.nan), present
    if left.any():
        again = np.flatnonzero(left.any(axis=1))
        redo = np.where(left[again], query_ids[again], -1)
        redo_excluded = None if excluded is None else np.where(left[again], excluded[again], -1)
        full, _ = _batched_knn(features, redo, support[rows][again], redo_excluded, k, device, chunk_bytes, out, exact=True)
        exact[again] = np.where(left[again], full, exact[again])
        if prepared.safe and support.shape[1] > SMALL_BANK:
            out["uncertified_refinements"] = out.get("uncertified_refinements", 0) + int(left.sum())
    block = scores[rows]
    np.put_along_axis(block, order, np.where(present, exact, np.take_along_axis(block, order, axis=1)), axis=1)
    scores[rows] = block
    return int(uncertain.sum())


def hardest_uncertain(scores: np.ndarray, bounds: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Which anomalies' membership of the ``n`` lowest scores of their row is not certain.

    ``scores``, ``bounds``, ``mask`` (T, A).  With ``e`` the row's largest bound, an anomaly is
    certainly among the ``n`` lowest when fewer than ``n`` others score ``<= s + 2e``, and
    certainly not when at least ``n`` others score ``< s - 2e``; the rest (True) need exact
    scores.  With them exact, the ``n`` lowest values are those of the exact scores.
    """
    width = 2.0 * np.where(mask, bounds, 0.0).max(axis=1, initial=0.0)[:, None]
    values = np.where(mask, scores, np.inf)
    ordered = torch.from_numpy(np.sort(values, axis=1))
    filled = np.where(mask, scores, 0.0)
    at_most_high = torch.searchsorted(ordered, torch.from_numpy(filled + width), right=True).numpy() - 1  # others <= s + 2e
    below_low = torch.searchsorted(ordered, torch.from_numpy(filled - width), right=False).numpy()  # others < s - 2e
    return mask & ~((at_most_high < n) | (below_low >= n))


def synthetic_uncertain(scores: np.ndarray, bounds: np.ndarray, present: np.ndarray, widths: list[int],
                        hardest: tuple[int, ...]) -> np.ndarray:
    """(T, W) scores of :func:`synthetic_queries` whose error bound could change a synthetic AUROC:
    normal–anomaly orders per source (:func:`order_uncertain`) and hardest-N memberships."""
    offsets = np.cumsum([0] + list(widths))
    present = present & np.isfinite(scores)
    uncertain = np.zeros(scores.shape, dtype=bool)
    for index in range(1, len(widths)):
        part = slice(offsets[index], offsets[index + 1])
        labels = np.full(scores.shape, -1, dtype=np.int8)
        labels[:, : offsets[1]] = np.where(present[:, : offsets[1]], 0, -1)
        labels[:, part] = np.where(present[:, part], 1, -1)
        uncertain |= order_uncertain(np.nan_to_num(scores), bounds, labels)
        for n in hardest:
            uncertain[:, part] |= hardest_uncertain(scores[:, part], bounds[:, part], present[:, part], n)
    return uncertain


def synthetic_queries(group: TaskGroup, rows: np.ndarray, sources: list[str], keep=lambda ids: ids) -> tuple[np.ndarray, list[int]]:
    """The synthetic validation queries of tasks ``rows``: ``(T', W)`` image ids (-1 padded),
    held-out normals first, then each source's anomalies; and the width of each part."""
    parts = [keep(group.heldout[rows])] + [
        keep(group.synthetic[s][rows]) if s in group.synthetic else np.full((len(rows), 0), -1) for s in sources]
    return np.concatenate(parts, axis=1), [p.shape[1] for p in parts]


def validation_aurocs(
    group: TaskGroup,
    rows: np.ndarray,
    real_scores: np.ndarray,
    queries: np.ndarray,
    synth_scores: np.ndarray,
    widths: list[int],
    sources: list[str],
    hardest: tuple[int, ...],
) -> dict:
    """Every AUROC of one candidate from its anomaly scores, for tasks ``rows`` of ``group``.

    Parameters
    ----------
    real_scores : (T', Q) scores of ``group.real_ids`` per task (NaN = image not usable).
    queries, widths : from :func:`synthetic_queries`; synth_scores : (T', W) their scores.

    Returns ``real`` (T', 2) for :data:`SETTINGS` (one-vs-rest over the groups in
    ``group.group_in_rest``, one-vs-closest the minimum of ``per_class`` over every group),
    ``per_class`` (T', G) and ``synthetic`` (T', V) over ``sources`` then their hardest-N variants.
    """
    real_label = np.where(np.isnan(real_scores), -1, group.real_label[rows]).astype(np.int8)
    filled = np.nan_to_num(real_scores)
    real = np.full((len(rows), 2), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # one-class tasks are reported as skips
        # one-vs-rest: normals against the anomalies of the task's rest groups; per class: every group
        real[:, 0] = auroc(filled, real_label == 1, mask=(real_label >= 0) & rest_mask(group, rows))
    per_class = grouped_auroc(filled, real_label, group.real_group[rows], len(group.group_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        real[:, 1] = np.nanmin(per_class, axis=1) if per_class.shape[1] else np.nan
    offsets = np.cumsum([0] + widths)
    normal_scores = synth_scores[:, offsets[0] : offsets[1]]
    normal_mask = (queries[:, offsets[0] : offsets[1]] >= 0) & np.isfinite(normal_scores)
    columns, hard_columns = [], []
    for index, _ in enumerate(sources):
        anomaly_scores = synth_scores[:, offsets[index + 1] : offsets[index + 2]]
        anomaly_mask = (queries[:, offsets[index + 1] : offsets[index + 2]] >= 0) & np.isfinite(anomaly_scores)
        columns.append(_two_part_auroc(normal_scores, normal_mask, anomaly_scores, anomaly_mask))
        ordered = np.sort(np.where(anomaly_mask, anomaly_scores, np.inf), axis=1)
        for n in hardest:
            hard = ordered[:, :n]
            hard_columns.append(_two_part_auroc(normal_scores, normal_mask, np.where(np.isfinite(hard), hard, 0.0), np.isfinite(hard)))
    n_columns = len(sources) * (1 + len(hardest))
    synthetic = np.stack(columns + hard_columns, axis=1) if columns else np.full((len(rows), n_columns), np.nan)
    return {"real": real, "per_class": per_class, "synthetic": synthetic}


def _two_part_auroc(normal_scores, normal_mask, anomaly_scores, anomaly_mask) -> np.ndarray:
    scores = np.concatenate([np.where(normal_mask, normal_scores, 0.0), np.where(anomaly_mask, anomaly_scores, 0.0)], axis=1)
    labels = np.concatenate([np.zeros(normal_scores.shape, bool), np.ones(anomaly_scores.shape, bool)], axis=1)
    mask = np.concatenate([normal_mask, anomaly_mask], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # a source absent for a task: NaN
        return auroc(scores, labels, mask=mask)


def score_group_imported(table: pd.DataFrame, complete: np.ndarray, n_images: int, group: TaskGroup,
                         sources: list[str], *, hardest: tuple[int, ...]) -> dict:
    """AUROCs of an imported score candidate (``table``: task_id, image_id, score) for one group;
    tasks not in ``complete`` are left NaN (their skips were recorded at import)."""
    out = empty_result(group, sources, hardest, [])
    rows = np.flatnonzero(np.isin(group.task_ids, complete))
    if rows.size == 0:
        return out
    keys = table["task_id"].to_numpy() * n_images + table["image_id"].to_numpy()
    order = np.argsort(keys)
    keys, values = keys[order], table["score"].to_numpy()[order]

    def lookup(task_ids: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
        wanted = task_ids[:, None] * n_images + np.maximum(image_ids, 0)
        position = np.clip(np.searchsorted(keys, wanted), 0, max(0, len(keys) - 1))
        found = (len(keys) > 0) & (keys[position] == wanted) & (image_ids >= 0)
        return np.where(found, values[position], np.nan)

    task_ids = group.task_ids[rows]
    real_scores = lookup(task_ids, np.broadcast_to(group.real_ids, (len(rows), len(group.real_ids))))
    queries, widths = synthetic_queries(group, rows, sources)
    aurocs = validation_aurocs(group, rows, real_scores, queries, lookup(task_ids, queries), widths, sources, hardest)
    for key in ("real", "synthetic", "per_class"):
        out[key][rows] = aurocs[key]
    return out


CANDIDATE_COLUMNS = ["name", "feature", "detector", "n_params", "feature_dim", "weights_kind", "family"]


@dataclass
class CubeLayout:
    """The empty arrays of an :class:`AurocCube` over ``groups`` (tasks in group order) and
    where each group's tasks sit in them (``offsets``)."""

    base_sources: list[str]
    sources: list[str]
    tasks: pd.DataFrame
    offsets: np.ndarray
    real: np.ndarray
    synthetic: np.ndarray
    per_class: np.ndarray
    class_names: np.ndarray

    @classmethod
    def of(cls, groups: list[TaskGroup], tasks: pd.DataFrame, n_candidates: int, hardest: tuple[int, ...]) -> "CubeLayout":
        base_sources = sorted({s for g in groups for s in g.synthetic})
        sources = base_sources + [hard_source_name(s, n) for s in base_sources for n in hardest]
        ordered = pd.concat([tasks.set_index("task_id").loc[g.task_ids, ["dataset", "normal_class"]] for g in groups]).reset_index()
        n_tasks = len(ordered)
        max_groups = max(len(g.group_names) for g in groups)
        offsets = np.cumsum([0] + [len(g.task_ids) for g in groups])
        class_names = np.full((n_tasks, max_groups), "", dtype=object)
        for g, group in enumerate(groups):
            class_names[offsets[g] : offsets[g + 1], : len(group.group_names)] = group.group_names
        return cls(base_sources, sources, ordered[["task_id", "dataset", "normal_class"]], offsets,
                   np.full((n_tasks, n_candidates, 2), np.nan), np.full((n_tasks, n_candidates, len(sources)), np.nan),
                   np.full((n_tasks, n_candidates, max_groups), np.nan), class_names)

    def put(self, g: int, group: TaskGroup, column: int, result: dict) -> None:
        """Write one candidate's AUROCs for ``group`` (the ``g``-th), a ``score_group*`` result, into ``column``."""
        span = slice(self.offsets[g], self.offsets[g + 1])
        self.real[span, column] = result["real"]
        self.synthetic[span, column] = result["synthetic"]
        self.per_class[span, column, : len(group.group_names)] = result["per_class"]


def candidate_info(store, entries: list[tuple[str, str, object]]) -> pd.DataFrame:
    """One row per candidate: ``entries`` are (candidate name, feature source, detector or None)."""
    rows = []
    for name, feature, detector in entries:
        if detector is None:  # imported scores
            rows.append({"name": name, "feature": feature, "detector": "imported", "n_params": 0, "feature_dim": 0,
                         "weights_kind": "imported", "family": "imported"})
            continue
        config = store.embedding_attrs(feature).get("config", {})
        rows.append({
            "name": name, "feature": feature, "detector": detector.label,
            "n_params": int(config.get("n_params", 0) or 0),
            "feature_dim": int(config.get("feature_dim", 0) or 0),
            "weights_kind": str(config.get("weights_kind", "unknown")),
            "family": str(config.get("family", "")),
        })
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


@dataclass
class _SweepInputs:
    """What :func:`run_sweep` reads from the store before it scores."""

    images: pd.DataFrame
    tasks: pd.DataFrame
    members: pd.DataFrame
    held: list[str]  # feature sources with embeddings
    names: list[str]  # the feature sources and imported score sets to score
    detectors: list
    entries: list[tuple[str, str, object]]  # (candidate name, feature source, detector or None)
    info: pd.DataFrame  # candidate_info of entries
    n_images: int
    largest_matrix: int  # elements of the largest embedding matrix to read
    references: pd.DataFrame | None  # the abnormal-reference split
    reference_attrs: dict | None


def _read_sweep_inputs(store_path, backbones, detectors, k: int, references) -> _SweepInputs:
    """The catalog, tasks and candidates of :func:`run_sweep`; one-line errors for missing sources."""
    from swsa_store import StoreError, open_store

    with open_store(store_path) as store:
        images = store.images(columns=["image_id", "kind", "status", "task_id"])
        tasks, members = store.tasks(), store.task_members()
        held, imported = store.backbones(), store.score_sets()
        names = list(backbones) if backbones else held + [n for n in imported if n not in held]
        if not names:
            raise StoreError(f"store {store_path} holds no embeddings; run `swsa embed --store {store_path} --backbone NAME`")
        unknown = [n for n in names if n not in held and n not in imported]
        if unknown:
            raise StoreError(f"store {store_path} has no embeddings or imported scores {unknown}; held: {held + imported}")
        detectors = [parse_detector(d) if isinstance(d, str) else d for d in (detectors or [KnnDetector(k, "l2")])]
        entries = [(candidate_name(n, d), n, d) for n in names if n in held for d in detectors]
        entries += [(n, n, None) for n in names if n not in held]
        info = candidate_info(store, entries)
        n_images = store.n_images
        matrix_sizes = [store.file["embeddings"][n]["features"].size for n in names if n in held]
        if references is None:
            references = (read_references(store), store.table_attrs(REFERENCES_TABLE))
    references, reference_attrs = references
    return _SweepInputs(images, tasks, members, held, names, detectors, entries, info, n_images,
                        max(matrix_sizes, default=0), references, reference_attrs)


@dataclass
class _SweepRun:
    """What :func:`run_sweep` carries from one feature source to the next: the groups every
    candidate is scored on, the cube being filled (``layout``) and the running totals."""

    store_path: str | os.PathLike
    groups: list[TaskGroup]
    layout: CubeLayout
    entries: list[tuple[str, str, object]]  # (candidate name, feature source, detector or None)
    hardest: tuple[int, ...]
    device: str
    priors: list  # per group: its text prior (detector_sweep.TextPrior.for_group) or None
    reference_log: object  # detector_sweep.ReferenceLog
    skips: list = field(default_factory=list)  # (task_id, candidate, reason)
    read_seconds: float = 0.0
    knn_flops: float = 0.0
    refined_scores: int = 0

    def __post_init__(self):
        self.column_of = {entry[0]: c for c, entry in enumerate(self.entries)}

    def score_imported(self, name: str, n_images: int) -> None:
        """Fill the column of the imported score set ``name``: no kNN, the AUROCs of the given scores."""
        from swsa_store import open_store

        c = self.column_of[name]
        with open_store(self.store_path) as store:
            table, complete, _ = store.score_set(name)
        for g, group in enumerate(self.groups):
            result = score_group_imported(table, complete, n_images, group, self.layout.base_sources, hardest=self.hardest)
            self.layout.put(g, group, c, result)

    def read_features(self, name: str, usable_images: np.ndarray, buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings ``name`` (N, D), read into ``buffer``, and their usable rows (N,) bool;
        rows still to embed are an error."""
        from swsa_store import StoreError, open_store
        from swsa_store.store import DONE_TODO, DONE_WRITTEN

        read_started = time.perf_counter()
        with open_store(self.store_path) as store:
            done = store.done_mask(name)
            features = store.embeddings(name, buffer=buffer)
        self.read_seconds += time.perf_counter() - read_started
        pending = np.flatnonzero(usable_images & (done == DONE_TODO))
        if pending.size:
            raise StoreError(
                f"embeddings {name!r} are incomplete: {pending.size} images still to embed; "
                f"run `swsa embed --store {self.store_path} --backbone {name}` to finish"
            )
        return features, usable_images & (done == DONE_WRITTEN) & np.isfinite(features).all(axis=1)

    def score_candidate(self, name: str, detector, features: np.ndarray, usable: np.ndarray) -> None:
        """Fill the column of (feature source ``name``, ``detector``) for every group."""
        from swsa_engine.run.detector_sweep import detector_features, score_group_detector

        c = self.column_of[candidate_name(name, detector)]
        candidate = self.entries[c][0]
        prepared, usable_rows, missing = detector_features(self.store_path, name, detector, features, usable)
        if missing:  # a patch detector on a backbone embedded without patch tokens
            self.skips += [(int(t), candidate, missing) for group in self.groups for t in group.task_ids]
            return
        sources = self.layout.base_sources
        for g, group in enumerate(self.groups):
            if isinstance(detector, KnnDetector):
                result = score_group(prepared, usable_rows, group, sources, k=detector.k, hardest=self.hardest, device=self.device)
            else:
                result = score_group_detector(prepared, usable_rows, group, sources, detector, hardest=self.hardest,
                                              device=self.device, prior=self.priors[g])
                self.reference_log.add(candidate, detector, group.task_ids, result.get("references"))
            self.layout.put(g, group, c, result)
            self.skips += [(t, candidate, reason) for t, reason in result["skips"]]
            self.knn_flops += result["knn_flops"]
            self.refined_scores += result.get("refined_scores", 0)

    def cube(self, inputs: _SweepInputs, k: int, started: float, text_prior) -> AurocCube:
        """The filled cube, its config recording the settings, the time spent and the kNN work."""
        layout = self.layout
        return AurocCube(
            tasks=layout.tasks[["task_id", "dataset", "normal_class"]], candidates=inputs.info, sources=layout.sources,
            real=layout.real, synthetic=layout.synthetic, per_class=layout.per_class, class_names=layout.class_names,
            skips=pd.DataFrame(self.skips, columns=["task_id", "candidate", "reason"]),
            config={"k": k, "detectors": [d.label for d in inputs.detectors], "hardest": list(self.hardest),
                    "base_sources": layout.base_sources, "device": self.device,
                    "seconds": round(time.perf_counter() - started, 3), "read_seconds": round(self.read_seconds, 3),
                    "knn_flops": self.knn_flops, "refined_scores": self.refined_scores,
                    **({"text_prior": {"model": text_prior.model, "prompt_set": "paper", "score": "sigmoid(s*(cos(z,t_a)-cos(z,t_n))), "
                                       "prompt ensembles"}} if text_prior is not None else {}),
                    **self.reference_log.config(inputs.reference_attrs if inputs.references is not None else None)},
        )


def run_sweep(
    store_path: str | os.PathLike,
    *,
    backbones: list[str] | None = None,
    k: int = 3,
    hardest: tuple[int, ...] = (10, 5),
    device: str = "cpu",
    progress: bool = True,
    save: bool = True,
    task_ids: list[int] | np.ndarray | None = None,
    detectors: list | None = None,
    references: tuple[pd.DataFrame, dict] | None = None,
) -> AurocCube:
    """Score every task with every candidate backbone of the store and return the AUROC cube.

    Candidates are the store's embedding matrices (kNN score) and its imported score sets
    (:mod:`swsa_store.scores`), or the ``backbones`` named. Embeddings are read one at a time. A (task, candidate) cell that cannot be
    scored (k larger than the usable support, an image whose embedding failed) is NaN and
    listed in ``cube.skips``. Rows not yet embedded are an error: finish ``swsa embed`` first.
    ``detectors`` (default: kNN with ``k`` on squared L2) are applied to every embedding matrix:
    each (embedding, detector) pair is one candidate (:func:`swsa_engine.core.detectors.candidate_name`).
    kNN detectors are scored by :func:`score_group`, every other detector by
    :func:`swsa_engine.run.detector_sweep.score_group_detector`; the store's abnormal-reference split
    (``swsa split-refs``) feeds NAGL and is left out of every candidate's synthetic validation set.
    ``references`` (``(table, attrs)`` of :func:`swsa_store.references.make_references`) is a split
    used instead of the store's, e.g. one made in memory without writing the store.
    ``task_ids`` restricts the sweep to those tasks. ``cube.config`` records the time spent
    reading embeddings and scoring, and the kNN floating-point operations.
    """
    from swsa_engine.run.detector_sweep import ReferenceLog, TextPrior

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    started = time.perf_counter()
    inputs = _read_sweep_inputs(store_path, backbones, detectors, k, references)
    tasks = inputs.tasks
    if task_ids is not None:
        tasks = tasks[tasks["task_id"].isin(np.asarray(task_ids))]
    groups = build_task_groups(inputs.images, tasks, inputs.members, inputs.references)
    if not groups:
        raise ValueError(f"store {store_path} has no scoreable tasks; see `swsa info --store {store_path}`")
    layout = CubeLayout.of(groups, tasks, len(inputs.entries), hardest)
    text_prior = TextPrior.from_store(store_path) if any(getattr(d, "text_prior", 0) for d in inputs.detectors) else None
    priors = [text_prior.for_group(g) for g in groups] if text_prior is not None else [None] * len(groups)
    run = _SweepRun(store_path, groups, layout, inputs.entries, hardest, device, priors, ReferenceLog())
    usable_images = (inputs.images["status"] == "ok").to_numpy()
    buffer = np.empty(inputs.largest_matrix, dtype=np.float32)  # one matrix at a time, reused
    for name in tqdm(inputs.names, desc="score", unit="source", disable=not progress):
        if name not in inputs.held:  # imported scores: no kNN, the AUROCs of the given scores
            run.score_imported(name, inputs.n_images)
            continue
        features, usable = run.read_features(name, usable_images, buffer)
        for detector in inputs.detectors:
            run.score_candidate(name, detector, features, usable)
        del features
    cube = run.cube(inputs, k, started, text_prior)
    if save:
        cube.save(store_path)
    return cube
