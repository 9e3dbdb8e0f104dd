"""Export one candidate of a store, fitted on one task, as a portable detector bundle (:mod:`.bundle`).

:func:`export_detector` is ``swsa export-detector``: it reads the task's support embeddings (the
bank every candidate of the cube was scored against), scores the task's synthetic validation set
exactly as the sweep does (held-out normals leave-one-out, anomalies without their origins under the
cube's protocol: :func:`swsa_engine.run.detector_sweep.synthetic_plan`) and chooses two label-free
thresholds from those scores (:mod:`swsa_engine.core.thresholds`):

* ``normal_quantile``: the split-conformal ``quantile`` (default 0.99) of the held-out normal
  scores: a new normal image is flagged with probability at most ``1 − quantile``. With fewer than
  ``quantile / (1 − quantile)`` held-out normals no finite threshold keeps that promise: the value
  is undefined (null) and the reason recorded;
* ``synthetic_f1``: the F1-optimal threshold of held-out normals against the task's synthetic
  anomalies (every source pooled), with its false-positive rate on the held-out normals.

The default decision threshold is ``normal_quantile``; when it is undefined, ``synthetic_f1``, and
the manifest says why. ``pick`` chooses the candidate with a selection strategy on the store's cube
(:mod:`swsa_engine.core.selection`); strategies that read real labels (the oracle) are refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from swsa_store import open_store
from swsa_store.catalog import resolve_path
from swsa_store.references import read_references
from swsa_store.schema import DONE_WRITTEN, utc_now

from swsa_engine.core.cube import CUBE_RESULT, AurocCube
from swsa_engine.core.detectors import DEFAULT_DETECTOR, candidate_name, parse_detector
from swsa_engine.core.protocol import DEFAULT_PROTOCOL, check_protocol, cube_protocol
from swsa_engine.core.selection import STRATEGIES, as_weights, create_strategy, selection_context, single_candidates
from swsa_engine.core.thresholds import f1_optimal_threshold, normal_quantile_threshold
from swsa_engine.core.validation import usable_ids
from swsa_engine.run.bundle import (ABNORMAL_FILE, BANK_FILE, VALIDATION_FILE, BundleError, check_bundle_folder,
                                    json_number, write_bundle)
from swsa_engine.run.bundle_detector import check_bundleable, detector_record
from swsa_engine.run.bundle_ensemble import MEMBERS_DIR, member_weights, members_folder, write_ensemble_bundle
from swsa_engine.run.cube_io import load_cube, stored_results
from swsa_engine.run.detector_sweep import detector_features, synthetic_plan
from swsa_engine.run.group_scoring import features_for, kernel_exclude
from swsa_engine.run.task_groups import build_task_groups

__all__ = ["export_detector", "pick_candidate", "parse_pick", "split_candidate", "fit_thresholds", "DEFAULT_QUANTILE"]

#: the normal-quantile threshold's default quantile: an expected false-positive rate of at most 1 %
DEFAULT_QUANTILE = 0.99
#: the embedding attributes the manifest's ``backbone`` entry copies
_BACKBONE_KEYS = ("backbone", "family", "timm_name", "timm_model", "pretrained_tag", "description", "feature_dim",
                  "n_params", "weights_kind", "weights_origin", "weights_path", "weights_sha256", "weights_package",
                  "weights_package_version", "key_mapping", "image_size", "preprocess", "dtype", "torch_version",
                  "timm_version")
#: the patch-token attributes the manifest's ``patches`` entry copies (patch detectors)
_PATCH_KEYS = ("token_source", "layer", "grid", "n_patches", "patch_dim", "n_prefix_tokens_dropped", "reduction", "dtype")


def parse_pick(text: str) -> tuple[str, dict]:
    """``"swsa:cutpaste"`` → ``("swsa", {"source": "cutpaste"})``; ``"swsa(source=perlin)"`` and plain
    names (``"swsa_mean"``) too."""
    match = re.fullmatch(r"\s*([A-Za-z_][\w-]*)\s*(?::\s*(\S+)|\((.*)\))?\s*", str(text))
    if not match:
        raise ValueError(f"cannot read --pick {text!r}; write a strategy name, e.g. swsa:cutpaste, swsa_mean or swsa_rank")
    name, source, body = match.groups()
    settings = {"source": source} if source else {}
    for part in filter(None, (p.strip() for p in (body or "").split(","))):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"cannot read setting {part!r} of --pick {text!r}; write key=value")
        settings[key] = value
    return name, settings


def pick_candidate(cube: AurocCube, task_id: int, pick: str) -> tuple[str, dict]:
    """The candidate a selection strategy ``pick`` (:func:`parse_pick`) chooses for ``task_id`` on
    ``cube``, and how (strategy, settings, ties). Ties go to the first candidate in cube order."""
    name, settings = parse_pick(pick)
    if STRATEGIES.get(name).uses_labels:
        raise ValueError(f"strategy {name!r} reads the real test labels; a detector to use must be chosen without "
                         "them: pick with swsa:SOURCE, swsa_mean or swsa_rank")
    rows = np.flatnonzero(cube.tasks["task_id"].to_numpy() == int(task_id))
    if rows.size == 0:
        raise ValueError(f"task {task_id} is not in the store's cube (tasks {cube.tasks['task_id'].tolist()[:10]}...); "
                         "run `swsa score` again")
    try:
        strategy = create_strategy(name, **settings)
    except TypeError as error:
        raise ValueError(f"strategy {name!r} needs other settings ({error}); e.g. --pick {name}:SOURCE with a source "
                         f"of {', '.join(cube.config.get('base_sources', cube.sources))}") from None
    ctx = selection_context(cube, rows, 0)
    weights = as_weights(strategy(ctx), len(cube.candidates))[0]
    if not np.isfinite(weights).any() or np.nanmax(weights) <= 0:
        raise ValueError(f"strategy {pick!r} picks nothing for task {task_id}: its synthetic AUROCs are all undefined "
                         f"(see `swsa info --store STORE` for the task's skips)")
    names = cube.candidate_names
    best = np.flatnonzero(weights == np.nanmax(weights))
    chosen = names[int(best[0])]
    return chosen, {"how": "pick", "strategy": name, "settings": settings, "weight": float(weights[best[0]]),
                    "tied_with": [names[int(i)] for i in best[1:]]}


def split_candidate(name: str, held: list[str], imported: list[str]):
    """``(feature source, detector)`` of candidate ``name`` (``source`` or ``source/label``); one-line
    errors for imported scores (no features), unknown sources and detectors a bundle cannot hold
    (:func:`swsa_engine.run.bundle_detector.check_bundleable`)."""
    if name in imported and name not in held:
        raise ValueError(f"candidate {name!r} is an imported score set: it has no features or detector to export; "
                         f"export a candidate of the store's embeddings ({', '.join(held) or 'none held'})")
    feature, _, label = name.partition("/")
    if feature not in held:
        raise ValueError(f"the store has no embeddings {feature!r} for candidate {name!r}; held: {', '.join(held) or 'none'}")
    detector = parse_detector(label) if label else DEFAULT_DETECTOR
    check_bundleable(detector)
    return feature, detector


def fit_thresholds(scores: np.ndarray, is_anomaly: np.ndarray, quantile: float) -> dict:
    """The label-free thresholds from validation ``scores`` (W,) of held-out normals (``is_anomaly``
    False) and synthetic anomalies (True); see the module docstring."""
    normals = scores[~is_anomaly]
    n_normal = int(normals.size)
    q_value = normal_quantile_threshold(normals, quantile=quantile)
    quantile_rule = {
        "value": json_number(q_value), "rule": "split-conformal quantile of held-out normal scores",
        "quantile": float(quantile), "expected_fpr": round(1.0 - float(quantile), 12), "n_heldout_normals": n_normal,
        "scored": "held-out normals leave-one-out against the bank",
    }
    if not np.isfinite(q_value):
        need = int(np.ceil(float(quantile) / (1.0 - float(quantile)) - 1e-9))
        quantile_rule["undefined_reason"] = (f"{n_normal} held-out normals are too few for quantile {quantile} (at least "
                                             f"{need} needed); export with --quantile {np.floor(1000 * n_normal / (n_normal + 1)) / 1000:.3f} or lower")
    threshold, f1, fpr = f1_optimal_threshold(scores, is_anomaly)
    f1_rule = {"value": json_number(threshold), "rule": "F1-optimal on held-out normals vs synthetic anomalies",
               "f1": json_number(f1), "fpr_heldout_normals": json_number(fpr), "n_heldout_normals": n_normal,
               "n_synthetic_anomalies": int(is_anomaly.sum())}
    if not np.isfinite(threshold):
        f1_rule["undefined_reason"] = "the synthetic validation set lacks normals or anomalies"
    return {"normal_quantile": quantile_rule, "synthetic_f1": f1_rule}


def _default_threshold(thresholds: dict) -> tuple[str, str]:
    if thresholds["normal_quantile"]["value"] is not None:
        return "normal_quantile", "the split-conformal normal quantile (expected FPR stated)"
    if thresholds["synthetic_f1"]["value"] is not None:
        return "synthetic_f1", "normal_quantile is undefined: " + thresholds["normal_quantile"]["undefined_reason"]
    raise BundleError("no label-free threshold is defined for this task: " + thresholds["normal_quantile"]["undefined_reason"])


def _read_store(store_path, feature: str, task_id: int, detector) -> dict:
    """What an export reads from the store: catalog, the task's tables, the rows the detector scores
    (embeddings, or patch tokens for patch detectors, both as stored) and their usable rows."""
    with open_store(store_path) as store:
        images = store.images()
        tasks, members = store.tasks(), store.task_members()
        references = read_references(store)
        attrs = store.embedding_attrs(feature).get("config", {})
        done = store.done_mask(feature)
        features = store.embeddings(feature)
        patch_attrs = store.patch_attrs(feature) if feature in store.patch_sets() else {}
    task = tasks[tasks["task_id"] == int(task_id)]
    if task.empty:
        raise ValueError(f"store {store_path} has no task {task_id}; its tasks: {tasks['task_id'].tolist()[:20]}")
    if task["status"].iloc[0] != "ok":
        raise ValueError(f"task {task_id} was skipped when catalogued: {task['skip_reason'].iloc[0]}")
    usable = (images["status"] == "ok").to_numpy() & (done == DONE_WRITTEN) & np.isfinite(features).all(axis=1)
    if detector.needs == "patches":
        features, usable, reason = detector_features(store_path, feature, detector, features, usable)
        if reason:
            raise ValueError(reason)
    return {"images": images, "task": task, "members": members, "references": references, "attrs": attrs,
            "features": features, "usable": usable, "patch_attrs": patch_attrs}


def _validation_scores(read: dict, detector, protocol: str):
    """The task's bank (support ids, -1 masked), abnormal reference ids, and the synthetic validation
    queries, their labels, sources and scores, as the sweep computes them."""
    group = build_task_groups(read["images"], read["task"], read["members"], read["references"])[0]
    usable, features = read["usable"], read["features"]
    support = usable_ids(group.support[:1], usable)
    support = support[:, : int(np.flatnonzero(group.support[0] >= 0).max(initial=-1)) + 1]
    task_ids = group.task_ids[:1]
    sources = sorted(group.synthetic)
    plan = synthetic_plan(group, np.array([0]), support, usable, sources, detector, protocol, False)
    if not plan.keep[0] or (support >= 0).sum() < detector.min_bank(True):
        reasons = "; ".join(r for _, r in plan.skips) or f"{detector.label} needs {detector.min_bank(True)} usable support images"
        raise ValueError(f"task {int(task_ids[0])} cannot be scored by {detector.label}: {reasons}")
    prepared = detector.prepare(features)
    extra, abnormal = {}, np.empty(0, dtype=np.int64)
    if detector.needs_abnormal:
        abnormal = usable_ids(group.abnormal[0], usable)
        abnormal = abnormal[abnormal >= 0]
        extra = {"abnormal": prepared[abnormal][None], "abnormal_mask": np.ones((1, len(abnormal)), dtype=bool)}
    queries = plan.queries
    scores = detector.score_tasks(features_for(prepared, queries), queries >= 0, features_for(prepared, support),
                                  support >= 0, kernel_exclude(plan.exclude), task_ids=task_ids, **extra)
    present = queries[0] >= 0
    labels = np.repeat(np.arange(len(plan.widths)), plan.widths)[present]
    if not np.isfinite(scores[0][present]).all():
        raise ValueError(f"{detector.label} gave non-finite validation scores for task {int(task_ids[0])} (a degenerate "
                         "support set); export another candidate")
    return support[0], abnormal, queries[0][present], labels, sources, scores[0][present]


def _image_entries(images: pd.DataFrame, store_path, ids: np.ndarray) -> dict:
    """``image_ids``, ``paths`` (resolved) and ``sha256`` of catalog ids (-1: a masked slot, "")."""
    paths = images["path"].to_numpy()
    digests = images["sha256"].to_numpy() if "sha256" in images else np.full(len(images), "", dtype=object)
    return {"image_ids": [int(i) for i in ids],
            "paths": [str(resolve_path(store_path, paths[i])) if i >= 0 else "" for i in ids],
            "sha256": [str(digests[i]) if i >= 0 else "" for i in ids]}


def _patch_record(attrs: dict) -> dict:
    """The manifest's ``patches`` entry: the patch-token attributes of :data:`_PATCH_KEYS` as JSON values."""
    return {k: (v.tolist() if isinstance(v, np.ndarray | np.generic) else v) for k, v in attrs.items() if k in _PATCH_KEYS}


