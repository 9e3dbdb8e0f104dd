"""Score new images with an exported detector bundle: :class:`Predictor` (``swsa predict``).

``Predictor.load(path)`` verifies the bundle (:func:`swsa_engine.run.bundle.load_bundle`), builds the
backbone its manifest names with the same weights (found as ``swsa embed`` finds them; a file whose
sha256 differs from the manifest's is refused) and the same preprocessing (checked), and rebuilds the
detector from its label over the bundle's bank. ``predict(images)`` reads the images with the same
reader as ``swsa embed`` (:class:`swsa_store.ingest.ImageReader`: a file that cannot be read is a
row with its reason, not an error), embeds them in batches (:class:`swsa_store.ingest.Embedder`, CPU
or GPU; in float32, without autocast), rounds the features to the store's dtype, and scores them against the bank exactly as the
sweep scored the task's real validation images. Images are files, folders (searched recursively for
image files) or glob patterns (:func:`expand_images`).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from swsa_store.datasets.registry import DEFAULT_EXTENSIONS
from swsa_store.ingest import Embedder, ImageReader, collate_items
from swsa_store.models.backbones import LoadedBackbone, create_backbone, get_backbone_cfg

from swsa_engine.run.bundle import Bundle, BundleError, load_bundle

__all__ = ["Predictor", "expand_images", "load_bundle_backbone", "PREDICTION_COLUMNS"]

PREDICTION_COLUMNS = ["path", "score", "decision", "error"]


def expand_images(items, extensions=DEFAULT_EXTENSIONS) -> list[tuple[str, str]]:
    """``[(path, error)]`` for files, folders (every file with an image extension below them, sorted)
    and glob patterns; an item that names nothing gives one row with its reason."""
    out: list[tuple[str, str]] = []
    allowed = tuple(e.lower() for e in extensions)
    for item in map(str, items):
        path = Path(item)
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.is_file() and f.suffix.lower() in allowed)
            out += [(f, "") for f in found] or [(item, f"folder holds no image files ({', '.join(allowed)})")]
        elif path.is_file():
            out.append((item, ""))
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            out += expand_images(matches, extensions) if matches else [(item, "no file matches this pattern")]
        else:
            out.append((item, "no such file or folder"))
    return out


def _stored(value):
    """An embedding attribute as Python: "" (how a store writes None) → None."""
    return None if value == "" else value


def load_bundle_backbone(backbone: dict, *, device: str = "cpu", weights: str | None = None,
                         weights_dir: str | None = None, allow_download: bool = False) -> LoadedBackbone:
    """The backbone of a manifest's ``backbone`` entry, with the weights it names (``weights``: a file
    or folder given by the user; else the recorded path when it exists; else the search of ``swsa
    embed``) and its preprocessing. Weights whose sha256 differs, another preprocessing or another
    feature size raise :class:`BundleError`."""
    name, kind = backbone["backbone"], backbone.get("weights_kind")
    family = get_backbone_cfg(name).family
    kwargs: dict = {"device": device}
    if family != "pixels":
        kwargs["image_size"] = _stored(backbone.get("image_size"))
    preprocess = backbone.get("preprocess") or {}
    if family not in ("pixels", "clip") and preprocess:
        kwargs["preprocess"] = {k: preprocess[k] for k in ("crop_pct", "crop_mode", "interpolation", "mean", "std")}
    if kind == "random":
        chosen = "random"
    elif kind == "none":
        chosen = None
    else:
        recorded = _stored(backbone.get("weights_path"))
        chosen = weights or (recorded if recorded and os.path.exists(recorded) else None)
    loaded = create_backbone(name, weights=chosen, weights_dir=weights_dir, allow_download=allow_download, **kwargs)
    expected = _stored(backbone.get("weights_sha256"))
    got = loaded.weights.sha256
    if expected and got != expected:
        raise BundleError(f"the weights found for {name} ({loaded.weights.path or kind}) have sha256 {got}, the bundle was "
                          f"fitted on features of weights with sha256 {expected}; pass those weights with --weights")
    built = json.loads(json.dumps(loaded.preprocess.to_attrs()))
    if preprocess and built != preprocess:
        raise BundleError(f"{name} preprocesses images as {built} here, the bundle's features were made with {preprocess}")
    if backbone.get("feature_dim") and int(loaded.feature_dim) != int(backbone["feature_dim"]):
        raise BundleError(f"{name} gives {loaded.feature_dim}-d features here, the bundle's bank is {backbone['feature_dim']}-d")
    return loaded


class Predictor:
    """An exported detector ready to score images; build it with :meth:`load`."""

    def __init__(self, bundle: Bundle, backbone: LoadedBackbone, *, device: str = "cpu", batch_size: int = 64,
                 num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.bundle = bundle
        self.detector = bundle.detector
        self.backbone = backbone
        self.embedder = Embedder(backbone.model, device=device, autocast=False)  # float32 like the bank's rows
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.dtype = np.dtype(bundle.manifest["backbone"].get("dtype") or "float32")
        self._bank = self.detector.prepare(bundle.bank)[None]
        self._bank_mask = bundle.bank_mask[None]
        self._extra = {}
        if self.detector.needs_abnormal:
            abnormal = self.detector.prepare(bundle.abnormal)
            self._extra = {"abnormal": abnormal[None], "abnormal_mask": np.ones((1, len(abnormal)), dtype=bool)}

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
             weights: str | None = None, weights_dir: str | None = None, allow_download: bool = False) -> "Predictor":
        """Verify the bundle at ``path`` and build its backbone and detector (see the module docstring)."""
        bundle = load_bundle(path)
        backbone = load_bundle_backbone(bundle.manifest["backbone"], device=device, weights=weights,
                                        weights_dir=weights_dir, allow_download=allow_download)
        return cls(bundle, backbone, device=device, batch_size=batch_size, num_workers=num_workers)

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """(N,) float64 scores of backbone features (N, D) against the bank (rounded to the store's dtype first)."""
        features = np.asarray(features, dtype=np.float32).astype(self.dtype).astype(np.float32)
        if len(features) == 0:
            return np.empty(0)
        queries = self.detector.prepare(features)[None]
        return self.detector.score_tasks(queries, np.ones(queries.shape[:2], dtype=bool), self._bank, self._bank_mask,
                                         None, task_ids=np.array([self.bundle.task_id]), **self._extra)[0]

    def predict(self, images, *, threshold: str | float | None = None, progress: bool = False) -> pd.DataFrame:
        """One row per image (:func:`expand_images` of ``images``): ``path``, ``score`` (NaN on error),
        ``decision`` ("anomaly" when score >= the threshold, "normal", "" on error) and ``error``.

        ``threshold``: a rule of the manifest (``normal_quantile``, ``synthetic_f1``), a number, or
        None (the bundle's default). ``frame.attrs`` holds the threshold's name and value."""
        rule, value = self.bundle.threshold(threshold)
        listed = expand_images([images] if isinstance(images, (str, os.PathLike)) else images)
        paths = [p for p, _ in listed]
        scores = np.full(len(listed), np.nan)
        errors = [e for _, e in listed]
        todo = np.array([i for i, (_, e) in enumerate(listed) if not e], dtype=np.int64)
        reader = ImageReader(todo, [os.path.abspath(paths[i]) for i in todo], self.backbone.transform, os.getcwd())
        loader = DataLoader(reader, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            collate_fn=collate_items, pin_memory=self.embedder.device.type == "cuda")
        with tqdm(total=len(todo), desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for ids, ok, batch, reasons in loader:
                for i, reason in zip(ids[~ok], np.asarray(reasons, dtype=object)[~ok]):
                    errors[i] = reason or "cannot read image"
                if batch is not None:
                    self._score_batch(ids[ok], batch, scores, errors)
                bar.update(len(ids))
        decision = np.where(np.isnan(scores), "", np.where(scores >= value, "anomaly", "normal"))
        frame = pd.DataFrame({"path": paths, "score": scores, "decision": decision, "error": errors},
                             columns=PREDICTION_COLUMNS)
        frame.attrs.update({"threshold": rule, "threshold_value": value, "candidate": self.bundle.manifest["candidate"]["name"]})
        return frame

    def _score_batch(self, ids: np.ndarray, batch, scores: np.ndarray, errors: list) -> None:
        """Embed ``batch`` (the decoded images ``ids``) and write their scores (or errors) in place."""
        features = self.embedder(batch)
        if isinstance(features, tuple):
            features = features[0]
        finite = np.isfinite(features).all(axis=1)
        for i in ids[~finite]:
            errors[i] = "non-finite embedding (NaN or inf in the backbone's output)"
        if finite.any():
            scores[ids[finite]] = self.score_features(features[finite])
