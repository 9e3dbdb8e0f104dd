"""Building a timm backbone: the architecture from timm, the weights that
:func:`~swsa_store.models.timm_weights.resolve_weights` found (loaded strictly by
:mod:`swsa_store.models.checkpoints`), and timm's test-time preprocessing with the weights' own
defaults and the caller's overrides (:mod:`swsa_store.models.preprocessing`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from swsa_store.models.backbone_cfg import RANDOM_INIT_SEED, BackboneCfg, LoadedBackbone
from swsa_store.models.checkpoints import load_checkpoint
from swsa_store.models.packaged_weights import packaged_weights_of_distribution
from swsa_store.models.preprocessing import PreprocessCfg
from swsa_store.models.timm_weights import resolve_weights
from swsa_store.models.weights import RandomWeightsWarning, WeightsNotFoundError, WeightsSource

__all__ = ["load_timm_backbone"]

log = logging.getLogger(__name__)


def _checkpoint_filter(cfg: BackboneCfg) -> Callable | None:
    """The ``checkpoint_filter_fn`` of the timm module defining the architecture, if any.

    timm applies it when loading pretrained weights; for ViTs it resamples the position
    embeddings to the model's image size and drops the obsolete pre-logits layer.
    """
    from timm.models import model_entrypoint

    try:
        module = sys.modules.get(model_entrypoint(cfg.timm_name).__module__)
    except (KeyError, RuntimeError, AttributeError) as error:  # timm does not know the architecture
        log.debug("no checkpoint filter for timm %s: %s: %s", cfg.timm_name, type(error).__name__, error)
        return None
    return getattr(module, "checkpoint_filter_fn", None)


def _model_feature_dim(model: torch.nn.Module) -> int:
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if dim is None:
        raise RuntimeError(f"cannot tell the feature size of {type(model).__name__}")
    return int(dim)


def _model_kwargs(cfg: BackboneCfg, image_size: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if image_size is not None:
        pcfg = cfg.pretrained_cfg()
        fixed = cfg.family == "vit" or bool(getattr(pcfg, "fixed_input_size", False))
        if fixed:  # ViT-like: position embeddings are built for this size
            kwargs["img_size"] = image_size
    return kwargs


def _create_model(cfg: BackboneCfg, model_kwargs: dict[str, Any], pretrained: bool = False) -> torch.nn.Module:
    import timm

    # a fixed seed in a forked RNG: random init is reproducible and the caller's RNG untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(cfg.timm_model_name, pretrained=pretrained, **model_kwargs)


def load_timm_backbone(cfg: BackboneCfg, weights: str | os.PathLike | None, *, weights_dir: str | os.PathLike | None,
                       allow_download: bool, image_size: int | None, device: str | torch.device,
                       overrides: dict[str, Any], key_mapping: str) -> LoadedBackbone:
    """The timm backbone of ``cfg`` (family resnet, vit, efficientnet or timm), as
    :func:`swsa_store.models.backbones.load_backbone` describes; ``overrides``: the parsed
    preprocessing overrides (:func:`~swsa_store.models.preprocessing.preprocess_overrides`)."""
    image_size = _input_size(image_size, overrides)
    source = resolve_weights(cfg, weights, weights_dir=weights_dir, allow_download=allow_download)
    model, source, mapping = _model_with_weights(cfg, source, _model_kwargs(cfg, image_size),
                                                 weights_dir=weights_dir, key_mapping=key_mapping)
    model.reset_classifier(0)
    model.eval().requires_grad_(False)
    cfg = _with_feature_dim(cfg, _model_feature_dim(model))
    defaults = _packaged_preprocess(cfg, source)
    preprocess_cfg, transform = _test_preprocessing(model, image_size, {**defaults, **overrides})
    model = model.to(device)
    return LoadedBackbone(
        cfg=cfg,
        model=model,
        transform=transform,
        preprocess=preprocess_cfg,
        weights=source,
        feature_dim=int(cfg.feature_dim),
        n_params=sum(p.numel() for p in model.parameters()),
        device=str(device),
        image_size=image_size,
        key_mapping=mapping,
    )


def _input_size(image_size: int | None, overrides: dict[str, Any]) -> int | None:
    """The model's input size: ``image_size``, else the ``size`` override (they must agree)."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    size = overrides.get("size")
    if image_size is not None and size is not None and size != image_size:
        raise ValueError(f"image_size={image_size} and preprocess size={size} disagree; give one of them")
    return image_size if image_size is not None else size


