"""Ensemble bundles: an ensemble candidate of the cube (e.g. the recommendation's ``ensemble(mean)``) as a
portable detector, and how it scores new images.

Layout (written by :func:`export_ensemble`, read by :func:`load_ensemble_bundle`)::

    DIR/manifest.json            kind "ensemble": name, combination method, member weights, the
                                 normalisation rule, and per member its folder and manifest_sha256
    DIR/validation_scores.npy    (W,) the ensemble's scores of the task's synthetic validation set
    DIR/members/NN/              each member a complete single-candidate bundle (:mod:`.bundle`:
                                 its bank .npy, backbone, weights sha256, preprocessing, detector,
                                 thresholds, every file hashed)

**Normalisation at predict time** (:func:`reference_cdf`). The cube's ensembles rank-normalise each
member's scores over the pool being scored (a task's real test images); a single new image has no
pool. A bundle therefore keeps, per member, a label-free *reference pool*: the member's scores of the
task's held-out normals, computed as the sweep computes them (leave-one-out against the bank; they are
the member bundle's validation scores of the held-out normals). A new image's member score ``x`` is
normalised to its mid-rank position in that reference, the empirical CDF with ties counted half:
``F(x) = (#{r < x} + #{r = x} / 2) / n``. The ensemble's score is the member combination
(:func:`swsa_engine.core.ensembles.combine_scores`: the (weighted) mean, max, median, AOM or MOA
with the cube's buckets) of those values. Predicted ensemble scores thus differ from the cube's
(normalised over the test pool) — each member's raw score equals the cube's — and the ensemble's
AUROC on the task's test images is close to, not equal to, the cube's.

Loading verifies the top manifest's own hash, its validation file, then every member bundle
(:func:`~swsa_engine.run.bundle.load_bundle`: all its files' hashes) and that each member manifest's
hash is the one recorded: a tampered member file is refused with a one-line :class:`BundleError`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swsa_engine.core.ensembles import COMBINATIONS, combine_scores, normalise_scores, shuffled_buckets
from swsa_engine.core.thresholds import f1_optimal_threshold, normal_quantile_threshold
from swsa_engine.run.bundle import (MANIFEST, VALIDATION_FILE, Bundle, BundleError, json_number, load_bundle,
                                    read_manifest, verified_array, write_bundle)

__all__ = ["ENSEMBLE_KIND", "NORMALISATION_RULE", "NORMALISE_OVER", "EnsembleBundle", "reference_cdf", "combine_members",
           "member_weights", "write_ensemble_bundle", "load_ensemble_bundle", "is_ensemble_bundle"]

ENSEMBLE_KIND = "ensemble"
MEMBERS_DIR = "members"
#: how ``swsa predict`` normalises an ensemble's member scores: each image against the member's
#: reference pool (default), or over the images scored together (as the cube does over a test pool)
NORMALISE_OVER = ("reference", "batch")
NORMALISATION_RULE = ("each member's score x is replaced by its mid-rank position in the member's reference pool R "
                      "(its leave-one-out scores of the task's held-out normals): (#{r < x} + #{r == x} / 2) / |R|")


def reference_cdf(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) mid-rank empirical CDF of ``scores`` within ``reference`` (R,) (:data:`NORMALISATION_RULE`); NaN stays NaN."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    if ref.size == 0 or not np.isfinite(ref).all():
        raise BundleError("a member's reference pool is empty or holds non-finite scores; export the ensemble again")
    x = np.asarray(scores, dtype=np.float64)
    below = np.searchsorted(ref, x, side="left")
    upto = np.searchsorted(ref, x, side="right")
    return np.where(np.isnan(x), np.nan, (below + 0.5 * (upto - below)) / ref.size)


def combine_members(normalised: np.ndarray, method: str, weights: np.ndarray) -> np.ndarray:
    """(M, N) normalised member scores → (N,) ensemble scores by ``method`` (``selected``: the weighted
    mean with ``weights``; AOM / MOA over the cube's :func:`shuffled_buckets`)."""
    values = np.asarray(normalised, dtype=np.float64)[None]
    if method == "selected":
        return combine_scores(values, "mean", weights=np.asarray(weights, dtype=np.float64))[0]
    buckets = shuffled_buckets(values.shape[1], min(5, values.shape[1])) if method in ("aom", "moa") else None
    return combine_scores(values, method, buckets=buckets)[0]


def member_weights(config: dict, name: str, task_id: int) -> tuple[str, dict[str, float]]:
    """``(method, {member: weight})`` of ensemble ``name`` on task ``task_id`` from the cube's
    ``config["ensembles"]`` (the members that were eligible on that task)."""
    entry = config.get("ensembles", {}).get("ensembles", {}).get(name)
    if entry is None:
        raise ValueError(f"the cube records no ensemble {name!r}; its ensembles: "
                         f"{', '.join(config.get('ensembles', {}).get('ensembles', {})) or 'none'}")
    by_task = entry.get("weights", {})
    weights = by_task.get(str(int(task_id)), by_task.get(int(task_id)))
    if not weights:
        raise ValueError(f"{name} has no member on task {task_id} (see the cube's skips); export another candidate")
    if entry["method"] not in (*COMBINATIONS, "selected"):
        raise ValueError(f"{name} combines by {entry['method']!r}, which a bundle cannot reproduce")
    if entry.get("normalisation", "rank") != "rank":  # a bundle normalises by mid-rank CDFs (NORMALISATION_RULE)
        raise ValueError(f"{name} was built on {entry['normalisation']}-normalised scores, and a bundle reproduces rank "
                         "normalisation only; re-run `swsa score` without --ensemble-normalisation, or export a single candidate")
    return entry["method"], {str(k): float(v) for k, v in weights.items()}


def _ensemble_thresholds(scores: np.ndarray, is_anomaly: np.ndarray, quantile: float) -> dict:
    q = normal_quantile_threshold(scores[~is_anomaly], quantile=quantile)
    threshold, f1, fpr = f1_optimal_threshold(scores, is_anomaly)
    return {"normal_quantile": {"value": json_number(q), "rule": "split-conformal quantile of the ensemble's scores of "
                                "the held-out normals", "quantile": float(quantile),
                                "expected_fpr": round(1.0 - float(quantile), 12),
                                **({} if np.isfinite(q) else {"undefined_reason": "too few held-out normals"})},
            "synthetic_f1": {"value": json_number(threshold), "rule": "F1-optimal on held-out normals vs synthetic "
                             "anomalies", "f1": json_number(f1), "fpr_heldout_normals": json_number(fpr),
                             **({} if np.isfinite(threshold) else {"undefined_reason": "no normals or no anomalies"})}}


def write_ensemble_bundle(out: Path, name: str, method: str, weights: dict[str, float], members: list[Path],
                          common: dict, quantile: float) -> dict:
    """Write the top manifest of an ensemble whose member bundles are already in ``members`` (folders
    under ``out``, in the order of ``weights``); returns it."""
    loaded = [load_bundle(m) for m in members]
    ids = [b.manifest["validation"]["image_ids"] for b in loaded]
    if any(i != ids[0] for i in ids[1:]):
        raise ValueError(f"the members of {name} validate on different synthetic queries (a detector's protocol "
                         "limits); export a single candidate instead")
    is_anomaly = np.asarray(loaded[0].manifest["validation"]["is_anomaly"], dtype=bool)
    normalised = np.stack([reference_cdf(b.validation_scores, b.validation_scores[~is_anomaly]) for b in loaded])
    scores = combine_members(normalised, method, np.asarray(list(weights.values())))
    thresholds = _ensemble_thresholds(scores, is_anomaly, quantile)
    default = "normal_quantile" if thresholds["normal_quantile"]["value"] is not None else "synthetic_f1"
    manifest = {**common, "kind": ENSEMBLE_KIND,
                "ensemble": {"name": name, "method": method, "normalisation": NORMALISATION_RULE,
                             "members": [{"name": n, "weight": w, "folder": str(m.relative_to(out)),
                                          "manifest_sha256": b.manifest["manifest_sha256"]}
                                         for (n, w), m, b in zip(weights.items(), members, loaded)]},
                "validation": {"file": VALIDATION_FILE, **loaded[0].manifest["validation"]},
                "thresholds": thresholds, "default_threshold": default,
                "default_threshold_reason": "the normal quantile" if default == "normal_quantile" else
                "normal_quantile is undefined (too few held-out normals)",
                "decision": "anomaly when score >= threshold"}
    write_bundle(out, manifest, {VALIDATION_FILE: scores.astype(np.float64)}, keep_folders=(MEMBERS_DIR,))
    return read_manifest(out)


def members_folder(out: Path) -> Path:
    """``out/members``, emptied (an earlier export's members go)."""
    folder = Path(out) / MEMBERS_DIR
    if folder.exists():
        shutil.rmtree(folder)
    return folder


@dataclass
class EnsembleBundle:
    """A loaded, verified ensemble bundle: its ``manifest``, ``members`` (verified :class:`Bundle`
    each), their ``weights`` (M,), ``references`` (their held-out normal scores) and ``validation_scores``."""

    path: Path
    manifest: dict
    members: list[Bundle]
    weights: np.ndarray
    references: list[np.ndarray]
    validation_scores: np.ndarray

    @property
    def method(self) -> str:
        return self.manifest["ensemble"]["method"]

    def combine(self, member_scores: np.ndarray, normalise_over: str = "reference") -> np.ndarray:
        """(M, N) raw member scores → (N,) ensemble scores, then the combination. ``normalise_over``:
        ``"reference"`` (:data:`NORMALISATION_RULE`: each image on its own, against the member's
        reference pool) or ``"batch"`` (rank-normalised over the N images scored together, exactly as
        the cube normalises over a task's test pool: scoring that pool reproduces the cube's scores)."""
        if normalise_over not in NORMALISE_OVER:
            raise ValueError(f"normalise_over must be one of {', '.join(NORMALISE_OVER)}, got {normalise_over!r}")
        if normalise_over == "batch":
            normalised = normalise_scores(np.asarray(member_scores, dtype=np.float64)[None], None, "rank")[0]
        else:
            normalised = np.stack([reference_cdf(s, r) for s, r in zip(member_scores, self.references)])
        return combine_members(normalised, self.method, self.weights)

    def threshold(self, name=None) -> tuple[str, float]:
        return Bundle.threshold(self, name)  # the same rules and errors as a single bundle's


def is_ensemble_bundle(path: str | os.PathLike) -> bool:
    """True when the bundle at ``path`` is an ensemble (its manifest verified first)."""
    return read_manifest(Path(path)).get("kind") == ENSEMBLE_KIND


def load_ensemble_bundle(path: str | os.PathLike) -> EnsembleBundle:
    """Read and verify the ensemble bundle at ``path`` and all its members; :class:`BundleError` on any mismatch."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("kind") != ENSEMBLE_KIND:
        raise BundleError(f"{path} is a single-candidate bundle, not an ensemble")
    validation = verified_array(path, VALIDATION_FILE, manifest.get("files", {}).get(VALIDATION_FILE, {}))
    members, weights, references = [], [], []
    for entry in manifest["ensemble"]["members"]:
        folder = path / entry["folder"]
        if not (folder / MANIFEST).is_file():
            raise BundleError(f"ensemble bundle {path} lacks its member {entry['name']!r} ({folder})")
        member = load_bundle(folder)
        if member.manifest.get("manifest_sha256") != entry["manifest_sha256"]:
            raise BundleError(f"member {entry['name']!r} of {path} ({folder}) is not the one exported (its manifest "
                              "hash differs); refusing the bundle")
        is_anomaly = np.asarray(member.manifest["validation"]["is_anomaly"], dtype=bool)
        members.append(member)
        weights.append(float(entry["weight"]))
        references.append(member.validation_scores[~is_anomaly])
    return EnsembleBundle(path, manifest, members, np.asarray(weights), references, validation)
