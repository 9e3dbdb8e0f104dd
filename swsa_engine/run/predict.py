"""Score new images with an exported detector bundle: :class:`Predictor` (``swsa predict``).

``Predictor.load(path)`` verifies the bundle (:func:`swsa_engine.run.bundle.load_bundle`), builds the
backbone its manifest names with the same weights (found as ``swsa embed`` finds them; a file whose
sha256 differs from the manifest's is refused) and the same preprocessing (checked), and rebuilds the
detector from its label and refits it on the bundle's bank, once (:mod:`swsa_engine.run.bundle_scoring`).
``predict(images)`` reads the images with the same reader as ``swsa embed``
(:class:`swsa_store.ingest.ImageReader`: a file that cannot be read is a row with its reason, not an
error; with the transform's numpy pixel plan, so the model's input is bit-identical to the
transform's, :func:`image_batches`), embeds them in batches (:class:`swsa_store.ingest.Embedder`, CPU
or GPU; in float32, without autocast), rounds the features (patch tokens) to the store's dtype, and
scores them against the bank exactly as the sweep scored the task's real validation images;
``predict_with_maps`` also gives patch detectors' per-patch anomaly maps. Images are files, folders (searched recursively for
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
from swsa_store.ingest_pipeline import pixel_plan
from swsa_store.models.backbones import LoadedBackbone, create_backbone, get_backbone_cfg
from swsa_store.models.patch_tokens import patch_token_model
from swsa_store.samples import read_image

from swsa_engine.run.bundle import Bundle, BundleError, load_bundle
from swsa_engine.run.bundle_ensemble import EnsembleBundle, is_ensemble_bundle, load_ensemble_bundle
from swsa_engine.run.bundle_scoring import fit_scorer

__all__ = ["Predictor", "EnsemblePredictor", "load_predictor", "prediction_frame", "expand_images",
           "load_bundle_backbone", "image_batches", "PREDICTION_COLUMNS"]

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


def image_batches(rows: np.ndarray, paths: list[str], transform, *, batch_size: int, num_workers: int = 0,
                  pin_memory: bool = False) -> DataLoader:
    """The images at ``paths`` read in order by ``swsa embed``'s reader, with its numpy pixel plan
    (:func:`~swsa_store.ingest_pipeline.pixel_plan`: the model's input bit-identical to ``transform``'s,
    without torch's per-image operations): batches ``(rows (B,) int64, ok (B,) bool, pixels
    (ok.sum(), 3, H, W) float32 or None, reasons [B])`` (:func:`~swsa_store.ingest.collate_items`;
    ``rows`` are the given ``rows`` of the images)."""
    reader = ImageReader(rows, [os.path.abspath(p) for p in paths], transform, os.getcwd())
    return DataLoader(reader.with_plan(pixel_plan(transform)), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_items, pin_memory=pin_memory)


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
    """An exported detector ready to score images; build it with :meth:`load`.

    The detector is refitted once, here, from the bundle's arrays
    (:func:`swsa_engine.run.bundle_scoring.fit_scorer`). For patch detectors the backbone also
    returns its patch tokens (:func:`swsa_store.models.patch_tokens.patch_token_model`, checked
    against the bundle's ``patches`` entry), rounded to float16 as the store holds them."""

    def __init__(self, bundle: Bundle, backbone: LoadedBackbone, *, device: str = "cpu", batch_size: int = 64,
                 num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.bundle = bundle
        self.detector = bundle.detector
        self.backbone = backbone
        self.scorer = fit_scorer(bundle, device)
        self.patches = self.detector.needs == "patches"
        model = backbone.model
        if self.patches:
            model, attrs = patch_token_model(backbone)
            _check_patch_attrs(attrs, bundle.manifest.get("patches", {}), bundle.path)
        self.embedder = Embedder(model, device=device, autocast=False)  # float32 like the bank's rows
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        stored = np.float16 if self.patches else (bundle.manifest["backbone"].get("dtype") or "float32")
        self.dtype = np.dtype(stored)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
             weights: str | None = None, weights_dir: str | None = None, allow_download: bool = False) -> "Predictor":
        """Verify the bundle at ``path`` and build its backbone and detector (see the module docstring)."""
        bundle = load_bundle(path)
        backbone = load_bundle_backbone(bundle.manifest["backbone"], device=device, weights=weights,
                                        weights_dir=weights_dir, allow_download=allow_download)
        return cls(bundle, backbone, device=device, batch_size=batch_size, num_workers=num_workers)

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """(N,) float64 scores of backbone rows (N, D) (patch detectors: tokens (N, P, D')) against the
        bank, rounded to the store's dtype first."""
        rows = np.asarray(features, dtype=np.float32).astype(self.dtype)
        return self.scorer.score(rows if self.patches else rows.astype(np.float32))

    def embedded_batches(self, listed: list[tuple[str, str]], errors: list[str], *, progress: bool = False):
        """Yield ``(rows (B,) int64, features)`` per batch of :func:`expand_images` rows ``listed``
        that embed to finite values in the store's dtype: pooled features (B, D) float32, or patch
        tokens (B, P, D') float16. ``errors`` (one per row) gets the reason of each row left out."""
        todo = np.array([i for i, (_, e) in enumerate(listed) if not e], dtype=np.int64)
        loader = image_batches(todo, [listed[i][0] for i in todo], self.backbone.transform, batch_size=self.batch_size,
                               num_workers=self.num_workers, pin_memory=self.embedder.device.type == "cuda")
        what = "patch tokens" if self.patches else "embedding"
        with tqdm(total=len(todo), desc="embed", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for ids, ok, batch, reasons in loader:
                for i, reason in zip(ids[~ok], np.asarray(reasons, dtype=object)[~ok]):
                    errors[i] = reason or "cannot read image"
                bar.update(len(ids))
                if batch is None:
                    continue
                out = self.embedder(batch)
                rows = np.asarray(out[1] if self.patches else (out[0] if isinstance(out, tuple) else out))
                with np.errstate(over="ignore", invalid="ignore"):
                    rows = rows.astype(self.dtype)
                finite = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
                for i in ids[ok][~finite]:
                    errors[i] = f"non-finite {what} (NaN or inf in the backbone's output, or beyond {self.dtype}'s range)"
                if finite.any():
                    yield ids[ok][finite], rows[finite]

    def features(self, listed: list[tuple[str, str]], *, progress: bool = False) -> tuple[np.ndarray, list[str]]:
        """(N, D) float32 backbone features of :func:`expand_images` rows ``listed`` (NaN rows where an
        image could not be read or embedded) and each row's error ("" when fine); pooled bundles only."""
        if self.patches:
            raise BundleError(f"{self.detector.label} scores patch tokens; use predict() or predict_with_maps()")
        errors = [e for _, e in listed]
        out = np.full((len(listed), int(self.bundle.bank.shape[1])), np.nan, dtype=np.float32)
        for rows, values in self.embedded_batches(listed, errors, progress=progress):
            out[rows] = values
        return out, errors

    def scores_of(self, features: np.ndarray) -> np.ndarray:
        """(N,) scores of :meth:`features` rows (NaN for NaN rows), scored ``batch_size`` at a time."""
        scores = np.full(len(features), np.nan)
        ok = np.flatnonzero(np.isfinite(features).all(axis=1))
        for start in range(0, len(ok), self.batch_size):
            chunk = ok[start:start + self.batch_size]
            scores[chunk] = self.score_features(features[chunk])
        return scores

    def predict(self, images, *, threshold: str | float | None = None, progress: bool = False) -> pd.DataFrame:
        """One row per image (:func:`expand_images` of ``images``): ``path``, ``score`` (NaN on error),
        ``decision`` ("anomaly" when score >= the threshold, "normal", "" on error) and ``error``.

        ``threshold``: a rule of the manifest (``normal_quantile``, ``synthetic_f1``), a number, or
        None (the bundle's default). ``frame.attrs`` holds the threshold's name and value."""
        return self._predict(images, threshold, progress, with_maps=False)[0]

    def predict_with_maps(self, images, *, threshold: str | float | None = None,
                          progress: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
        """:meth:`predict`, and each image's anomaly map (N, h, w) float64 on the backbone's patch grid
        (NaN for images not scored): ``min`` over the reference patches of each patch's squared
        distance, whose maximum is the score. Patch detectors only."""
        if not self.patches:
            raise BundleError(f"heat maps need a patch-level detector bundle (e.g. SOURCE/patch(K=4)); {self.bundle.path} "
                              f"holds {self.detector.label}, whose score has no spatial map")
        grid = [int(g) for g in self.bundle.manifest["patches"]["grid"]]
        if grid[0] * grid[1] != self.bundle.bank.shape[1] or (grid[1] == 1 and grid[0] > 1):
            raise BundleError(f"the patch tokens of {self.bundle.manifest['backbone']['backbone']} have no known 2-d "
                              f"layout (grid {grid}); heat maps cannot be drawn for them")
        frame, maps = self._predict(images, threshold, progress, with_maps=True)
        return frame, maps.reshape(len(maps), *grid)

    def _predict(self, images, threshold, progress: bool, with_maps: bool):
        rule, value = self.bundle.threshold(threshold)
        listed = expand_images([images] if isinstance(images, (str, os.PathLike)) else images)
        scores, errors, maps = self.score_listed(listed, progress=progress, with_maps=with_maps)
        frame = prediction_frame(listed, scores, errors, (rule, value), self.bundle.manifest["candidate"]["name"])
        return frame, maps

    def score_listed(self, listed: list[tuple[str, str]], *, progress: bool = False, with_maps: bool = False):
        """``(scores (N,), errors [N], maps (N, P) or None)`` of :func:`expand_images` rows ``listed``,
        embedded and scored one batch at a time (NaN scores and map rows where an image failed)."""
        errors = [e for _, e in listed]
        scores = np.full(len(listed), np.nan)
        maps = np.full((len(listed), self.bundle.bank.shape[1]), np.nan) if with_maps else None
        for rows, values in self.embedded_batches(listed, errors, progress=progress):
            scores[rows] = self.score_features(values)
            if with_maps:
                maps[rows] = self.scorer.maps(values)
        return scores, errors, maps

    def model_view(self, path: str | os.PathLike) -> np.ndarray:
        """(H, W, 3) uint8: the image at ``path`` as the backbone sees it (resized, cropped; the
        normalisation undone), the frame its patch grid covers."""
        pixels = self.backbone.transform(read_image(path)).numpy().transpose(1, 2, 0)
        preprocess = self.backbone.preprocess
        pixels = pixels * np.asarray(preprocess.std) + np.asarray(preprocess.mean)
        return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _check_patch_attrs(built: dict, stored: dict, path) -> None:
    """A :class:`BundleError` unless the backbone gives patch tokens as the bundle's were made."""
    for key in ("token_source", "layer", "grid", "n_patches", "patch_dim"):
        if key in stored and json.loads(json.dumps(built.get(key))) != stored[key]:
            raise BundleError(f"the backbone gives patch tokens with {key}={built.get(key)!r} here, bundle {path} "
                              f"was fitted on {key}={stored[key]!r}")


def prediction_frame(listed, scores: np.ndarray, errors: list[str], threshold: tuple[str, float], candidate: str,
                     extra: dict | None = None) -> pd.DataFrame:
    """The predictions table (:data:`PREDICTION_COLUMNS`, then ``extra`` columns) with the threshold in ``attrs``."""
    rule, value = threshold
    decision = np.where(np.isnan(scores), "", np.where(scores >= value, "anomaly", "normal"))
    frame = pd.DataFrame({"path": [p for p, _ in listed], "score": scores, "decision": decision, "error": errors,
                          **(extra or {})})
    frame.attrs.update({"threshold": rule, "threshold_value": value, "candidate": candidate})
    return frame


class EnsemblePredictor:
    """An exported ensemble (:mod:`swsa_engine.run.bundle_ensemble`) ready to score images: each member
    scores them as its own :class:`Predictor` (members on the same backbone share one embedding pass);
    the scores are normalised within each member's reference pool and combined. The table has one
    ``member_score[NAME]`` column per member besides :data:`PREDICTION_COLUMNS`."""

    def __init__(self, bundle: EnsembleBundle, members: list[Predictor]):
        self.bundle, self.members = bundle, members

    @classmethod
    def load(cls, path, *, device: str = "cpu", batch_size: int = 64, num_workers: int = 0, weights: str | None = None,
             weights_dir: str | None = None, allow_download: bool = False) -> "EnsemblePredictor":
        """Verify the ensemble bundle and every member; build each backbone once. ``weights`` (one file)
        is used only when every member shares one backbone; otherwise give ``weights_dir``."""
        bundle = load_ensemble_bundle(path)
        names = {m.manifest["backbone"]["backbone"] for m in bundle.members}
        backbones, members = {}, []
        for member in bundle.members:
            key = json.dumps(member.manifest["backbone"], sort_keys=True, default=str)
            if key not in backbones:
                backbones[key] = load_bundle_backbone(member.manifest["backbone"], device=device,
                                                      weights=weights if len(names) == 1 else None,
                                                      weights_dir=weights_dir, allow_download=allow_download)
            members.append(Predictor(member, backbones[key], device=device, batch_size=batch_size,
                                     num_workers=num_workers))
        return cls(bundle, members)

    def predict(self, images, *, threshold: str | float | None = None, progress: bool = False,
                normalise_over: str = "reference") -> pd.DataFrame:
        """As :meth:`Predictor.predict`, the score being the ensemble's (see the module of the bundle);
        ``normalise_over`` as :meth:`~swsa_engine.run.bundle_ensemble.EnsembleBundle.combine`."""
        rule, value = self.bundle.threshold(threshold)
        listed = expand_images([images] if isinstance(images, (str, os.PathLike)) else images)
        errors = [e for _, e in listed]
        raw = np.full((len(self.members), len(listed)), np.nan)
        embedded: dict[int, tuple[np.ndarray, list[str]]] = {}
        for m, member in enumerate(self.members):
            if member.patches:  # its own pass: patch tokens are scored batch by batch, never kept
                raw[m], member_errors, _ = member.score_listed(listed, progress=progress)
            else:
                if id(member.backbone) not in embedded:
                    embedded[id(member.backbone)] = member.features(listed, progress=progress)
                features, member_errors = embedded[id(member.backbone)]
                raw[m] = member.scores_of(features)
            errors = [e or f for e, f in zip(errors, member_errors)]
        scores = np.full(len(listed), np.nan)
        complete = np.isfinite(raw).all(axis=0)
        if complete.any():
            scores[complete] = self.bundle.combine(raw[:, complete], normalise_over)
        errors = [e or ("" if ok else "a member could not score the image") for e, ok in zip(errors, complete)]
        names = [entry["name"] for entry in self.bundle.manifest["ensemble"]["members"]]
        return prediction_frame(listed, scores, errors, (rule, value), self.bundle.manifest["candidate"]["name"],
                                {f"member_score[{n}]": raw[m] for m, n in enumerate(names)})


def load_predictor(path, **options) -> "Predictor | EnsemblePredictor":
    """:class:`EnsemblePredictor` for an ensemble bundle, :class:`Predictor` otherwise (``options``: their ``load``'s)."""
    return (EnsemblePredictor if is_ensemble_bundle(path) else Predictor).load(path, **options)
