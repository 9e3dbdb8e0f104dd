"""SWSA over CLIP prompts and BLISS settings: AUROC cubes whose candidates are prompts.

Same tasks, same real validation sets (one-vs-rest and one-vs-closest) and same synthetic
validation sets (held-out normals vs each source's anomalies, plus the N hardest) as the kNN
sweep (:mod:`swsa_engine.run.sweep`), evaluated by the same :func:`~swsa_engine.core.metrics.auroc` and
:func:`~swsa_engine.core.cube.grouped_auroc`, stored as the same :class:`~swsa_engine.core.cube.AurocCube`
(:func:`swsa_engine.run.cube_io.save_cube`):

* ``/results/prompt_cube``: candidates ``prompt01`` … ``prompt10`` (the prompt set's template
  pairs, ``prompt01`` the default) and ``ensemble`` (the prompt ensemble baseline), scored with
  the zero-shot two-prompt logit :func:`~swsa_engine.core.clip_scores.two_prompt_logit`. Selection
  (SWSA, default prompt, oracle) runs over the ten prompts; the ensemble is reported beside them.
* ``/results/bliss_cube``: candidates ``bliss_l<λ>_k<K>`` for the λ × K grid.

Every score is one batched array expression over a chunk of tasks and all their images: the
prompt logits are one matrix product ``Ẑ · (s·(t̂_a − t̂_n))`` for every template at once; BLISS
finds each image's top dictionary entries once (for the largest K) and standardises them with
per-task statistics gathered in one indexing operation.

The tables over these cubes are in :mod:`swsa_engine.report.clip_tables`; the paper-scale timing
on random arrays in :mod:`swsa_engine.app.bench_clip`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from swsa_store import StoreError, open_store
from swsa_store.locks import writes_store
from swsa_store.models.clip import text_model_name
from swsa_store.models.prompts import templates_used
from swsa_store.references import read_references
from swsa_store.schema import DONE_TODO, DONE_WRITTEN

from swsa_engine.core.clip_scores import DEFAULT_EPS, bliss_from_similarities, l2_normalize, prompt_ensemble, topk_similarities
from swsa_engine.core.cube import (BLISS_CUBE, BLISS_DEFAULT, BLISS_KS, BLISS_LAMBDAS, ENSEMBLE, PROMPT_CUBE, AurocCube,
                                   bliss_name, grouped_auroc, prompt_name)
from swsa_engine.core.metrics import UndefinedMetricWarning, auroc
from swsa_engine.core.score_cube import two_part_auroc
from swsa_engine.core.validation import usable_ids
from swsa_engine.run.cube_io import save_cube
from swsa_engine.run.cube_layout import CubeLayout
from swsa_engine.run.task_groups import TaskGroup, build_task_groups, rest_mask

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# the generic cube builder: a scorer gives (T, C, Q) scores for any query ids
# --------------------------------------------------------------------------------------------


def _support_position(heldout: np.ndarray, support: np.ndarray) -> np.ndarray:
    """(T, H) position of each held-out id in its task's support row (−1 if absent / padding)."""
    match = (heldout[:, :, None] == support[:, None, :]) & (heldout[:, :, None] >= 0)
    return np.where(match.any(axis=2), match.argmax(axis=2), -1)


def _auroc_quiet(scores, labels, mask):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return auroc(scores, labels, mask=mask)