def _with_feature_dim(cfg: BackboneCfg, feature_dim: int) -> BackboneCfg:
    """``cfg`` with the built model's feature size (checked against a registered one)."""
    if cfg.feature_dim is not None and feature_dim != cfg.feature_dim:
        raise RuntimeError(
            f"backbone {cfg.name!r} is registered with feature_dim={cfg.feature_dim} but timm "
            f"{cfg.timm_model_name} gives {feature_dim}-d features"
        )
    return cfg if cfg.feature_dim is not None else dataclasses.replace(cfg, feature_dim=feature_dim)


def _packaged_preprocess(cfg: BackboneCfg, source: WeightsSource) -> dict[str, Any]:
    """The preprocessing defaults of packaged weights: those of the backbone's package, or of the
    package the weights were read from; ``{}`` for other weights (timm's data config stands)."""
    package = cfg.package
    if package is None and source.kind == "package" and source.package:
        package = packaged_weights_of_distribution(source.package)
    return package.preprocess_defaults() if package is not None else {}


def _model_with_weights(cfg: BackboneCfg, source: WeightsSource, model_kwargs: dict[str, Any], *,
                        weights_dir: str | os.PathLike | None,
                        key_mapping: str) -> tuple[torch.nn.Module, WeightsSource, str]:
    """The timm model of ``cfg`` with the weights of ``source``, the source to record and the key
    mapping used (``""`` for random weights).

    A download is recorded with the file timm left in the caches, when it can be found there.
    """
    if source.kind == "download":
        log.info("downloading weights of %s (timm %s)", cfg.name, cfg.timm_model_name)
        model = _create_model(cfg, model_kwargs, pretrained=True)
        try:  # where timm put it, for the record
            found = resolve_weights(cfg, None, weights_dir=weights_dir)
            source = WeightsSource(kind="download", path=found.path, sha256=found.sha256)
        except (WeightsNotFoundError, ValueError):
            log.warning("downloaded weights of %s could not be located in the caches; "
                        "their sha256 is not recorded", cfg.name)
        return model, source, "name"
    model = _create_model(cfg, model_kwargs)
    if source.kind == "random":
        message = (
            f"backbone {cfg.name!r} (timm {cfg.timm_model_name}) has RANDOM weights "
            f"(seed {RANDOM_INIT_SEED}): its features are meaningless for real images; "
            f"use it only for tests and demos"
        )
        # stacklevel: past this helper, load_timm_backbone and load_backbone, to the code that asked for the backbone
        warnings.warn(message, RandomWeightsWarning, stacklevel=5)
        log.warning(message)
        return model, source, ""
    package = packaged_weights_of_distribution(source.package) if source.kind == "package" and source.package else None
    if package is not None:
        key_mapping = package.key_mapping
        if package.architecture != cfg.timm_name:
            log.warning("the weights of package %s were ported for timm %s; %s builds timm %s, whose features "
                        "differ slightly (backbone %r uses %s)", package.distribution, package.architecture,
                        cfg.name, cfg.timm_name, package.backbone, package.architecture)
    what = f"backbone {cfg.name!r} (timm {cfg.timm_name})"
    mapping = load_checkpoint(model, Path(source.path), what=what, key_mapping=key_mapping,
                              checkpoint_filter=_checkpoint_filter(cfg))
    log.info("loaded %s weights from %s (%s, keys by %s)", cfg.name, source.path, source.kind, mapping)
    return model, source, mapping


def _test_preprocessing(model: torch.nn.Module, image_size: int | None,
                        overrides: dict[str, Any]) -> tuple[PreprocessCfg, Callable]:
    """timm's test-time preprocessing of ``model`` (at ``image_size`` when given) with ``overrides``
    applied (``size`` only when ``image_size`` is not given), and its transform."""
    from timm.data import create_transform, resolve_model_data_config

    args = {"input_size": (3, image_size, image_size)} if image_size is not None else None
    base = PreprocessCfg.from_data_config(resolve_model_data_config(model, args=args))
    if image_size is not None:
        overrides = {**overrides, "size": image_size}
    preprocess = base.with_overrides(overrides)
    return preprocess, create_transform(**preprocess.data_config(), is_training=False)
