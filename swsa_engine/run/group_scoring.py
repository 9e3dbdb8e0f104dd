"""What every scoring pass of the sweep does for one task group, whatever the detector.

The kNN pass (:mod:`swsa_engine.run.knn_sweep`), the other detectors' pass
(:mod:`swsa_engine.run.detector_sweep`) and imported scores share the same queries and AUROCs:

* the banks: each task's usable support and held-out ids (:func:`usable_banks`), held-out normals
  scored leave-one-out (:func:`leave_one_out`);
* the real validation queries, shared by the group's tasks or each task's own
  (:func:`own_real_queries`, :func:`put_real`);
* the synthetic validation queries: held-out normals, then each source's anomalies
  (:func:`synthetic_queries`), and the bank rows each is scored without under the validation
  protocol (:func:`validation_exclusions`, :mod:`swsa_engine.core.protocol`);
* every AUROC from those scores (:func:`validation_aurocs`): one-vs-rest, per out-class and
  one-vs-closest, synthetic per source and over its ``N`` hardest anomalies.

Image ids are catalog ids, ``-1`` = padding; ``T'`` is the number of scored tasks of the group.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd

from swsa_engine.core.cube import grouped_auroc
from swsa_engine.core.metrics import UndefinedMetricWarning, auroc
from swsa_engine.core.protocol import exclusion_counts, origin_positions, query_origins
from swsa_engine.core.score_cube import two_part_auroc
from swsa_engine.core.validation import usable_ids
from swsa_engine.run.task_groups import TaskGroup, rest_mask


def features_for(features: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Gather rows ``features[ids]`` for ids of any shape (-1 padded): ``ids.shape + features.shape[1:]``,
    with padding read as row 0 (callers mask it downstream with ``ids >= 0``)."""
    return features[np.where(ids >= 0, ids, 0)]