def _guard(scores: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace non-finite scores by 0 and report (T, C) cells that had one among included entries."""
    bad = (~np.isfinite(scores) & mask).any(axis=-1)
    return np.where(np.isfinite(scores), scores, 0.0), bad


@dataclass
class _GroupQueries:
    """What one task group's scorer is asked about, laid out once for every chunk of tasks."""

    real_ok: np.ndarray  # (R,) bool: which of the group's real-validation images are usable
    real_ids: np.ndarray  # (R',) the usable real-validation ids, shared by every task
    queries: np.ndarray  # (T, W) held-out normals, then each source's anomalies (−1 padding)
    offsets: np.ndarray  # (len(sources) + 2,) column boundaries of those parts in ``queries``
    exclude: np.ndarray  # (T, W) support position each held-out normal leaves out (−1: none)


def _group_queries(group: TaskGroup, usable: np.ndarray, sources: list[str]) -> _GroupQueries:
    """The usable query ids of ``group`` for the synthetic ``sources`` (a source it lacks gets no columns)."""
    n_tasks = len(group.task_ids)
    support = usable_ids(group.support, usable)
    heldout = usable_ids(group.heldout, usable)
    real_ok = usable[group.real_ids]
    parts = [heldout] + [usable_ids(group.synthetic[s], usable) if s in group.synthetic else np.full((n_tasks, 0), -1)
                         for s in sources]
    widths = [p.shape[1] for p in parts]
    queries = np.concatenate(parts, axis=1)
    exclude = np.full(queries.shape, -1, dtype=np.int64)
    exclude[:, : widths[0]] = _support_position(heldout, support)
    return _GroupQueries(real_ok=real_ok, real_ids=group.real_ids[real_ok], queries=queries,
                         offsets=np.cumsum([0] + widths), exclude=exclude)


def score_group_candidates(scorer, group: TaskGroup, usable: np.ndarray, sources: list[str], n_candidates: int, *,
                           hardest=(10, 5), chunk_bytes: int = 256 << 20) -> dict:
    """AUROCs of every candidate for the tasks of one dataset, chunked over tasks.

    ``scorer(rows, query_ids, exclude)`` → ``(len(rows), C, Q)`` scores (higher = more anomalous):
    ``rows`` index the group's tasks, ``query_ids`` is ``(Q,)`` (shared by the rows) or
    ``(len(rows), Q)`` (−1 padding; scores there are ignored), ``exclude`` ``(len(rows), Q)`` the
    position in the task's support row to leave out for that query (−1: none), or ``None``.
    """
    n_tasks, n_groups = len(group.task_ids), len(group.group_names)
    n_hard = len(hardest) * len(sources)
    out = {"real": np.full((n_tasks, n_candidates, 2), np.nan),
           "synthetic": np.full((n_tasks, n_candidates, len(sources) + n_hard), np.nan),
           "per_class": np.full((n_tasks, n_candidates, n_groups), np.nan), "skips": []}
    layout = _group_queries(group, usable, sources)
    per_task = max(1, n_candidates * (len(layout.real_ids) + layout.queries.shape[1]) * 8 * 12)
    chunk = max(1, chunk_bytes // per_task)
    for lo in range(0, n_tasks, chunk):
        rows = np.arange(lo, min(lo + chunk, n_tasks))
        real_rest, closest, per_class, bad = _score_real(scorer, group, layout, rows, n_candidates)
        out["real"][rows, :, 0], out["real"][rows, :, 1], out["per_class"][rows] = real_rest, closest, per_class
        bad_tasks = bad.any(axis=1)
        if layout.queries.shape[1]:  # a group without synthetic or held-out queries has real AUROCs only
            values, bad_s = _score_synthetic(scorer, layout, rows, len(sources), hardest)
            if values is not None:
                out["synthetic"][rows] = values
            bad_tasks |= bad_s.any(axis=1)
        for r in rows[bad_tasks]:
            out["skips"].append((int(group.task_ids[r]), "non-finite scores (too few usable support images?)"))
    return out


def _score_real(scorer, group: TaskGroup, layout: _GroupQueries, rows: np.ndarray, n_candidates: int) -> tuple:
    """One-vs-rest and one-vs-closest AUROCs ``(B, C)``, per-class AUROCs ``(B, C, G)`` and the non-finite cells."""
    n_groups = len(group.group_names)
    real_ok = layout.real_ok
    labels = np.where(real_ok[None, :], group.real_label[rows], -1)[:, real_ok].astype(np.int8)
    scores = scorer(rows, layout.real_ids, None)
    mask = np.broadcast_to((labels >= 0)[:, None, :], scores.shape)
    scores, bad = _guard(scores, mask)
    # one-vs-rest: normals against the anomalies of the task's rest groups; per class: every group
    in_rest = rest_mask(group, rows)[:, real_ok]
    real_rest = _auroc_quiet(scores, (labels == 1)[:, None, :], mask & in_rest[:, None, :])
    per_class = grouped_auroc(scores.reshape(-1, scores.shape[-1]), np.repeat(labels, n_candidates, axis=0),
                              np.repeat(group.real_group[rows][:, real_ok], n_candidates, axis=0), n_groups)
    per_class = per_class.reshape(len(rows), n_candidates, n_groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        closest = np.nanmin(per_class, axis=2) if n_groups else np.full(real_rest.shape, np.nan)
    real_rest[bad], closest[bad] = np.nan, np.nan
    per_class[bad] = np.nan
    return real_rest, closest, per_class, bad


def _score_synthetic(scorer, layout: _GroupQueries, rows: np.ndarray, n_sources: int, hardest) -> tuple:
    """Held-out normals vs each source's anomalies (then vs its ``hardest`` ones): ``(B, C, n_sources + n_hard)``
    AUROCs, or ``None`` without sources, and the non-finite cells."""
    q = layout.queries[rows]
    synth = scorer(rows, q, layout.exclude[rows])
    qmask = np.broadcast_to((q >= 0)[:, None, :], synth.shape)
    synth, bad = _guard(synth, qmask)
    offsets = layout.offsets
    normal_scores, normal_mask = synth[..., offsets[0]: offsets[1]], qmask[..., offsets[0]: offsets[1]]
    columns, hard_columns = [], []
    for index in range(n_sources):
        a = synth[..., offsets[index + 1]: offsets[index + 2]]
        am = qmask[..., offsets[index + 1]: offsets[index + 2]]
        columns.append(two_part_auroc(normal_scores, normal_mask, a, am))
        ordered = np.sort(np.where(am, a, np.inf), axis=-1)
        for n in hardest:
            hard = ordered[..., :n]
            hard_columns.append(two_part_auroc(normal_scores, normal_mask, np.where(np.isfinite(hard), hard, 0.0),
                                          np.isfinite(hard)))
    if not columns:
        return None, bad
    values = np.stack(columns + hard_columns, axis=-1)
    values[bad] = np.nan
    return values, bad


def build_cube(scorer_for_group, groups: list[TaskGroup], tasks: pd.DataFrame, usable: np.ndarray,
               candidates: pd.DataFrame, *, hardest=(10, 5), config: dict | None = None) -> AurocCube:
    """Assemble an :class:`AurocCube` over ``groups``; ``scorer_for_group(group)`` returns a scorer."""
    n_cand = len(candidates)
    layout = CubeLayout.of(groups, tasks, n_cand, tuple(hardest))
    base_sources, offsets = layout.base_sources, layout.offsets
    real, synthetic, per_class = layout.real, layout.synthetic, layout.per_class
    skips = []
    for g, group in enumerate(groups):
        span = slice(offsets[g], offsets[g + 1])
        result = score_group_candidates(scorer_for_group(group), group, usable, base_sources, n_cand, hardest=hardest)
        real[span], synthetic[span] = result["real"], result["synthetic"]
        per_class[span, :, : len(group.group_names)] = result["per_class"]
        skips += [(t, "*", reason) for t, reason in result["skips"]]
    config = dict(config or {})
    config.update({"hardest": list(hardest), "base_sources": base_sources})
    return AurocCube(tasks=layout.tasks, candidates=candidates.reset_index(drop=True),
                     sources=layout.sources, real=real, synthetic=synthetic, per_class=per_class, class_names=layout.class_names,
                     skips=pd.DataFrame(skips, columns=["task_id", "candidate", "reason"]), config=config)


# --------------------------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------------------------


def prompt_directions(normal: np.ndarray, anomaly: np.ndarray, logit_scale: float, ensemble: bool = True) -> np.ndarray:
    """``(T, P, D)`` normal and anomaly template embeddings → ``(T, P[+1], D)`` scaled directions
    ``s·(t̂_a − t̂_n)`` (the last one the prompt ensemble's), so that a score is ``ẑ · w``."""
    tn, ta = l2_normalize(np.asarray(normal, np.float64)), l2_normalize(np.asarray(anomaly, np.float64))
    if ensemble:
        tn = np.concatenate([tn, prompt_ensemble(tn)[:, None]], axis=1)
        ta = np.concatenate([ta, prompt_ensemble(ta)[:, None]], axis=1)
    return float(logit_scale) * (ta - tn)


def prompt_scorer(features_unit: np.ndarray, directions: np.ndarray):
    """Scorer for :func:`score_group_candidates`: directions ``(T, C, D)`` of the group's tasks."""

    def score(rows, query_ids, exclude):
        w = directions[rows]
        if query_ids.ndim == 1:
            return np.einsum("qd,tcd->tcq", features_unit[query_ids].astype(np.float64), w, optimize=True)
        z = features_unit[np.maximum(query_ids, 0)].astype(np.float64)
        return np.einsum("tqd,tcd->tcq", z, w, optimize=True)

    return score


def bliss_scorer(features_unit: np.ndarray, topv: np.ndarray, topi: np.ndarray, dictionary_unit: np.ndarray,
                 class_text: np.ndarray, support: np.ndarray, usable: np.ndarray, *, lambdas=BLISS_LAMBDAS,
                 ks=BLISS_KS, eps: float = DEFAULT_EPS, ddof: int = 0):
    """Scorer for :func:`score_group_candidates`: one normal class per task.

    ``topv``/``topi`` ``(N, K0)``: every image's top dictionary similarities; ``class_text`` ``(T, D)``
    the group's class prompts; ``support`` ``(T, S)`` the group's support ids (−1 padding).
    Candidates are ordered λ-major: ``[(λ0, K0), (λ0, K1), ..., (λ1, K0), ...]``.
    """
    support = usable_ids(support, usable)
    cache: dict = {}

    def stats(rows):
        key = (int(rows[0]), int(rows[-1]), len(rows))
        if key not in cache:
            cache.clear()
            s_ids = support[rows]
            s_mask = s_ids >= 0
            z = features_unit[np.maximum(s_ids, 0)].astype(np.float64)  # (B, S, D)
            c = class_text[rows].astype(np.float64)  # (B, D)
            sims = z @ dictionary_unit.T  # (B, S, M)
            w = s_mask[..., None]
            count = s_mask.sum(axis=1)[:, None]
            total = np.where(w, sims, 0.0).sum(axis=1)[:, None]
            squares = np.where(w, sims * sims, 0.0).sum(axis=1)[:, None]
            support_class = np.einsum("bsd,bd->bs", z, c)[:, None]
            cache[key] = (c, support_class, s_mask[:, None], count, total, squares)
        return cache[key]

    def score(rows, query_ids, exclude):
        c, support_class, s_mask, count, total, squares = stats(rows)
        ids = np.maximum(query_ids, 0)
        z = features_unit[ids].astype(np.float64)
        if query_ids.ndim == 1:
            query_class = (c @ z.T)[:, None]  # (B, 1, Q)
        else:
            query_class = np.einsum("bqd,bd->bq", z, c)[:, None]
        out = bliss_from_similarities(query_class, topv[ids], topi[ids], support_class, s_mask, count, total, squares,
                                      ks=ks, lambdas=lambdas, eps=eps, ddof=ddof,
                                      exclude=None if exclude is None else exclude[:, None])
        score_grid = out["score"]  # (L, KK, B, Q)
        n_l, n_k, n_b, n_q = score_grid.shape
        return score_grid.transpose(2, 0, 1, 3).reshape(n_b, n_l * n_k, n_q)

    return score


# --------------------------------------------------------------------------------------------
# from a store
# --------------------------------------------------------------------------------------------


def _inputs(store_path, model):
    with open_store(store_path) as store:
        name = text_model_name(store, model)
        images, tasks, members = store.images(), store.tasks(), store.task_members()
        references = read_references(store)  # abnormal references never validate, for any candidate
        if name not in store.backbones():
            raise StoreError(f"store {store_path} has no image embeddings {name!r}; run `swsa embed --store {store_path} "
                             f"--backbone {name.replace('clip-', 'clip/', 1)}`")
        done, features = store.done_mask(name), store.embeddings(name)
        info = store.embedding_attrs(name).get("config", {})
    usable_images = (images["status"] == "ok").to_numpy()
    pending = np.flatnonzero(usable_images & (done == DONE_TODO))
    if pending.size:
        raise StoreError(f"image embeddings {name!r} are incomplete: {pending.size} images still to embed")
    usable = usable_images & (done == DONE_WRITTEN) & np.isfinite(features).all(axis=1)
    groups = build_task_groups(images, tasks, members, references)
    if not groups:
        raise ValueError(f"store {store_path} has no scoreable tasks")
    unit = l2_normalize(np.where(usable[:, None], features, 0.0).astype(np.float32))
    return name, tasks, groups, unit, usable, info


def per_task_text(text, task_ids: np.ndarray, n_templates: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, P, D) normal and anomaly embeddings for ``task_ids`` (T,) from a prompt set's text
    embeddings ``text`` (:meth:`swsa_store.store.Store.text_embeddings`: ``table`` with task_id, side
    (0 normal, 1 anomaly), template, row; ``embeddings`` (rows, D)); ``n_templates`` = P."""
    table = text.table
    dim = text.embeddings.shape[1]
    out = np.full((2, len(task_ids), n_templates, dim), np.nan, dtype=np.float64)
    position = pd.Series(np.arange(len(task_ids)), index=task_ids)
    mine = table[table["task_id"].isin(task_ids)]
    out[mine["side"].to_numpy(np.int64), position.loc[mine["task_id"]].to_numpy(), mine["template"].to_numpy(np.int64)] = \
        text.embeddings[mine["row"].to_numpy(np.int64)]
    if np.isnan(out).any():
        missing = sorted(set(task_ids) - set(mine["task_id"]))[:5]
        raise ValueError(f"prompt set {text.attrs.get('prompt_set')!r} lacks prompts of tasks {missing}...; "
                         "re-run `swsa embed-text` after adding tasks")
    return out[0], out[1]


@writes_store("swsa score --prompts", when="save")
def run_prompt_sweep(store_path: str | os.PathLike, *, model: str | None = None, prompt_set: str = "paper",
                     hardest=(10, 5), save: bool = True, wait: float | None = 0.0) -> AurocCube:
    """The prompt cube (``prompt01``… and ``ensemble``) for every task; saved as ``/results/prompt_cube``
    (then under the store's writer lock for the whole call; ``wait``: seconds to wait for another writer)."""
    started = time.perf_counter()
    name, tasks, groups, unit, usable, info = _inputs(store_path, model)
    with open_store(store_path) as store:
        text = store.text_embeddings(name, prompt_set)
    n_templates = int(text.attrs.get("n_templates") or (text.table["template"].max() + 1))
    logit_scale = float(text.attrs.get("logit_scale", 100.0))
    templates = json.loads(text.attrs["templates"]) if isinstance(text.attrs.get("templates"), str) else text.attrs.get("templates", {})
    scored = tasks[tasks["task_id"].isin(np.concatenate([g.task_ids for g in groups]))]
    used = templates_used(templates, scored) if templates else [[("", "")]] * n_templates  # the cube's tasks' own

    def scorer_for(group):
        normal, anomaly = per_task_text(text, group.task_ids, n_templates)
        return prompt_scorer(unit, prompt_directions(normal, anomaly, logit_scale))

    candidates = pd.DataFrame({
        "name": [prompt_name(j) for j in range(n_templates)] + [ENSEMBLE],
        "n_params": 0, "feature_dim": unit.shape[1], "weights_kind": str(info.get("weights_kind", "unknown")),
        "family": ["prompt"] * n_templates + ["ensemble"],
        "template": [" ; ".join(f"{n} | {a}" for n, a in pairs) for pairs in used] + ["mean of the templates' embeddings"],
    })
    cube = build_cube(scorer_for, groups, tasks, usable, candidates, hardest=hardest,
                      config={"model": name, "prompt_set": prompt_set, "logit_scale": logit_scale,
                              "templates_used": [[list(pair) for pair in pairs] for pairs in used],
                              "score": "two-prompt logit s*(cos(z,t_a)-cos(z,t_n))", "kind": "prompts"})
    cube.config["seconds"] = round(time.perf_counter() - started, 3)
    if save:
        save_cube(cube, store_path, PROMPT_CUBE)
    return cube


@writes_store("swsa score --bliss", when="save")
def run_bliss_sweep(store_path: str | os.PathLike, *, model: str | None = None, lambdas=BLISS_LAMBDAS, ks=BLISS_KS,
                    eps: float = DEFAULT_EPS, ddof: int = 0, hardest=(10, 5), save: bool = True,
                    wait: float | None = 0.0) -> AurocCube:
    """The BLISS cube over the λ × K grid for every task; saved as ``/results/bliss_cube`` (then under
    the store's writer lock for the whole call; ``wait``: seconds to wait for another writer)."""
    started = time.perf_counter()
    name, tasks, groups, unit, usable, info = _inputs(store_path, model)
    with open_store(store_path) as store:
        classes = store.text_embeddings(name, "bliss")
        dictionary = store.text_embeddings(name, "dictionary")
    cube = bliss_cube_from_arrays(unit, usable, groups, tasks, classes_by_task(classes),
                                  dictionary.embeddings, lambdas=lambdas, ks=ks, eps=eps, ddof=ddof, hardest=hardest,
                                  weights_kind=str(info.get("weights_kind", "unknown")))
    cube.config.update({"model": name, "dictionary_size": len(dictionary.strings), "seconds": round(time.perf_counter() - started, 3)})
    if save:
        save_cube(cube, store_path, BLISS_CUBE)
    return cube


def classes_by_task(text) -> dict[int, np.ndarray]:
    """{task_id: class-prompt embedding} from the ``bliss`` prompt set."""
    return {int(t): text.embeddings[int(r)] for t, r in zip(text.table["task_id"], text.table["row"])}


def bliss_cube_from_arrays(unit, usable, groups, tasks, class_text: dict, dictionary, *, lambdas=BLISS_LAMBDAS,
                           ks=BLISS_KS, eps=DEFAULT_EPS, ddof=0, hardest=(10, 5), weights_kind="unknown") -> AurocCube:
    """The BLISS cube from in-memory arrays (normalised image features ``unit`` (N, D))."""
    dictionary_unit = l2_normalize(np.asarray(dictionary, np.float64))
    topv = np.zeros((len(unit), max(ks)))
    topi = np.zeros((len(unit), max(ks)), dtype=np.int64)
    rows = np.flatnonzero(usable)
    topv[rows], topi[rows] = topk_similarities(unit[rows], dictionary_unit, max(ks))

    def scorer_for(group):
        text = l2_normalize(np.stack([class_text[int(t)] for t in group.task_ids]).astype(np.float64))
        return bliss_scorer(unit, topv, topi, dictionary_unit, text, group.support, usable, lambdas=lambdas, ks=ks,
                            eps=eps, ddof=ddof)

    names = [bliss_name(lam, k) for lam in lambdas for k in ks]
    candidates = pd.DataFrame({"name": names, "n_params": 0, "feature_dim": unit.shape[1], "weights_kind": weights_kind,
                               "family": "bliss", "lam": [float(lam) for lam in lambdas for _ in ks],
                               "k": [int(k) for _ in lambdas for k in ks]})
    return build_cube(scorer_for, groups, tasks, usable, candidates, hardest=hardest,
                      config={"kind": "bliss", "lambdas": list(map(float, lambdas)), "ks": list(map(int, ks)), "eps": eps,
                              "ddof": ddof, "default": bliss_name(*BLISS_DEFAULT)})
