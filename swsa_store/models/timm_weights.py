"""Where the weights of a timm backbone come from: :func:`resolve_weights`, offline first.


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
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from swsa_store.models.backbone_cfg import TIMM_PREFIX, BackboneCfg
from swsa_store.models.packaged_weights import PackagedWeights, find_packaged_weights, packaged_weights_for_architecture
from swsa_store.models.weights import (
    DIR_WEIGHT_FILES, WEIGHT_SUFFIXES, ExplicitWeightsErrors, WeightsNotFoundError, WeightsSource, explicit_weights,
    find_downloaded, find_in_weights_dir, fix_hint, hf_cached_file, hf_hub_cache_dir, split_hf_id, stem_files,
    weights_request,
)

__all__ = ["names_timm_tag", "resolve_weights"]


def names_timm_tag(cfg: BackboneCfg) -> bool:
    """Whether ``cfg`` is a ``timm/<arch>.<tag>`` name: it asks for that tag's weights explicitly."""
    return cfg.name.startswith(TIMM_PREFIX) and "." in cfg.name[len(TIMM_PREFIX):]


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
    if cfg.name.startswith(TIMM_PREFIX) and not names_timm_tag(cfg):
        return packaged_weights_for_architecture(cfg.timm_name)
    return None


def _weights_dir_candidates(folder: Path, cfg: BackboneCfg, pcfg) -> list[Path]:
    """The files looked for in a weights directory, in order, without repeats."""
    stems = [cfg.name]
    if cfg.timm_model_name != cfg.name:
        stems.append(cfg.timm_model_name)
    if not names_timm_tag(cfg):  # <dir>/<arch>.<ext>, unless a tag was asked for by name
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
    other = packaged_weights_for_architecture(cfg.timm_name) if names_timm_tag(cfg) else None
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