def _stored_cube(store_path) -> AurocCube | None:
    """The store's cube, or None when it holds none yet."""
    return load_cube(store_path) if CUBE_RESULT in stored_results(store_path) else None


def _candidate_record(name: str, feature: str, detector, chosen_by: dict, cube, task_id: int) -> dict:
    """The manifest's ``candidate``; ``detector`` None: an ensemble (its name as given, no feature source)."""
    record = {"name": name if detector is None else candidate_name(feature, detector), "feature_source": feature,
              "chosen_by": chosen_by}
    if cube is not None and record["name"] in cube.candidate_names:
        row = np.flatnonzero(cube.tasks["task_id"].to_numpy() == int(task_id))
        if row.size:
            column = cube.candidate_names.index(record["name"])
            record["cube_synthetic_auroc"] = {s: json_number(v) for s, v in zip(cube.sources, cube.synthetic[row[0], column])}
    return record


def export_detector(store_path: str | os.PathLike, task_id: int, out: str | os.PathLike, *, candidate: str | None = None,
                    pick: str | None = None, quantile: float = DEFAULT_QUANTILE, protocol: str | None = None) -> dict:
    """Write the bundle of one candidate (``candidate`` named, or chosen by the strategy ``pick`` on
    the store's cube) fitted on task ``task_id`` into ``out``; returns its manifest (see :mod:`.bundle`).
    An ensemble candidate of the cube is written as an ensemble bundle (:mod:`.bundle_ensemble`)."""
    if (candidate is None) == (pick is None):
        raise ValueError("give exactly one of --candidate NAME and --pick STRATEGY")
    cube = _stored_cube(store_path)
    if pick is not None:
        if cube is None:
            raise ValueError(f"--pick needs the store's cube; run `swsa score --store {store_path}` first")
        candidate, chosen_by = pick_candidate(cube, task_id, pick)
    else:
        chosen_by = {"how": "named"}
    protocol = check_protocol(protocol or (cube_protocol(cube.config) if cube is not None else DEFAULT_PROTOCOL))
    if cube is not None and candidate in cube.candidate_names and \
            not single_candidates(cube.candidates)[cube.candidate_names.index(candidate)]:
        return _export_ensemble(store_path, task_id, Path(out), candidate, chosen_by, cube, quantile, protocol)
    return _export_single(store_path, task_id, out, candidate, chosen_by, cube, quantile, protocol)


