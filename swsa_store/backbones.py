"""Backbones: the image feature extractors that every real and synthetic image is embedded with.

The extension point follows timm's own registry/factory split (``_registry.py`` /
``_factory.py``): a *config* (:class:`BackboneCfg`, like timm's ``PretrainedCfg``) is
registered under a name, and :func:`create_backbone` turns a name into a ready model
(:class:`LoadedBackbone`) — architecture from timm, weights from wherever
:func:`resolve_weights` finds them, preprocessing from timm's data config.

Registered names (the SWSA paper's ten candidates, penultimate features)::

    resnet18 resnet34 resnet50 resnet101 resnet152      timm resnetXX.tv_in1k (torchvision weights)
    vit_b_16 vit_b_32 vit_l_16 vit_l_32 vit_h_14        timm vit_*_224.orig_in21k (original ViT weights)

Any other timm model is available as ``"timm/<architecture>[.<pretrained tag>]"``
(the tag defaults to timm's default tag for that architecture).
Any open_clip model is available as ``"clip/<architecture>[@<pretrained tag>]"`` (image tower;
see :mod:`swsa_store.clip` for its weights search and the text side).

Offline first — where weights come from (``weights=None`` / ``"auto"``), in this order:

1. an explicit ``weights=`` path: a file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``)
   or a Hugging Face style directory (``model.safetensors`` / ``pytorch_model.bin``);
2. a weights directory (the ``weights_dir`` argument, else env ``SWSA_WEIGHTS_DIR``)::

       <dir>/<name>.safetensors | .pth | .pt | .bin          e.g. resnet18.safetensors
       <dir>/<arch>.<tag>.safetensors | .pth | .pt | .bin    e.g. resnet18.tv_in1k.pth
       <dir>/<arch>.<tag>/model.safetensors | pytorch_model.bin
       <dir>/<hf_hub_id>/model.safetensors | pytorch_model.bin  e.g. timm/resnet18.tv_in1k/…
       <dir>/<basename of the timm url>                       e.g. resnet18-f37072fd.pth

3. the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``), repo
   ``pretrained_cfg.hf_hub_id`` (e.g. ``timm/resnet18.tv_in1k``), file ``model.safetensors``
   or ``pytorch_model.bin``;
4. the torch hub cache: ``torch.hub.get_dir()/checkpoints/<basename of pretrained_cfg.url>``
   (where torchvision and timm put their downloads);
5. a download through timm — only with ``allow_download=True``.

Otherwise :class:`WeightsNotFoundError` lists every place it looked and how to fix it.
``weights="random"`` builds the architecture with a fixed seed (deterministic given the name
and image size) and says so loudly (:class:`RandomWeightsWarning` and a logged warning).

Weights are loaded strictly: every tensor of the feature extractor must be in the file with
its shape. A checkpoint without the classifier (e.g. the ``state_dict`` of a
:attr:`LoadedBackbone.model`) is accepted, since the classifier is dropped anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import urlparse

import torch

from .registry import Registry, UnknownNameError

log = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "PAPER_BACKBONES",
    "RANDOM_INIT_SEED",
    "WEIGHT_SUFFIXES",
    "BackboneCfg",
    "LoadedBackbone",
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
    "register_backbone",
    "resolve_weights",
]

#: Environment variable naming a folder of local weights (step 2 of the search).
WEIGHTS_DIR_ENV = "SWSA_WEIGHTS_DIR"
#: File endings a weights file may have.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
#: File names looked for inside a Hugging Face style weights directory, in order.
DIR_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Seed of ``weights="random"`` models (used inside ``torch.random.fork_rng``).
RANDOM_INIT_SEED = 0
#: Prefix of names that mean "any timm model": ``timm/<architecture>[.<tag>]``.
TIMM_PREFIX = "timm/"

Family = Literal["resnet", "vit", "timm", "clip", "pixels"]
WeightsKind = Literal["file", "directory", "hf-cache", "torch-cache", "download", "random", "none"]


class RandomWeightsWarning(UserWarning):
    """A backbone was built with random weights: its features mean nothing for real images."""


class WeightsNotFoundError(FileNotFoundError):
    """No weights were found locally (and downloading was not allowed).

    ``tried`` lists every location looked at, in order.
    """

    def __init__(self, message: str, tried: list[str] | None = None):
        super().__init__(message)
        self.tried = list(tried or [])

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror)
        return str(self.args[0])


class WeightsLoadError(RuntimeError):
    """A weights file was found but could not be read or does not fit the architecture."""


def _attr_value(value: Any) -> Any:
    """A JSON- and HDF5-attribute-friendly value: tuples become lists, None becomes ""."""
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return [_attr_value(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneCfg:
    """What a backbone is: its name here, its timm architecture and pretrained tag.

    ``feature_dim`` is the size of the penultimate (pre-logits) features; ``None`` for
    ``timm/...`` names until the model is built.
    """

    name: str
    timm_name: str
    pretrained_tag: str | None
    family: Family
    feature_dim: int | None
    description: str = ""

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
        return {k: _attr_value(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class PreprocessCfg:
    """How an image becomes the model's input (timm's resolved data config, at test time)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any]) -> "PreprocessCfg":
        """From ``timm.data.resolve_data_config`` / ``resolve_model_data_config`` output."""
        return cls(
            input_size=tuple(int(v) for v in data_config["input_size"]),
            mean=tuple(float(v) for v in data_config["mean"]),
            std=tuple(float(v) for v in data_config["std"]),
            interpolation=str(data_config.get("interpolation", "bilinear")),
            crop_pct=float(data_config.get("crop_pct") or 1.0),
            crop_mode=str(data_config.get("crop_mode") or "center"),
        )

    def data_config(self) -> dict[str, Any]:
        """The keyword arguments of ``timm.data.create_transform``."""
        return {
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    def to_attrs(self) -> dict[str, Any]:
        return {k: _attr_value(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights came from.

    kind: ``file`` (an explicit file), ``directory`` (found in an explicit directory or the
    weights directory), ``hf-cache``, ``torch-cache``, ``download`` (fetched by timm),
    ``random`` (no weights), or ``none`` (a feature source that has no weights: ``pixels``). ``path`` is the file read and ``sha256`` its hash (both ``None``
    for ``random``, and for a download whose file could not be located afterwards).
    """

    kind: WeightsKind
    path: str | None = None
    sha256: str | None = None

    def to_attrs(self) -> dict[str, Any]:
        return {k: _attr_value(v) for k, v in dataclasses.asdict(self).items()}


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
    if name.startswith("clip/"):  # open_clip models: clip/<architecture>[@<tag>] (swsa_store.clip)
        from .clip import clip_backbone_cfg

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
    ``allow_download``, ``image_size``, ``device``.
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
        description=f"timm model {arch}" + (f".{resolved_tag}" if resolved_tag else ""),
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

#: The SWSA paper's candidates, in its order (ResNets small to large, then ViTs).
PAPER_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                   "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


# --------------------------------------------------------------------------------------------
# Weights resolution
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def _hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _split_hf_id(hf_hub_id: str) -> tuple[str, str | None]:
    repo_id, _, revision = hf_hub_id.partition("@")
    return repo_id, revision or None


def _dir_weight_files(directory: Path, pcfg=None) -> list[Path]:
    names = list(DIR_WEIGHT_FILES)
    extra = getattr(pcfg, "hf_hub_filename", None) if pcfg is not None else None
    if extra and extra not in names:
        names.insert(0, extra)
    return [directory / n for n in names]


def _stem_files(folder: Path, stems: list[str]) -> list[Path]:
    """``folder/<stem><suffix>`` for each stem, then each of :data:`WEIGHT_SUFFIXES`."""
    return [folder / f"{stem}{suffix}" for stem in stems for suffix in WEIGHT_SUFFIXES]


def _weights_source_for(path: Path, kind: WeightsKind) -> WeightsSource:
    return WeightsSource(kind=kind, path=str(path), sha256=file_sha256(path))


def _weights_request(weights: str | os.PathLike | None) -> WeightsSource | str | os.PathLike | None:
    """What ``weights`` asks for: a ``random`` source, a path to read (step 1), or ``None``: search."""
    if isinstance(weights, str) and not weights.strip():
        return None  # an empty option means "search"
    if isinstance(weights, str) and weights.lower() == "random":
        return WeightsSource(kind="random")
    if isinstance(weights, str) and weights.lower() == "auto":
        return None
    return weights


@dataclass(frozen=True)
class _ExplicitWeightsErrors:
    """The messages of step (1), ``str.format`` templates of ``path``, ``name`` (the backbone's),
    ``files`` (the names looked for in a directory), ``suffix`` and ``suffixes`` (the endings allowed)."""

    bad_suffix: str
    empty_dir: str
    missing: str


_TIMM_EXPLICIT_ERRORS = _ExplicitWeightsErrors(
    bad_suffix="weights file {path} has an unsupported ending {suffix!r}; use one of {suffixes} "
               "(a torch state dict or safetensors)",
    empty_dir="weights directory {path} for backbone {name!r} holds none of {files}; pass the weights file itself "
              "(.safetensors/.pth/.pt/.bin) instead",
    missing="weights {path!r} for backbone {name!r} do not exist; pass an existing file or directory, None/'auto' "
            "to search the caches, or 'random' for an explicitly random model",
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
    request = _weights_request(weights)
    if isinstance(request, WeightsSource):
        return request
    pcfg = cfg.pretrained_cfg()

    # (1) an explicit path
    if request is not None:
        path = Path(request).expanduser()
        return _explicit_weights(path, cfg, _dir_weight_files(path, pcfg), _TIMM_EXPLICIT_ERRORS)

    tried: list[str] = []  # every place looked at, for the error
    found = (  # (2) the weights directory, (3) the Hugging Face cache, (4) the torch hub cache
        _find_in_weights_dir(weights_dir, lambda folder: _weights_dir_candidates(folder, cfg, pcfg), tried)
        or _find_in_hf_cache(pcfg, tried)
        or _find_in_torch_cache(pcfg, tried)
    )
    if found is not None:
        return found
    # (5) download, when allowed
    if allow_download:
        return _download_source(cfg, pcfg, tried)
    raise _weights_not_found(cfg, tried)


def _explicit_weights(path: Path, cfg: BackboneCfg, dir_files: list[Path],
                      errors: _ExplicitWeightsErrors) -> WeightsSource:
    """Step (1): ``path`` is a weights file, or a directory holding one of ``dir_files`` (the first found)."""
    fields = {"path": str(path), "name": cfg.name, "files": ", ".join(f.name for f in dir_files),
              "suffix": path.suffix, "suffixes": ", ".join(WEIGHT_SUFFIXES)}
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ValueError(errors.bad_suffix.format(**fields))
        return _weights_source_for(path, "file")
    if path.is_dir():
        for candidate in dir_files:
            if candidate.is_file():
                return _weights_source_for(candidate, "directory")
        raise WeightsNotFoundError(errors.empty_dir.format(**fields), [str(f) for f in dir_files])
    raise WeightsNotFoundError(errors.missing.format(**fields), [str(path)])


def _find_in_weights_dir(weights_dir: str | os.PathLike | None, candidates: Callable[[Path], list[Path]],
                         tried: list[str]) -> WeightsSource | None:
    """Step (2): the first of ``candidates(folder)`` that exists, in ``weights_dir``, else ``$SWSA_WEIGHTS_DIR``."""
    folder = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV) or None
    if folder is None:
        tried.append(f"weights directory (none: no weights_dir given and ${WEIGHTS_DIR_ENV} not set)")
        return None
    for candidate in candidates(Path(folder).expanduser()):
        tried.append(str(candidate))
        if candidate.is_file():
            return _weights_source_for(candidate, "directory")
    return None


def _weights_dir_candidates(folder: Path, cfg: BackboneCfg, pcfg) -> list[Path]:
    """The files looked for in a weights directory, in order, without repeats."""
    stems = [cfg.name]
    if cfg.timm_model_name != cfg.name:
        stems.append(cfg.timm_model_name)
    candidates = _stem_files(folder, stems)
    subdirs = [folder / cfg.timm_model_name]
    if pcfg is not None and pcfg.hf_hub_id:
        subdirs.append(folder / _split_hf_id(pcfg.hf_hub_id)[0])
    for sub in dict.fromkeys(subdirs):
        candidates += _dir_weight_files(sub, pcfg)
    url_name = _url_basename(pcfg)
    if url_name:
        candidates.append(folder / url_name)
    return list(dict.fromkeys(candidates))


def _download_source(cfg: BackboneCfg, pcfg, tried: list[str]) -> WeightsSource:
    """Step (5): a download through timm, if timm knows where this model's weights are."""
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url):
        raise WeightsNotFoundError(
            f"backbone {cfg.name!r} (timm {cfg.timm_model_name}) has no downloadable weights "
            f"in timm; pass a weights file or weights='random'",
            tried,
        )
    return WeightsSource(kind="download")


def _weights_not_found(cfg: BackboneCfg, tried: list[str]) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"no weights for backbone {cfg.name!r} (timm {cfg.timm_model_name}); looked in: "
        + "; ".join(tried)
        + f". Fix: pass weights=<file or directory>, put the file in a folder named by "
        f"${WEIGHTS_DIR_ENV} (e.g. {cfg.name}.safetensors), allow downloads "
        f"(allow_download=True), or pass weights='random' for an explicitly "
        f"random model",
        tried,
    )


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
    repo_id, revision = _split_hf_id(pcfg.hf_hub_id)
    filenames = [f.name for f in _dir_weight_files(Path("."), pcfg)]
    repo_folder = _hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    tried.append(f"Hugging Face cache {repo_folder} ({revision or 'main'}: {', '.join(filenames)})")
    return _hf_cached_file(repo_id, filenames, revision)


def _hf_cached_file(repo_id: str, filenames: list[str], revision: str | None = None) -> WeightsSource | None:
    """The first of ``filenames`` of ``repo_id`` (``None``: main) in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = _hf_hub_cache_dir()
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id=repo_id, filename=filename,
                                           cache_dir=str(cache_dir), revision=revision)
        except Exception as e:  # a malformed cache must not stop the search
            log.debug("HF cache lookup of %s/%s failed: %s", repo_id, filename, e)
            continue
        if isinstance(found, str) and os.path.isfile(found):
            return _weights_source_for(Path(found), "hf-cache")
    return None


def _find_in_torch_cache(pcfg, tried: list[str]) -> WeightsSource | None:
    """Step (4): timm's download of the model's url in the torch hub cache."""
    url_name = _url_basename(pcfg)
    if not url_name:
        tried.append("torch hub cache (no .pth/.bin url for this model)")
        return None
    return _find_downloaded(Path(torch.hub.get_dir()) / "checkpoints" / url_name, "torch hub cache", tried)


def _find_downloaded(path: Path, cache_name: str, tried: list[str]) -> WeightsSource | None:
    """``path``, where a library's download cache (``cache_name``, for ``tried``) keeps a file."""
    tried.append(f"{cache_name} {path}")
    return _weights_source_for(path, "torch-cache") if path.is_file() else None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_state_dict(path: Path, cfg: BackboneCfg) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or torch file, unwrapping common wrappers."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            checkpoint: Any = load_file(str(path), device="cpu")
        else:
            # weights only (no arbitrary pickles); timm training checkpoints carry an argparse.Namespace
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsLoadError(
            f"could not read weights file {path} for backbone {cfg.name!r}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    for _ in range(3):  # {"state_dict": ...}, {"model": ...}, possibly nested
        if isinstance(checkpoint, Mapping):
            inner = next((checkpoint[k] for k in ("state_dict", "model")
                          if isinstance(checkpoint.get(k), Mapping)), None)
            if inner is not None:
                checkpoint = inner
                continue
        break
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()
    ):
        what = (f"a dict with keys {', '.join(map(str, list(checkpoint)[:6]))}"
                if isinstance(checkpoint, Mapping) else type(checkpoint).__name__)
        raise WeightsLoadError(
            f"weights file {path} for backbone {cfg.name!r} is not a state dict of tensors "
            f"(it holds {what})"
        )
    cleaned = {}
    for key, value in checkpoint.items():
        while key.startswith(("module.", "_orig_mod.")):  # DDP / torch.compile wrappers
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


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


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def _key_report(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, mismatched


def _load_weights_into(model: torch.nn.Module, path: Path, cfg: BackboneCfg) -> None:
    state_dict = _read_state_dict(path, cfg)
    filter_fn = _checkpoint_filter(cfg)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as e:
            raise WeightsLoadError(
                f"weights file {path} does not fit backbone {cfg.name!r} "
                f"(timm {cfg.timm_model_name}): {type(e).__name__}: {e}"
            ) from None
    missing, unexpected, mismatched = _key_report(model, state_dict)
    heads = _classifier_prefixes(model)
    if missing and not unexpected and not mismatched and heads and all(k.startswith(heads) for k in missing):
        # a checkpoint of the feature extractor alone: its classifier is dropped anyway
        model.reset_classifier(0)
        missing, unexpected, mismatched = _key_report(model, state_dict)
    if not (missing or unexpected or mismatched):
        try:
            model.load_state_dict(state_dict, strict=True)
            return
        except RuntimeError as e:
            detail = str(e).splitlines()[0]
    else:
        detail = ""

    def some(items: list[str]) -> str:
        shown = ", ".join(items[:4])
        return shown + (f", ... ({len(items)} in all)" if len(items) > 4 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({some(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches ({some(mismatched)})")
    if detail:
        parts.append(detail)
    raise WeightsLoadError(
        f"weights file {path} does not fit backbone {cfg.name!r} (timm {cfg.timm_model_name}): "
        + "; ".join(parts)
        + ". Is it the checkpoint of this architecture?"
    )


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
    ``(B, feature_dim)`` penultimate features. The model is in eval mode with no gradients."""

    cfg: BackboneCfg
    model: torch.nn.Module
    transform: Callable
    preprocess: PreprocessCfg
    weights: WeightsSource
    feature_dim: int
    n_params: int
    device: str = "cpu"
    image_size: int | None = field(default=None)

    def attrs(self) -> dict[str, Any]:
        """Everything that describes embeddings made with this backbone (JSON-friendly)."""
        import timm

        return {
            "backbone": self.cfg.name,
            "timm_name": self.cfg.timm_name,
            "pretrained_tag": _attr_value(self.cfg.pretrained_tag),
            "timm_model": self.cfg.timm_model_name,
            "family": self.cfg.family,
            "description": self.cfg.description,
            "feature_dim": int(self.feature_dim),
            "n_params": int(self.n_params),
            "weights_kind": self.weights.kind,
            "weights_path": _attr_value(self.weights.path),
            "weights_sha256": _attr_value(self.weights.sha256),
            "image_size": _attr_value(self.image_size),
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
) -> LoadedBackbone:
    """Build ``cfg``'s model with weights from :func:`resolve_weights` (see its search order).

    ``image_size`` overrides the input resolution (e.g. 64 for CPU demos); ViT-like models are
    built for it (position embeddings resampled from the weights). ``weights="random"``
    builds a randomly initialised model, deterministically, and warns.
    """
    if cfg.family == "pixels":
        return load_pixels_backbone(cfg, device=device)
    if cfg.family == "clip":  # open_clip image tower, its own preprocessing and weights search
        from .clip import load_clip_backbone

        return load_clip_backbone(cfg, weights, weights_dir=weights_dir, allow_download=allow_download,
                                  image_size=image_size, device=device)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    source = resolve_weights(cfg, weights, weights_dir=weights_dir, allow_download=allow_download)
    model, source = _model_with_weights(cfg, source, _model_kwargs(cfg, image_size), weights_dir=weights_dir)
    model.reset_classifier(0)
    model.eval().requires_grad_(False)
    feature_dim = _model_feature_dim(model)
    if cfg.feature_dim is not None and feature_dim != cfg.feature_dim:
        raise RuntimeError(
            f"backbone {cfg.name!r} is registered with feature_dim={cfg.feature_dim} but timm "
            f"{cfg.timm_model_name} gives {feature_dim}-d features"
        )
    if cfg.feature_dim is None:
        cfg = dataclasses.replace(cfg, feature_dim=feature_dim)
    preprocess, transform = _test_preprocessing(model, image_size)
    model = model.to(device)
    return LoadedBackbone(
        cfg=cfg,
        model=model,
        transform=transform,
        preprocess=preprocess,
        weights=source,
        feature_dim=feature_dim,
        n_params=sum(p.numel() for p in model.parameters()),
        device=str(device),
        image_size=image_size,
    )


def _model_with_weights(cfg: BackboneCfg, source: WeightsSource, model_kwargs: dict[str, Any], *,
                        weights_dir: str | os.PathLike | None) -> tuple[torch.nn.Module, WeightsSource]:
    """The timm model of ``cfg`` with the weights of ``source``, and the source to record.

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
        return model, source
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
    else:
        _load_weights_into(model, Path(source.path), cfg)
        log.info("loaded %s weights from %s (%s)", cfg.name, source.path, source.kind)
    return model, source


def _test_preprocessing(model: torch.nn.Module, image_size: int | None) -> tuple[PreprocessCfg, Callable]:
    """timm's test-time preprocessing of ``model`` (at ``image_size`` when given), and its transform."""
    from timm.data import create_transform, resolve_model_data_config

    args = {"input_size": (3, image_size, image_size)} if image_size is not None else None
    preprocess = PreprocessCfg.from_data_config(resolve_model_data_config(model, args=args))
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


# --------------------------------------------------------------------------------------------
# Patch tokens (swsa embed --patch-tokens): the local features of the patch-level detector
# --------------------------------------------------------------------------------------------

#: The CNN stage whose feature map becomes the patch tokens: the deepest one with at most this
#: output stride (ResNets: ``layer3``, 14 x 14 at 224 px — PatchCore's mid-level choice; the
#: final ``layer4`` map is 7 x 7 and biased towards ImageNet classes).
PATCH_CNN_MAX_REDUCTION = 16


class PatchTokenModel(torch.nn.Module):
    """One forward pass giving ``(pooled (B, D), tokens (B, P, D'))`` for ``x`` ``(B, 3, H, W)``.

    ``pooled`` equals ``model(x)`` (timm's ``forward_head(forward_features(x))``), so pooled
    embeddings are the same with or without patch tokens. ``tokens``: for ViTs the final
    (normed) tokens of ``forward_features`` without the class/register tokens; for CNNs the
    feature map of ``stage`` (captured by a forward hook), ``(B, C, h, w)`` → ``(B, h*w, C)``
    in row-major (y, x) order.
    """

    def __init__(self, model: torch.nn.Module, *, n_prefix_tokens: int = 0, stage: str | None = None,
                 stage_channels: int | None = None):
        super().__init__()
        self.model = model
        self.n_prefix_tokens = int(n_prefix_tokens)
        self.stage = stage
        self.stage_channels = stage_channels
        self.grid: tuple[int, int] | None = None  # (h, w) of the last CNN feature map

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = None
        if self.stage is not None:
            module = self.model.get_submodule(self.stage)
            handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            features = self.model.forward_features(x)
            pooled = self.model.forward_head(features)
        finally:
            if handle is not None:
                handle.remove()
        if self.stage is None:
            return pooled, features[:, self.n_prefix_tokens:]
        fmap = captured[-1]
        if fmap.ndim != 4:
            raise RuntimeError(f"stage {self.stage} gave a {fmap.ndim}-d output, not a (B, C, h, w) feature map")
        if fmap.shape[1] != self.stage_channels and fmap.shape[-1] == self.stage_channels:  # NHWC models
            fmap = fmap.permute(0, 3, 1, 2)
        self.grid = (int(fmap.shape[2]), int(fmap.shape[3]))
        return pooled, fmap.flatten(2).transpose(1, 2)


def patch_token_model(loaded: LoadedBackbone) -> tuple[PatchTokenModel, dict[str, Any]]:
    """Wrap a loaded timm backbone so that it also returns patch tokens; with their attributes.

    ViTs (models with ``patch_embed`` and ``num_prefix_tokens``): the patch tokens of
    ``forward_features``. Other timm models: the feature map of the deepest stage of
    ``feature_info`` with output stride <= :data:`PATCH_CNN_MAX_REDUCTION` (ResNets: ``layer3``).
    The attributes (JSON-friendly) say which: ``token_source``, ``layer``, ``grid`` ``[h, w]``,
    ``n_patches``, ``patch_dim``, ``n_prefix_tokens_dropped``, ``reduction``, ``dtype`` (float16)
    and ``bytes_per_image``; the grid comes from one dry forward pass at the input size.
    """
    model, cfg = loaded.model, loaded.cfg
    if cfg.family in ("pixels", "clip"):
        raise ValueError(
            f"patch tokens are made by timm backbones (ViT tokens, CNN feature maps); {cfg.name!r} is a "
            f"{cfg.family} feature source: embed it without --patch-tokens, or pick a timm/ResNet/ViT backbone"
        )
    is_vit = hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
    if is_vit:
        wrapper = PatchTokenModel(model, n_prefix_tokens=model.num_prefix_tokens)
        layer, source, reduction = "forward_features", "vit-patch-tokens", None
        patch = getattr(model.patch_embed, "patch_size", None)
        reduction = int(patch[0]) if patch is not None else None
    else:
        info = getattr(model, "feature_info", None)
        stages = [f for f in (info or []) if int(f.get("reduction", 0)) <= PATCH_CNN_MAX_REDUCTION]
        if not stages:
            raise ValueError(
                f"backbone {cfg.name!r} (timm {cfg.timm_model_name}) lists no feature stage with output stride "
                f"<= {PATCH_CNN_MAX_REDUCTION}; embed it without --patch-tokens"
            )
        stage = stages[-1]
        wrapper = PatchTokenModel(model, stage=stage["module"], stage_channels=int(stage["num_chs"]))
        layer, source, reduction = stage["module"], "cnn-feature-map", int(stage["reduction"])
    wrapper.eval()
    device = next(model.parameters(), torch.empty(0)).device
    with torch.inference_mode():
        _, tokens = wrapper(torch.zeros((1, *loaded.preprocess.input_size), device=device))
    n_patches, patch_dim = int(tokens.shape[1]), int(tokens.shape[2])
    grid = [int(g) for g in (getattr(model.patch_embed, "grid_size", (0, 0)) if is_vit else wrapper.grid)]
    if grid[0] * grid[1] != n_patches:
        grid = [n_patches, 1]
    attrs = {
        "token_source": source,
        "layer": layer,
        "description": ("final (normed) ViT tokens of forward_features without the class/register tokens"
                        if is_vit else f"feature map of stage {layer} (output stride {reduction}), "
                                       f"(C, h, w) flattened row-major to (h*w, C)"),
        "grid": grid,
        "n_patches": n_patches,
        "patch_dim": patch_dim,
        "n_prefix_tokens_dropped": int(getattr(model, "num_prefix_tokens", 0)) if is_vit else 0,
        "reduction": _attr_value(reduction),
        "dtype": "float16",
        "bytes_per_image": n_patches * patch_dim * 2,
    }
    return wrapper, attrs