@contextmanager
def timed_stage(seconds: dict, name: str):
    """Add the seconds spent inside the block to ``seconds[name]`` (the sweep's stage breakdown,
    ``cube.config["stage_seconds"]``)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def empty_result(group: TaskGroup, sources: list[str], hardest: tuple[int, ...], skips: list) -> dict:
    """The all-NaN result of one candidate for one group, as the ``score_group*`` functions return it."""
    n_tasks = len(group.task_ids)
    return {
        "real": np.full((n_tasks, 2), np.nan),
        "synthetic": np.full((n_tasks, len(sources) * (1 + len(hardest))), np.nan),
        "per_class": np.full((n_tasks, len(group.group_names)), np.nan),
        "skips": skips,
        "knn_flops": 0.0,
        "refine_flops": 0.0,
        "stage_seconds": {},
    }


def usable_banks(group: TaskGroup, usable: np.ndarray, min_bank: tuple[int, int], who: str, advice: str = ""):
    """Each task's usable support and held-out ids, and which tasks have a bank large enough.

    ``usable`` (N,) bool marks the images a candidate can score (:func:`~swsa_engine.core.validation.usable_ids`
    sets the others to -1). ``min_bank`` is the bank rows needed without and with held-out queries (scored leave-one-out,
    which takes one row from the bank); ``who`` and ``advice`` word the skip of a task with fewer.
    Returns ``support`` (T, S), ``heldout`` (T, H) (-1 padded), ``scoreable`` (T,) bool and
    ``skips`` [(task_id, reason)].
    """
    support = usable_ids(group.support, usable)
    heldout = usable_ids(group.heldout, usable)
    n_bank = (support >= 0).sum(axis=1)
    needed = np.where((heldout >= 0).any(axis=1), min_bank[1], min_bank[0])
    scoreable = n_bank >= needed
    skips = [(int(t), f"{who} needs at least {need} usable support images, the task has {n}{advice}")
             for t, n, need in zip(group.task_ids[~scoreable], n_bank[~scoreable], needed[~scoreable])]
    return support, heldout, scoreable, skips


def own_real_queries(group: TaskGroup, member: np.ndarray, widest: int):
    """Per-task real validation queries, for tasks that each have their own real images.

    ``member`` (T', Q) bool marks each task's usable images of ``group.real_ids``; ``widest`` is the
    largest count. Returns ``order`` (T', widest) their positions in ``group.real_ids``,
    ``present`` (T', widest) bool and the image ids (T', widest), -1 padded.
    """
    order = np.argsort(~member, axis=1, kind="stable")[:, :widest]
    present = np.take_along_axis(member, order, axis=1)
    return order, present, np.where(present, group.real_ids[order], -1)


def put_real(real_scores: np.ndarray, order: np.ndarray, present: np.ndarray, scores: np.ndarray, member: np.ndarray) -> None:
    """Write ``scores`` (T', widest) of the :func:`own_real_queries` ``order``, ``present`` (T', widest)
    back into ``real_scores`` (T', Q) in place, NaN off ``member`` (T', Q)."""
    np.put_along_axis(real_scores, order, np.where(present, scores, np.nan), axis=1)
    real_scores[~member] = np.nan


def leave_one_out(heldout: np.ndarray, support: np.ndarray, queries: np.ndarray, n_heldout: int) -> np.ndarray:
    """(T', W) the bank position of each query's own row in ``support`` (T', S), -1 for none.

    The held-out normals (``heldout`` (T', H), the first ``n_heldout`` columns of ``queries``)
    are also bank rows; each is scored without its own row.
    """
    exclude = np.full(queries.shape, -1, dtype=np.int64)
    match = (heldout[:, :, None] == support[:, None, :]) & (heldout[:, :, None] >= 0)
    exclude[:, :n_heldout] = np.where(match.any(axis=2), match.argmax(axis=2), -1)
    return exclude


def validation_exclusions(group: TaskGroup, rows: np.ndarray, support: np.ndarray, queries: np.ndarray,
                          widths: list[int], sources: list[str], protocol: str) -> np.ndarray:
    """(T', W, E) the bank positions in ``support`` (T', S) that each :func:`synthetic_queries`
    query of tasks ``rows`` is scored without under ``protocol`` (:mod:`swsa_engine.core.protocol`):
    held-out normals without themselves; under ``"leak-free"`` anomalies also without their parents
    (``group.synthetic_parents``). -1 = nothing; origins not in the bank give -1."""
    parents = [group.synthetic_parents[s][rows] if s in group.synthetic else np.full((len(rows), 0, 0), -1)
               for s in sources]
    return origin_positions(support, query_origins(queries, widths, parents, protocol))


def kernel_exclude(exclude: np.ndarray) -> np.ndarray:
    """``exclude`` (T', W, E) as the scorers take it: (T', W) when E == 1, else (T', W, E)."""
    return exclude[..., 0] if exclude.shape[2] == 1 else exclude


def short_banks(group: TaskGroup, rows: np.ndarray, support: np.ndarray, exclude: np.ndarray, min_bank: tuple[int, int],
                who: str, advice: str = "") -> tuple[np.ndarray, list]:
    """(T',) bool: tasks ``rows`` whose bank ``support`` (T', S) is too small once a query leaves
    out its ``exclude`` (T', W, E) rows (``min_bank``: rows needed without and with one left out),
    and their skips [(task_id, reason)]."""
    n_bank = (support >= 0).sum(axis=1)
    most = exclusion_counts(exclude).max(axis=1, initial=0)
    needed = np.where(most > 0, min_bank[1] + np.maximum(most, 1) - 1, min_bank[0])
    short = n_bank < needed
    skips = [(int(t), f"{who} needs at least {need} usable support images when a validation query is scored without "
                      f"its {m} origin(s), the task has {n}{advice}")
             for t, n, need, m in zip(group.task_ids[rows][short], n_bank[short], needed[short], most[short])]
    return short, skips


def synthetic_queries(group: TaskGroup, rows: np.ndarray, sources: list[str],
                      usable: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """The synthetic validation queries of tasks ``rows``: ``(T', W)`` image ids (-1 padded),
    held-out normals first, then each source's anomalies; and the width of each part.

    With ``usable`` (N,) bool, images it marks False are -1 too."""
    def keep(ids: np.ndarray) -> np.ndarray:
        return ids if usable is None else usable_ids(ids, usable)

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

    Returns ``real`` (T', 2) for :data:`~swsa_engine.core.cube.SETTINGS` (one-vs-rest over the groups in
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
        columns.append(two_part_auroc(normal_scores, normal_mask, anomaly_scores, anomaly_mask))
        ordered = np.sort(np.where(anomaly_mask, anomaly_scores, np.inf), axis=1)
        for n in hardest:
            hard = ordered[:, :n]
            hard_columns.append(two_part_auroc(normal_scores, normal_mask, np.where(np.isfinite(hard), hard, 0.0), np.isfinite(hard)))
    n_columns = len(sources) * (1 + len(hardest))
    synthetic = np.stack(columns + hard_columns, axis=1) if columns else np.full((len(rows), n_columns), np.nan)
    return {"real": real, "per_class": per_class, "synthetic": synthetic}


def score_group_imported(table: pd.DataFrame, complete: np.ndarray, n_images: int, group: TaskGroup,
                         sources: list[str], *, hardest: tuple[int, ...]) -> dict:
    """AUROCs of an imported score candidate (``table``: task_id, image_id, score) for one group;
    tasks not in ``complete`` are left NaN (their skips were recorded at import). ``scores``: the
    imported scores of the real and synthetic queries, as :func:`swsa_engine.run.knn_sweep.score_group` gives them."""
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
    synth_scores = lookup(task_ids, queries)
    aurocs = validation_aurocs(group, rows, real_scores, queries, synth_scores, widths, sources, hardest)
    for key in ("real", "synthetic", "per_class"):
        out[key][rows] = aurocs[key]
    out["scores"] = {"rows": rows, "real": real_scores, "queries": queries, "synthetic": synth_scores}
    return out