def _export_ensemble(store_path, task_id: int, out: Path, name: str, chosen_by: dict, cube: AurocCube,
                     quantile: float, protocol: str) -> dict:
    """Each member of ensemble ``name`` on the task as a single bundle under ``out/members``, then the ensemble's manifest."""
    method, weights = member_weights(cube.config, name, task_id)
    check_bundle_folder(out, (MEMBERS_DIR,))
    folder = members_folder(out)
    members = []
    for i, member in enumerate(weights):
        members.append(folder / f"{i:02d}")
        _export_single(store_path, task_id, members[-1], member, {"how": "member", "ensemble": name}, cube, quantile,
                       protocol)
    row = cube.tasks[cube.tasks["task_id"] == int(task_id)].iloc[0]
    common = {"created_utc": utc_now(), "candidate": _candidate_record(name, "", None, chosen_by, cube, task_id),
              "task": {"task_id": int(task_id), "dataset": str(row["dataset"]), "normal_class": str(row["normal_class"]),
                       "store": str(Path(store_path).resolve()), "protocol": protocol}}
    return write_ensemble_bundle(out, name, method, weights, members, common, quantile)


def _export_single(store_path, task_id: int, out, candidate: str, chosen_by: dict, cube: AurocCube | None,
                   quantile: float, protocol: str) -> dict:
    """The bundle of the single candidate ``candidate`` (see :func:`export_detector`)."""
    with open_store(store_path) as store:
        held, imported = store.backbones(), store.score_sets()
    feature, detector = split_candidate(candidate, held, imported)
    read = _read_store(store_path, feature, task_id, detector)
    support, abnormal, val_ids, val_part, sources, scores = _validation_scores(read, detector, protocol)
    is_anomaly = val_part > 0
    thresholds = fit_thresholds(scores, is_anomaly, quantile)
    default, why = _default_threshold(thresholds)
    rows = read["features"][np.maximum(support, 0)]
    present = (support >= 0).reshape((-1,) + (1,) * (rows.ndim - 1))
    bank = np.where(present, rows, 0).astype(np.float16 if detector.needs == "patches" else np.float32)
    task = read["task"].iloc[0]
    attrs = read["attrs"]
    manifest = {
        "created_utc": utc_now(),
        "candidate": _candidate_record(candidate, feature, detector, chosen_by, cube, task_id),
        "backbone": {"embedding": feature, **{k: attrs.get(k) for k in _BACKBONE_KEYS}, "embedding_config": attrs},
        **({"patches": _patch_record(read["patch_attrs"])} if detector.needs == "patches" else {}),
        "detector": detector_record(detector, support >= 0, support, task_id),
        "task": {"task_id": int(task_id), "dataset": str(task["dataset"]), "normal_class": str(task["normal_class"]),
                 "store": str(Path(store_path).resolve()), "protocol": protocol},
        "bank": {"file": BANK_FILE, **_image_entries(read["images"], store_path, support)},
        "validation": {"file": VALIDATION_FILE, "image_ids": val_ids.tolist(), "is_anomaly": is_anomaly.tolist(),
                       "source": [(["heldout-normal"] + sources)[p] for p in val_part], "protocol": protocol},
        "thresholds": thresholds,
        "default_threshold": default,
        "default_threshold_reason": why,
        "decision": "anomaly when score >= threshold",
    }
    arrays = {BANK_FILE: bank, VALIDATION_FILE: scores.astype(np.float64)}
    if detector.needs_abnormal:
        manifest["abnormal"] = {"file": ABNORMAL_FILE, **_image_entries(read["images"], store_path, abnormal)}
        arrays[ABNORMAL_FILE] = read["features"][abnormal].astype(np.float32)
    write_bundle(out, manifest, arrays)
    return manifest
