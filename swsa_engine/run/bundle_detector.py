"""How each detector family is written into a bundle and rebuilt from it, without pickle.

A bundle never stores a fitted object. It stores the detector's bank (``bank.npy``: the task's
support rows, or the support images' patch tokens for patch detectors), its abnormal references
when it has them (``abnormal.npy``), and in ``manifest.json`` the detector's label, its
parameters, its seed and the references it draws (:func:`detector_record`). At load time
:func:`check_detector_record` rebuilds the detector from the label (checked against the
parameters and the references) and :func:`swsa_engine.run.bundle_scoring.fit_scorer` refits it
from the stored arrays, deterministically (:data:`BUNDLE_FAMILIES` says how, per family).

Families whose fit cannot be reproduced from stored arrays are refused at export with one line
naming the family (:func:`check_bundleable`): a detector family this table does not list (a
user-registered one: swsa does not know what its fit depends on), and a CLIP text prior (it needs
a second backbone, CLIP, and the task's prompts, which a bundle does not hold yet).

PyOD models are refitted by PyOD itself: their scores are reproducible as long as PyOD and
scikit-learn compute the same fit, so the manifest records both versions and loading a bundle
under other versions warns (:class:`BundleWarning`) with both named.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from importlib import metadata

import numpy as np

from swsa_engine.core.detectors import Detector, parse_detector
from swsa_engine.run.bundle_errors import BundleError, BundleWarning

__all__ = ["BUNDLE_FAMILIES", "check_bundleable", "detector_parameters", "detector_record", "check_detector_record",
           "reference_slots"]

#: how the predictor rebuilds each family from the bundle's arrays (also written into the manifest)
BUNDLE_FAMILIES = {
    "knn": "the bank rows are the fit: sum of the k smallest squared L2 distances to them (exact float64)",
    "gaussian": "mean and Ledoit-Wolf covariance recomputed from the bank rows at load (closed form)",
    "residual": "the K references redrawn from the bank by the seeded hash of (seed, task id, bank slot), as the sweep "
                "drew them (recorded under references)",
    "nagl": "kNN score against the bank rows minus beta x kNN score against abnormal.npy",
    "pca": "bank mean and top principal axes recomputed from the bank rows at load (eigendecomposition of the Gram matrix)",
    "pyod": "PyOD's model fitted once at load on the usable bank rows in bank order, with the stored seed as its "
            "random_state; PyOD and scikit-learn versions recorded",
    "patch": "the bank images' patch tokens as stored (float16); the K references redrawn by "
             "np.random.default_rng([seed, task id]) over the usable bank slots (recorded under references)",
}
#: the libraries whose versions decide a family's refit (checked at load)
_FIT_LIBRARIES = {"pyod": ("pyod", "scikit-learn")}


def check_bundleable(detector: Detector) -> None:
    """A one-line ValueError when a bundle cannot reproduce ``detector``'s scores (module docstring)."""
    if detector.family not in BUNDLE_FAMILIES:
        raise ValueError(f"detector family {detector.family!r} ({detector.label}) cannot be bundled: swsa does not know "
                         f"how to refit it from stored arrays; bundled families: {', '.join(BUNDLE_FAMILIES)}")
    if detector.text_prior:
        raise ValueError(f"{detector.label} (family {detector.family!r}) adds a CLIP text prior, which a bundle cannot "
                         "hold yet (it needs the CLIP backbone and the task's prompts); export the candidate without text=")


def detector_parameters(detector: Detector) -> dict:
    """The detector's parameters as JSON values: its dataclass fields that define its scores (not
    ``device`` or block sizes), PyOD's model and settings flattened."""
    if detector.family == "pyod":
        return _json({"model": detector.model, **dict(detector.settings)})
    if not dataclasses.is_dataclass(detector):
        return {}
    values = dataclasses.asdict(detector)
    return _json({f.name: values[f.name] for f in dataclasses.fields(detector) if f.compare})


def _json(value):
    return json.loads(json.dumps(value))


def _seed(detector: Detector, parameters: dict) -> int | None:
    """The seed of a randomised fit or reference draw (None for deterministic detectors)."""
    if detector.family == "pyod":
        return parameters.get("seed")
    return int(detector.seed) if detector.draws_references else None


def _library_versions(family: str) -> dict:
    out = {"numpy": np.__version__}
    for name in _FIT_LIBRARIES.get(family, ()):
        out[name] = metadata.version(name)
    return out


def reference_slots(detector: Detector, bank_mask: np.ndarray, task_id: int) -> np.ndarray:
    """(K,) bank slots of the references a new image is scored against (detectors that draw them):
    the first K of the draw; every usable slot for ``patch(K=all)``."""
    slots = np.asarray(detector.references(bank_mask[None], np.array([int(task_id)]))[0], dtype=np.int64)
    if slots.size == 0:  # patch(K=all): the whole usable bank
        slots = np.flatnonzero(bank_mask)
    return slots[slots >= 0]


def detector_record(detector: Detector, bank_mask: np.ndarray, bank_ids: np.ndarray, task_id: int) -> dict:
    """The manifest's ``detector`` entry: label, family, parameters, seed, how it is refitted,
    the library versions of the fit, and the references it draws (bank slots and image ids)."""
    check_bundleable(detector)
    parameters = detector_parameters(detector)
    record = {"label": detector.label, "family": detector.family, "parameters": parameters,
              "seed": _seed(detector, parameters), "needs": detector.needs, "refit": BUNDLE_FAMILIES[detector.family],
              "libraries": _library_versions(detector.family)}
    if detector.draws_references:
        slots = reference_slots(detector, bank_mask, task_id)
        record["references"] = {"rule": detector.reference_rule, "bank_slots": slots.tolist(),
                                "image_ids": [int(bank_ids[s]) for s in slots]}
    return record


def check_detector_record(entry: dict, path, bank_mask: np.ndarray, task_id: int) -> Detector:
    """The detector of a manifest's ``detector`` entry, rebuilt from its label; a one-line
    :class:`BundleError` when this swsa reads the label as another detector, other parameters or
    other references; a :class:`BundleWarning` when the fit's libraries have other versions."""
    try:
        detector = parse_detector(entry["label"])
    except ValueError as error:
        raise BundleError(f"bundle {path} holds detector {entry['label']!r}, which this swsa cannot build ({error})") from None
    if detector.label != entry["label"] or detector_parameters(detector) != entry.get("parameters"):
        raise BundleError(f"detector {entry['label']!r} of bundle {path} reads back as {detector.label!r} with parameters "
                          f"{detector_parameters(detector)} in this swsa (the bundle says {entry.get('parameters')}); "
                          "export the detector again with this swsa")
    if detector.family not in BUNDLE_FAMILIES:
        raise BundleError(f"bundle {path} holds a {detector.family!r} detector, which this swsa cannot refit")
    drawn = entry.get("references")
    if drawn is not None and reference_slots(detector, bank_mask, task_id).tolist() != drawn["bank_slots"]:
        raise BundleError(f"{detector.label} draws other references from bundle {path}'s bank in this swsa than at "
                          f"export ({drawn['bank_slots']}); export the detector again with this swsa")
    for name in _FIT_LIBRARIES.get(detector.family, ()):
        version = entry.get("libraries", {}).get(name)
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:  # not installed: fitting the model names the extra to install
            continue
        if here != version:
            warnings.warn(f"{detector.label} of bundle {path} was fitted with {name} {version}; this environment has "
                          f"{name} {here}, whose refit may give other scores than the exported ones", BundleWarning,
                          stacklevel=2)
    return detector
