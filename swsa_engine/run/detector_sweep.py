"""The sweep's scoring path for every detector other than kNN (Mahalanobis, residual, NAGL, PCA, …).

:func:`score_group_detector` is :func:`swsa_engine.run.knn_sweep.score_group` for any detector with the
batched interface of :mod:`swsa_engine.core.detectors` (``score_tasks``, optionally ``score_shared``,
``min_bank``): the same queries (real validation; held-out normals scored leave-one-out and each
source's synthetic anomalies), the same AUROCs (:func:`swsa_engine.run.group_scoring.validation_aurocs`),
the same skips, and memory bounded by chunking over tasks (and over shared queries).
:func:`detector_features` gives a detector the features it scores (patch tokens for patch
detectors); :class:`ReferenceLog` records the few-shot residual's drawn references for the cube.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from swsa_store import open_store

from swsa_engine.core.protocol import DEFAULT_PROTOCOL, exclusion_counts, shares_parents
from swsa_engine.core.validation import usable_ids
from swsa_engine.run.group_scoring import (empty_result, features_for, kernel_exclude, own_real_queries, put_real,
                                           short_banks, synthetic_queries, usable_banks, validation_aurocs,
                                           validation_exclusions)
from swsa_engine.run.patch_features import load_patch_features
from swsa_engine.run.task_groups import TaskGroup


def score_group_detector(
    features: np.ndarray,
    usable: np.ndarray,
    group: TaskGroup,
    sources: list[str],
    detector,
    *,
    hardest: tuple[int, ...] = (10, 5),
    device: str = "cpu",
    chunk_bytes: int = 256 << 20,
    prior=None,
    protocol: str = DEFAULT_PROTOCOL,
    allow_self_validation: bool = False,
) -> dict:
    """AUROCs of one (feature source, detector) candidate for the tasks of one dataset.

    Parameters
    ----------
    features : (N, D) the feature source's rows for every catalogued image, already passed
        through ``detector.prepare`` (for patch detectors: whatever their ``score_tasks`` takes,
        indexed by image id on the first axis).
    usable : (N,) bool, rows that hold a finite embedding.
    group : the dataset's tasks; ``group.abnormal`` (T, R) feeds detectors with ``needs_abnormal``.
    sources : synthetic sources to evaluate (missing ones give NaN).
    device : unused by the float64 NumPy detectors (kept for the sweep's signature).
    prior : for detectors with a ``text_prior`` weight, ``prior(rows, query_ids)`` → CLIP's
        two-prompt probabilities of the queries for the group's tasks ``rows`` (ids (Q,) shared
        or (T', W) per task; :meth:`swsa_engine.run.text_prior.TextPrior.for_group`); ``weight × prior`` is added to every score.
        Images that ``prior.usable`` (N,) bool marks False (no CLIP embedding) are left out of the
        candidate like unusable rows, and each task that loses some gets a skip saying how many.
    protocol : the validation protocol (:mod:`swsa_engine.core.protocol`): which bank rows each
        synthetic query is scored without. A source whose anomalies have more origins in the bank
        than ``detector.max_exclusions`` is left out of the task (NaN, with a skip saying why).
    allow_self_validation : for detectors with ``needs_abnormal``: keep the synthetic validation
        anomalies of the references' own generator and those sharing parents with the references
        (self-validation). By default the first are NaN and marked in ``self_validated``, the
        second left out (a skip counts them; a source left with none is NaN and marked too).

    Returns a dict like :func:`swsa_engine.run.knn_sweep.score_group`: ``real`` (T, 2), ``synthetic``
    (T, V) over ``sources`` then their hardest variants, ``per_class`` (T, G), ``skips``
    [(task_id, reason)], ``knn_flops`` (distance-like multiply-adds, for the timing report), and
    for detectors with ``references`` (the few-shot residual) ``references`` (T, K) image ids of
    each task's drawn references (-1 where none), ``self_validated`` (T, V) bool: the cells
    left NaN because they would be self-validation, and ``scores``: the per-image scores of the
    tasks scored without a non-finite score, as :func:`swsa_engine.run.knn_sweep.score_group` gives them.
    """
    weight = float(detector.text_prior)
    usable, support, _, abnormal, scoreable, skips = _detector_banks(group, sources, usable, detector, prior, weight)
    out = empty_result(group, sources, hardest, skips)
    out["self_validated"] = np.zeros(out["synthetic"].shape, dtype=bool)
    rows = np.flatnonzero(scoreable)
    if rows.size == 0:
        return out
    # synthetic validation: held-out normals + each source's anomalies, each without its origins
    plan = synthetic_plan(group, rows, support[rows], usable, sources, detector, protocol, allow_self_validation)
    out["skips"] += plan.skips
    out["self_validated"][rows[plan.keep]] = np.concatenate(
        [plan.self_validated, np.repeat(plan.self_validated, len(hardest), axis=1)], axis=1)[plan.keep]
    rows, queries, widths = rows[plan.keep], plan.queries[plan.keep], plan.widths
    if rows.size == 0:
        return out
    support = support[rows]
    task_ids = group.task_ids[rows]
    if detector.draws_references:  # record the drawn references as image ids
        out["references"] = _drawn_references(detector, support, task_ids, rows, len(group.task_ids))
    scorer = _DetectorPass(detector, features, support, None if abnormal is None else abnormal[rows], task_ids, chunk_bytes)
    real_ok = usable[group.real_ids]
    member = (group.real_label[rows] >= 0) & real_ok[None, :]
    real_scores = _real_detector_scores(scorer, group, real_ok, member)
    synth_scores = scorer.task_scores(queries, kernel_exclude(plan.exclude[plan.keep]))
    out["knn_flops"] = scorer.flops[0]
    if weight:
        _add_text_prior(detector, prior, weight, rows, group.real_ids, real_ok, real_scores, queries, synth_scores)
    # a score that should exist but is not finite (a singular fit): skip the task, say why
    broken = (member & ~np.isfinite(real_scores)).any(axis=1) | ((queries >= 0) & ~np.isfinite(synth_scores)).any(axis=1)
    out["skips"] += [(int(t), _NON_FINITE.format(label=detector.label)) for t in task_ids[broken]]
    aurocs = validation_aurocs(group, rows, real_scores, queries, synth_scores, widths, sources, hardest)
    for key in ("real", "synthetic", "per_class"):
        aurocs[key][broken] = np.nan
        out[key][rows] = aurocs[key]
    out["scores"] = {"rows": rows[~broken], "real": real_scores[~broken], "queries": queries[~broken],
                     "synthetic": synth_scores[~broken]}
    return out


@dataclass
class SyntheticPlan:
    """What one detector is validated on for tasks ``rows`` (T'): :func:`synthetic_plan`."""

    queries: np.ndarray  # (T', W) synthetic validation ids, -1 where padded or left out
    widths: list[int]  # held-out normals, then each source's anomalies
    exclude: np.ndarray  # (T', W, E) bank positions each query is scored without
    keep: np.ndarray  # (T',) bool: tasks whose bank is large enough once the origins are left out
    self_validated: np.ndarray  # (T', n_sources) bool: cells left out as self-validation
    skips: list  # (task_id, reason)


def synthetic_plan(group: TaskGroup, rows: np.ndarray, support: np.ndarray, usable: np.ndarray, sources: list[str],
                   detector, protocol: str, allow_self_validation: bool) -> SyntheticPlan:
    """The synthetic validation queries of ``detector`` for tasks ``rows`` (banks ``support`` (T', S)).

    Each query is scored without its origins under ``protocol``
    (:func:`~swsa_engine.run.group_scoring.validation_exclusions`). Left out, each with a skip:
    a source whose anomalies leave out more bank rows than ``detector.max_exclusions`` allows (its
    cell NaN: never scored with its parents silently back in the bank); for detectors with
    ``needs_abnormal`` unless ``allow_self_validation``, the anomalies of the references' own
    generator (the cell NaN and marked) and those sharing parents with the task's references
    (the cell marked when none is left); tasks whose bank is then too small.
    """
    queries, widths = synthetic_queries(group, rows, sources, usable)
    exclude = validation_exclusions(group, rows, support, queries, widths, sources, protocol)
    counts = exclusion_counts(exclude)
    offsets = np.cumsum([0] + widths)
    task_ids = group.task_ids[rows]
    limit = detector.max_exclusions
    self_validated = np.zeros((len(rows), len(sources)), dtype=bool)
    skips = []
    for i, source in enumerate(sources):
        part = slice(offsets[i + 1], offsets[i + 2])
        present = queries[:, part] >= 0
        drop = np.zeros(present.shape, dtype=bool)
        if limit is not None:
            over = (present & (counts[:, part] > limit)).any(axis=1)
            drop[over] = True
            skips += [(int(t), f"{detector.label} can score a query without at most {limit} bank image(s); {source} "
                               f"anomalies are made from up to {n} of them, so the {protocol} protocol leaves this "
                               "source out of its validation (`--protocol paper` scores it with the parents in the bank)")
                      for t, n in zip(task_ids[over], counts[over][:, part].max(axis=1))]
        if detector.needs_abnormal and not allow_self_validation:
            drop, marked, reasons = _self_validation(group, rows, source, present, drop, detector)
            self_validated[:, i] = marked
            skips += reasons
        queries[:, part] = np.where(drop, -1, queries[:, part])
    exclude = np.where((queries >= 0)[..., None], exclude, -1)
    if limit is not None:
        exclude = exclude[..., : max(1, limit)]
    short, short_skips = short_banks(group, rows, support, exclude, (detector.min_bank(False), detector.min_bank(True)),
                                     detector.label, f"; {detector.bank_hint}")
    return SyntheticPlan(queries, widths, exclude, ~short, self_validated, skips + short_skips)


_SELF = "{label} takes its abnormal references from {ref}; "


def _self_validation(group: TaskGroup, rows: np.ndarray, source: str, present: np.ndarray, drop: np.ndarray, detector):
    """For ``source``'s anomalies (``present`` (T', A) bool) of tasks ``rows``: ``drop`` (T', A)
    widened by the self-validating ones, which tasks' cells are self-validation (T',) and the skips."""
    task_ids = group.task_ids[rows]
    has = present & ~drop
    intro = _SELF.format(label=detector.label, ref=", ".join(group.abnormal_sources) or "synthetic anomalies")
    allow = "; `--allow-self-validation` keeps them"
    if source in group.abnormal_sources:
        marked = has.any(axis=1)
        reasons = [(int(t), f"{intro}validating it on {source} too would be self-validation, so that cell is left "
                            f"out{allow}") for t in task_ids[marked]]
        return drop | present, marked, reasons
    sharing = has & shares_parents(group.synthetic_parents[source][rows], group.abnormal_parents[rows])
    marked = has.any(axis=1) & ~(has & ~sharing).any(axis=1)
    n_sharing, n_has = sharing.sum(axis=1), has.sum(axis=1)
    reasons = [(int(t), f"{intro}{m} of the task's {n} {source} anomalies share parents with them (self-validation) "
                        f"and are left out{' (none left: the cell is left out)' if whole else ''}{allow}")
               for t, m, n, whole in zip(task_ids, n_sharing, n_has, marked) if m]
    return drop | sharing, marked, reasons


def _detector_banks(group: TaskGroup, sources: list[str], usable: np.ndarray, detector, prior, weight: float):
    """What ``detector`` can score of ``group``: ``usable`` (N,) less the images its text prior
    cannot score, each task's usable ``support`` (T, S) and ``heldout`` (T, H) ids, its abnormal
    references (T, R) or None, ``scoreable`` (T,) bool and the skips [(task_id, reason)] of the
    text prior's gaps, too small banks and too few abnormal references."""
    usable, text_skips = _without_clip_gaps(group, sources, usable, detector, prior, weight)
    support, heldout, scoreable, bank_skips = usable_banks(
        group, usable, (detector.min_bank(False), detector.min_bank(True)), detector.label, f"; {detector.bank_hint}")
    abnormal, scoreable, abnormal_skips = _abnormal_references(group, usable, detector, scoreable)
    return usable, support, heldout, abnormal, scoreable, text_skips + bank_skips + abnormal_skips


_NON_FINITE = ("{label} gave non-finite scores (a degenerate support set, e.g. duplicate images); "
               "use another detector or a larger support set")


def _add_text_prior(detector, prior, weight: float, rows: np.ndarray, real_ids: np.ndarray, real_ok: np.ndarray,
                    real_scores: np.ndarray, queries: np.ndarray, synth_scores: np.ndarray) -> None:
    """Add ``weight × prior`` in place to the real scores (T', Q) of ``real_ids`` (Q,) where
    ``real_ok`` (Q,) and to the synthetic scores (T', W) of ``queries`` (T', W), -1 padded."""
    if prior is None:
        raise ValueError(f"{detector.label} adds a CLIP text prior; pass prior= (run_sweep builds it from the store's CLIP embeddings)")
    real_scores[:, real_ok] += weight * prior(rows, real_ids[real_ok])
    synth_scores += weight * np.where(queries >= 0, prior(rows, np.maximum(queries, 0)), 0.0)


def _without_clip_gaps(group: TaskGroup, sources: list[str], usable: np.ndarray, detector, prior, weight: float):
    """``usable`` (N,) less the images the text prior cannot score (no CLIP embedding), and a skip
    for each task that loses some; ``usable`` as it is without a text prior."""
    if not (weight and prior is not None):
        return usable, []
    # the prior cannot score an image without a CLIP embedding: leave it out, and say so per task
    text_skips = _text_prior_skips(group, sources, usable & ~prior.usable, detector, prior)
    return usable & prior.usable, text_skips


def _abnormal_references(group: TaskGroup, usable: np.ndarray, detector, scoreable: np.ndarray):
    """For detectors with ``needs_abnormal``: the ``usable`` (N,) abnormal references (T, R) of every task,
    ``scoreable`` (T,) less the tasks with fewer than ``detector.min_abnormal``, and their skips;
    otherwise ``(None, scoreable, [])``."""
    if not detector.needs_abnormal:
        return None, scoreable, []
    abnormal = usable_ids(getattr(group, "abnormal", np.full((len(group.task_ids), 0), -1, dtype=np.int64)), usable)
    n_abnormal = (abnormal >= 0).sum(axis=1)
    short = scoreable & (n_abnormal < detector.min_abnormal)
    skips = [(int(t), f"{detector.label} needs at least {detector.min_abnormal} abnormal references, the task has {n}; "
                      "hold some synthetic anomalies apart with `swsa split-refs --store STORE --source SOURCE "
                      "--share 0.25` (or a larger share)")
             for t, n in zip(group.task_ids[short], n_abnormal[short])]
    return abnormal, scoreable & ~short, skips


def _drawn_references(detector, support: np.ndarray, task_ids: np.ndarray, rows: np.ndarray, n_tasks: int) -> np.ndarray:
    """(n_tasks, K) image ids of the references ``detector.references`` draws from the banks
    ``support`` (T', S) of tasks ``rows`` (-1 where none, and for every other task)."""
    positions = np.asarray(detector.references(support >= 0, task_ids), dtype=np.int64)
    drawn = np.full((n_tasks, positions.shape[1]), -1, dtype=np.int64)
    drawn[rows] = np.where(positions >= 0, np.take_along_axis(support, np.maximum(positions, 0), 1), -1)
    return drawn


@dataclass
class _DetectorPass:
    """What every scoring call of one candidate over the scoreable tasks of one group shares."""

    detector: object
    features: np.ndarray  # prepared rows, indexed by image id on the first axis
    support: np.ndarray  # (T', S) bank image ids, -1 padded
    abnormal: np.ndarray | None  # (T', R) abnormal reference ids, for detectors that need them
    task_ids: np.ndarray  # (T',)
    chunk_bytes: int
    flops: list = field(default_factory=lambda: [0.0])  # distance-like multiply-adds so far

    def task_scores(self, queries: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
        """Scores of per-task queries (T', W): :func:`_task_chunks`."""
        return _task_chunks(self.detector, self.features, queries, self.support, exclude, self.abnormal, self.task_ids,
                            self.chunk_bytes, self.flops)

    def shared_scores(self, query_ids: np.ndarray) -> np.ndarray:
        """Scores of queries (Q,) shared by every task: :func:`_shared_chunks`."""
        return _shared_chunks(self.detector, self.features, query_ids, self.support, self.abnormal, self.task_ids,
                              self.chunk_bytes, self.flops)


def _real_detector_scores(scorer: _DetectorPass, group: TaskGroup, real_ok: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(T', Q) scores of ``group.real_ids`` for the scorer's tasks, NaN off ``member`` (T', Q)."""
    widest = int(member.sum(axis=1).max(initial=0))
    real_scores = np.full(member.shape, np.nan)
    if scorer.detector.supports_shared and widest and int(real_ok.sum()) <= 1.5 * widest:
        # tasks share their real validation images (one-vs-rest): one set of queries, every bank
        real_scores[:, real_ok] = scorer.shared_scores(group.real_ids[real_ok])
        real_scores[~member] = np.nan
    elif widest:
        # each task has its own real images (a product's test set): per-task queries
        order, present, own = own_real_queries(group, member, widest)
        put_real(real_scores, order, present, scorer.task_scores(own, None), member)
    return real_scores


def _text_prior_skips(group: TaskGroup, sources: list[str], missing: np.ndarray, detector, prior) -> list:
    """``[(task_id, reason)]`` for each task of ``group`` with images (support, real or synthetic
    validation of ``sources``, abnormal references if the detector uses them) that ``missing``
    (N,) bool marks: usable by the backbone but without the CLIP embedding the text prior needs."""
    if not missing.any():
        return []
    parts = [group.support, np.where(group.real_label >= 0, group.real_ids[None, :], -1)]
    parts += [group.synthetic[s] for s in sources if s in group.synthetic]
    if detector.needs_abnormal:
        parts.append(group.abnormal)
    ids = np.concatenate([np.asarray(part, dtype=np.int64) for part in parts], axis=1)  # (T, W), -1 padded
    ids = np.sort(np.where((ids >= 0) & missing[np.maximum(ids, 0)], ids, -1), axis=1)
    counts = ((ids >= 0) & (np.diff(ids, axis=1, prepend=-1) != 0)).sum(axis=1)  # distinct ids per task
    model = prior.model
    return [(int(t), f"{detector.label} left out {n} of the task's images that have no CLIP embedding {model!r}, which "
                     f"its text prior needs; embed them with `swsa embed --store STORE --backbone "
                     f"{model.replace('clip-', 'clip/', 1)}`")
            for t, n in zip(group.task_ids[counts > 0], counts[counts > 0])]


def _task_chunks(detector, features, queries, support, exclude, abnormal, task_ids, chunk_bytes, flops) -> np.ndarray:
    """``detector.score_tasks`` over per-task query ids (T, W) and bank ids (T, S), chunked over
    tasks so that one chunk's arrays stay near ``chunk_bytes``; (T, W) float64, NaN for padding."""
    scores = np.full(queries.shape, np.nan)
    if queries.shape[1] == 0 or len(queries) == 0:
        return scores
    dim = int(np.prod(features.shape[1:]))
    width, bank = queries.shape[1], support.shape[1]
    n_abnormal = 0 if abnormal is None else abnormal.shape[1]
    per_task = 8 * (4 * (width + bank + n_abnormal) * dim + 6 * (width + bank) * (bank + n_abnormal))
    chunk = max(1, chunk_bytes // max(1, per_task))
    for lo in range(0, len(queries), chunk):
        hi = min(lo + chunk, len(queries))
        q_ids, b_ids = queries[lo:hi], support[lo:hi]
        if not (q_ids >= 0).any():
            continue
        extra = {}
        if abnormal is not None:
            extra = {"abnormal": features_for(features, abnormal[lo:hi]), "abnormal_mask": abnormal[lo:hi] >= 0}
        scores[lo:hi] = detector.score_tasks(
            features_for(features, q_ids), q_ids >= 0, features_for(features, b_ids), b_ids >= 0,
            np.full(q_ids.shape, -1, dtype=np.int64) if exclude is None else exclude[lo:hi],
            task_ids=task_ids[lo:hi], **extra)
        flops[0] += 2.0 * float((q_ids >= 0).sum()) * (bank + n_abnormal) * dim
    return scores


def _shared_chunks(detector, features, query_ids, support, abnormal, task_ids, chunk_bytes, flops) -> np.ndarray:
    """``detector.score_shared`` of the shared queries ``query_ids`` (Q,) against every task's
    bank, chunked over tasks and then over queries; (T, Q) float64."""
    n_tasks, bank = support.shape
    dim = int(np.prod(features.shape[1:]))
    n_abnormal = 0 if abnormal is None else abnormal.shape[1]
    per_task = 8 * (3 * (bank + n_abnormal) * dim + 6 * bank * bank)
    task_chunk = max(1, min(n_tasks, chunk_bytes // max(1, per_task)))
    out = np.full((n_tasks, len(query_ids)), np.nan)
    for lo in range(0, n_tasks, task_chunk):
        hi = min(lo + task_chunk, n_tasks)
        b_ids = support[lo:hi]
        bank_rows = features_for(features, b_ids)
        extra = {}
        if abnormal is not None:
            extra = {"abnormal": features_for(features, abnormal[lo:hi]), "abnormal_mask": abnormal[lo:hi] >= 0}
        per_query = 8 * ((hi - lo) * 6 * (bank + n_abnormal + min(dim, bank)) + 2 * dim)
        query_chunk = max(1, chunk_bytes // max(1, per_query))
        for q_lo in range(0, len(query_ids), query_chunk):
            q_hi = min(q_lo + query_chunk, len(query_ids))
            out[lo:hi, q_lo:q_hi] = detector.score_shared(
                features[query_ids[q_lo:q_hi]], bank_rows, b_ids >= 0, task_ids=task_ids[lo:hi], **extra)
        flops[0] += 2.0 * len(query_ids) * float((b_ids >= 0).sum() + (0 if abnormal is None else (abnormal[lo:hi] >= 0).sum())) * dim
    return out


def detector_features(store_path, name: str, detector, features: np.ndarray, usable: np.ndarray):
    """What ``detector`` scores for feature source ``name``: ``(prepared features, usable rows, None)``,
    or ``(None, None, reason)`` when they cannot be had (patch tokens not embedded).

    Detectors with ``needs == "patches"`` read the store's patch tokens through
    ``swsa_engine.run.patch_features.load_patch_features(store_path, name)`` (an array indexed by image id, or
    ``(array, usable)``); every other detector gets ``detector.prepare(features)``.
    """
    if detector.needs != "patches":
        return detector.prepare(features), usable, None
    fix = f"run `swsa embed --store {store_path} --backbone {name} --patch-tokens` first"
    with open_store(store_path) as store:
        held = store.patch_sets() if hasattr(store, "patch_sets") else []
    if name not in held:
        return None, None, f"{name} was embedded without patch tokens, which {detector.label} needs; {fix}"
    try:
        loaded = load_patch_features(store_path, name, with_done=True)
    except TypeError:  # an older signature without the done mask
        loaded = load_patch_features(store_path, name)
    patches, rows = loaded if isinstance(loaded, tuple) else (loaded, usable)
    return detector.prepare(patches), np.asarray(rows, dtype=bool) & usable, None


class ReferenceLog:
    """The few-shot residual's drawn references, for the cube's config.

    Per detector label: the seed, ``task_id`` and ``image_ids`` (one row of K ids per task) as
    drawn for the first feature source; a later feature source whose draw differs for some task
    (its usable rows differ) is listed under ``overrides`` with those tasks only.
    """

    def __init__(self):
        self.draws: dict[str, dict] = {}

    def add(self, candidate: str, detector, task_ids: np.ndarray, references: np.ndarray | None) -> None:
        if references is None:
            return
        entry = self.draws.setdefault(detector.label, {"K": int(references.shape[1]), "seed": int(detector.seed),
                                                      "rule": detector.reference_rule, "by_task": {}, "overrides": {}})
        for task_id, row in zip(task_ids.tolist(), references.tolist()):
            known = entry["by_task"].setdefault(int(task_id), row)
            if known != row:
                entry["overrides"].setdefault(candidate, {})[int(task_id)] = row

    def config(self, abnormal_attrs: dict | None) -> dict:
        """Entries for the cube config: ``residual_references`` and ``abnormal_references``."""
        out = {}
        if self.draws:
            out["residual_references"] = {
                label: {"K": e["K"], "seed": e["seed"], "rule": e["rule"], "task_id": list(e["by_task"]),
                        "image_ids": list(e["by_task"].values()),
                        "overrides": {c: {str(t): ids for t, ids in d.items()} for c, d in e["overrides"].items()}}
                for label, e in self.draws.items()}
        if abnormal_attrs:
            out["abnormal_references"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in abnormal_attrs.items()
                                          if k in ("source", "share", "seed", "rule")}
        return out
