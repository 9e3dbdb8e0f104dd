"""The detector bundle: a directory that holds one fitted candidate, portable without its store.

A bundle is what ``swsa export-detector`` writes (:func:`swsa_engine.run.bundle_export.export_detector`)
and what ``swsa predict`` reads (:class:`swsa_engine.run.predict.Predictor`)::

    DIR/manifest.json            what the detector is and how it was fitted (below)
    DIR/bank.npy                 the task's support set, the detector's bank: (S, D) float32 embeddings,
                                 or for patch detectors (S, P, D') float16 patch tokens as stored
                                 (slots of unusable support images are zero rows, masked out)
    DIR/abnormal.npy             (R, D) float32: abnormal references (detectors that need them only)
    DIR/validation_scores.npy    (W,) float64: the scores the thresholds were chosen from

Every array is written with ``np.save(..., allow_pickle=False)`` and read with
``np.load(..., allow_pickle=False)``: no pickle anywhere, and no fitted object either: the
predictor refits the detector from these arrays at load time (:mod:`swsa_engine.run.bundle_detector`).
``manifest.json`` holds

* ``schema`` (:data:`BUNDLE_SCHEMA`) and ``schema_version`` (:data:`BUNDLE_SCHEMA_VERSION`), the
  ``swsa_version`` that wrote it and ``created_utc``;
* ``candidate``: its cube name, feature source and how it was chosen (named, or picked by a
  selection strategy on the store's cube);
* ``backbone``: the name, weights (kind, origin, path, sha256, package) and the resolved
  preprocessing, exactly as stored with the embeddings; ``patches`` (patch detectors): the
  token grid, layer and dtype the bank's tokens were made with;
* ``detector``: its label (:func:`~swsa_engine.core.detectors.parse_detector` rebuilds it),
  family, parameters, seed, how it is refitted, the library versions of the fit, and the
  references it draws (:func:`~swsa_engine.run.bundle_detector.detector_record`);
* ``task``: id, dataset, normal class, the store it came from and the validation protocol;
* ``bank``: per slot the image id, path and sha256 of the image it was fitted on (-1 / "" for a masked slot);
* ``thresholds``: each label-free rule with its value and how it was chosen
  (:mod:`swsa_engine.core.thresholds`), and ``default_threshold``;
* ``files``: the sha256, size, dtype and shape of every array file;
* ``manifest_sha256``: the sha256 of the manifest's own canonical JSON without that key.

:func:`load_bundle` checks the schema and its version first (a bundle of another version is refused
with both versions named), then the manifest's own hash, then every file's hash, dtype and shape,
then that this swsa rebuilds the same detector (label, parameters, drawn references): any mismatch
raises :class:`BundleError` (a ``ValueError``) with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swsa_store.models.weights import file_sha256
from swsa_store.schema import swsa_version

from swsa_engine.core.detectors import Detector
from swsa_engine.run.bundle_detector import check_detector_record
from swsa_engine.run.bundle_errors import BundleError, BundleWarning

__all__ = [
    "BUNDLE_SCHEMA", "BUNDLE_SCHEMA_VERSION", "MANIFEST", "BANK_FILE", "ABNORMAL_FILE", "VALIDATION_FILE",
    "BundleError", "BundleWarning", "Bundle", "write_bundle", "load_bundle", "manifest_digest", "json_number", "read_manifest",
    "verified_array", "check_bundle_folder",
]

BUNDLE_SCHEMA = "swsa-detector-bundle"
#: the bundle layout this swsa writes and reads; a bundle of another version is refused
#: (2: detector parameters, seed, refit rule and references recorded; patch banks; PyOD families)
BUNDLE_SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
BANK_FILE = "bank.npy"
ABNORMAL_FILE = "abnormal.npy"
VALIDATION_FILE = "validation_scores.npy"
_DIGEST_KEY = "manifest_sha256"


@dataclass
class Bundle:
    """A loaded, verified bundle: its ``manifest`` (dict), arrays and ``detector`` (rebuilt from its
    label and checked against its parameters).

    bank (S, D) float32 (patch detectors: (S, P, D') float16) with ``bank_mask`` (S,) bool;
    abnormal (R, D) float32 or None; validation_scores (W,) float64.
    """

    path: Path
    manifest: dict
    bank: np.ndarray
    bank_mask: np.ndarray
    abnormal: np.ndarray | None
    validation_scores: np.ndarray
    detector: Detector

    @property
    def task_id(self) -> int:
        return int(self.manifest["task"]["task_id"])

    def threshold(self, name: str | float | None = None) -> tuple[str, float]:
        """``(name, value)`` of threshold ``name`` (a rule of ``manifest["thresholds"]``, a number,
        or None: the default); a one-line :class:`BundleError` for an unknown or undefined rule."""
        if name is None:
            name = self.manifest["default_threshold"]
        try:
            return "given", float(name)
        except ValueError:  # not a number: the name of a rule
            pass
        rules = self.manifest["thresholds"]
        if name not in rules:
            raise BundleError(f"bundle {self.path} has no threshold {name!r}; it has {', '.join(rules)} (or give a number)")
        value = rules[name]["value"]
        if value is None:
            raise BundleError(f"threshold {name!r} of bundle {self.path} is undefined: {rules[name].get('undefined_reason', '')}")
        return name, float(value)


def json_number(value) -> float | None:
    """``value`` as a JSON-safe float (None for NaN and ±inf, which JSON cannot hold)."""
    value = float(value)
    return value if math.isfinite(value) else None


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces) without ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != _DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_bundle(out_dir: str | os.PathLike, manifest: dict, arrays: dict[str, np.ndarray], *,
                 keep_folders: tuple[str, ...] = ()) -> Path:
    """Write ``arrays`` (file name → array; numeric dtypes only) and ``manifest`` (with ``files``,
    the schema, the versions and ``manifest_sha256`` filled in) into ``out_dir``; returns it.

    ``out_dir`` must be absent, empty, or an earlier bundle (its files are replaced); entries named
    in ``keep_folders`` (an ensemble's ``members``, written first) do not count."""
    out = Path(out_dir)
    check_bundle_folder(out, keep_folders)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.kind not in "biuf":
            raise BundleError(f"bundle array {name} has dtype {array.dtype}; only numeric arrays are stored")
        np.save(out / name, array, allow_pickle=False)
        files[name] = {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size,
                       "dtype": array.dtype.str, "shape": list(array.shape)}
    full = {"schema": BUNDLE_SCHEMA, "schema_version": BUNDLE_SCHEMA_VERSION, "swsa_version": swsa_version(),
            **manifest, "files": files}
    full[_DIGEST_KEY] = manifest_digest(full)
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(full, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return out


def check_bundle_folder(out: Path, keep_folders: tuple[str, ...] = ()) -> None:
    """A one-line :class:`BundleError` unless ``out`` is absent, empty (but for ``keep_folders``) or a bundle."""
    if out.exists() and (not out.is_dir() or (any(p.name not in keep_folders for p in out.iterdir())
                                              and not (out / MANIFEST).is_file())):
        raise BundleError(f"{out} exists and is not an empty folder or a detector bundle; choose another --out")


def read_manifest(path: Path) -> dict:
    """The verified manifest of the bundle at ``path``: schema, version and its own hash checked."""
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not a detector bundle: it has no {MANIFEST} (write one with `swsa export-detector`)")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path / MANIFEST} is not valid JSON ({error}); the bundle is damaged, export it again") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != BUNDLE_SCHEMA:
        raise BundleError(f"{path / MANIFEST} is not a swsa detector bundle manifest (schema {BUNDLE_SCHEMA!r} expected)")
    version = manifest.get("schema_version")
    if version != BUNDLE_SCHEMA_VERSION:
        raise BundleError(f"bundle {path} has schema version {version!r} (written by swsa {manifest.get('swsa_version', '?')}); "
                          f"this swsa ({swsa_version()}) reads schema version {BUNDLE_SCHEMA_VERSION}: export the detector "
                          "again with this swsa")
    if manifest.get(_DIGEST_KEY) != manifest_digest(manifest):
        raise BundleError(f"{path / MANIFEST} was modified after export (its content no longer matches its "
                          f"{_DIGEST_KEY}); refusing the bundle, export it again")
    return manifest


def verified_array(path: Path, name: str, entry: dict) -> np.ndarray:
    """The array file ``name`` of the bundle at ``path``, its sha256, dtype and shape checked against ``entry``."""
    file = path / name
    if not file.is_file():
        raise BundleError(f"bundle {path} lacks {name}, which its manifest lists")
    digest = file_sha256(file)
    if digest != entry.get("sha256"):
        raise BundleError(f"{file} was modified after export (sha256 {digest[:16]}…, the manifest says "
                          f"{str(entry.get('sha256'))[:16]}…); refusing the bundle")
    try:
        array = np.load(file, allow_pickle=False)
    except ValueError as error:
        raise BundleError(f"{file} cannot be read without pickle ({error})") from None
    if array.dtype.str != entry.get("dtype") or list(array.shape) != list(entry.get("shape", [])):
        raise BundleError(f"{file} holds {array.dtype.str} {list(array.shape)}, the manifest says "
                          f"{entry.get('dtype')} {entry.get('shape')}")
    return array


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read and verify the bundle at ``path`` (see the module docstring); :class:`BundleError` on any mismatch."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("kind") == "ensemble":
        raise BundleError(f"{path} is an ensemble bundle; load it with Predictor.load (swsa predict) or "
                          "swsa_engine.run.bundle_ensemble.load_ensemble_bundle")
    files = manifest.get("files", {})
    for required in (BANK_FILE, VALIDATION_FILE):
        if required not in files:
            raise BundleError(f"{path / MANIFEST} lists no {required}; the bundle is incomplete, export it again")
    arrays = {name: verified_array(path, name, entry) for name, entry in files.items()}
    bank = arrays[BANK_FILE]
    ids = np.asarray(manifest["bank"]["image_ids"], dtype=np.int64)
    detector = check_detector_record(manifest["detector"], path, ids >= 0, int(manifest["task"]["task_id"]))
    axes = 3 if detector.needs == "patches" else 2
    if bank.ndim != axes or len(ids) != len(bank):
        raise BundleError(f"{path / BANK_FILE} has shape {bank.shape}; {detector.label} needs {axes} axes and the "
                          f"manifest names {len(ids)} bank images")
    abnormal = arrays.get(ABNORMAL_FILE)
    if detector.needs_abnormal and abnormal is None:
        raise BundleError(f"{detector.label} needs abnormal references but bundle {path} has no {ABNORMAL_FILE}")
    return Bundle(path, manifest, bank, ids >= 0, abnormal, arrays[VALIDATION_FILE], detector)
