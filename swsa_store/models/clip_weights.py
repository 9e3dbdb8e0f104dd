"""CLIP names and weights: ``clip/<open_clip architecture>[@<pretrained tag>]`` as a
:class:`~swsa_store.models.backbone_cfg.BackboneCfg`, custom architectures, and where the
weights come from (used by :mod:`swsa_store.models.clip`).

Weights, offline first (``weights=None`` / ``"auto"``), in this order:

1. an explicit ``weights=`` file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``) or a folder holding
   ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``;
2. the weights directory (``weights_dir``, else ``$SWSA_WEIGHTS_DIR``)::

       <dir>/<arch>@<tag>.<suffix>        e.g. ViT-B-16-plus-240@laion400m_e32.pt
       <dir>/<arch>.<tag>.<suffix>
       <dir>/<basename of open_clip's url>  e.g. vit_b_16_plus_240-laion400m_e32-699c4b84.pt
       <dir>/<hf repo name>/open_clip_model.safetensors | open_clip_pytorch_model.bin

3. the Hugging Face cache (open_clip's ``hf_hub`` repo for the tag);
4. open_clip's own download cache (``~/.cache/clip/<basename of the url>``);
5. a download through open_clip — only with ``allow_download=True``.

``weights="random"`` builds the architecture with a fixed seed and warns loudly
(:class:`~swsa_store.models.weights.RandomWeightsWarning`).
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

from swsa_store.models.backbone_cfg import BackboneCfg
from swsa_store.models.weights import (
    ExplicitWeightsErrors, WeightsNotFoundError, WeightsSource, explicit_weights, find_downloaded,
    find_in_weights_dir, fix_hint, hf_cached_file, stem_files, weights_request,
)
from swsa_store.registry import UnknownNameError

__all__ = [
    "CLIP_DIR_FILES", "CLIP_PREFIX", "clip_backbone_cfg", "clip_tag_cfg", "parse_clip_name",
    "register_clip_architecture", "resolve_clip_weights",
]

CLIP_PREFIX = "clip/"
#: Files looked for inside a weights folder.
CLIP_DIR_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

_CUSTOM_ARCHS: dict[str, dict] = {}


def register_clip_architecture(name: str, config: dict, *, overwrite: bool = False) -> None:
    """Make an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) available as
    ``clip/<name>`` — e.g. a tiny one for tests, or a config of a local checkpoint."""
    from open_clip import factory

    if not overwrite and (name in _CUSTOM_ARCHS or name in factory._MODEL_CONFIGS):
        raise ValueError(f"CLIP architecture {name!r} already exists; pass overwrite=True")
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise ValueError("a CLIP config needs embed_dim, vision_cfg and text_cfg (see open_clip's model_configs)")
    _CUSTOM_ARCHS[name] = copy.deepcopy(config)
    factory._MODEL_CONFIGS[name] = copy.deepcopy(config)


def parse_clip_name(name: str) -> tuple[str, str | None]:
    """``clip/<arch>[@<tag>]`` → ``(arch, tag or None)``."""
    spec = name[len(CLIP_PREFIX):] if name.startswith(CLIP_PREFIX) else name
    arch, _, tag = spec.partition("@")
    return arch, (tag or None)


def clip_backbone_cfg(name: str) -> BackboneCfg:
    """The :class:`BackboneCfg` of ``clip/<arch>[@<tag>]`` (family ``clip``)."""
    import open_clip

    arch, tag = parse_clip_name(name)
    if open_clip.get_model_config(arch) is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f" Did you mean {', '.join(CLIP_PREFIX + c for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown open_clip architecture {arch!r} in {name!r}.{hint} "
                               f"See open_clip.list_models() or register_clip_architecture()")
    if tag is not None and not open_clip.get_pretrained_cfg(arch, tag):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise UnknownNameError(f"open_clip architecture {arch!r} has no pretrained tag {tag!r}; its tags: "
                               f"{', '.join(tags) or '(none)'} (or load a file with weights=PATH and no tag)")
    embed_dim = int(open_clip.get_model_config(arch)["embed_dim"])
    return BackboneCfg(name=f"{CLIP_PREFIX}{arch}" + (f"@{tag}" if tag else ""), timm_name=arch, pretrained_tag=tag,
                       family="clip", feature_dim=embed_dim,  # type: ignore[arg-type]
                       description=f"open_clip {arch}" + (f" ({tag})" if tag else "") + f", {embed_dim}-d joint embedding")


def clip_tag_cfg(cfg: BackboneCfg) -> dict:
    """open_clip's pretrained config of ``cfg``'s tag (url, hf_hub, mean, std, ...); ``{}`` without a tag."""
    import open_clip

    return dict(open_clip.get_pretrained_cfg(cfg.timm_name, cfg.pretrained_tag) or {}) if cfg.pretrained_tag else {}


def _url_name(tag_cfg: dict) -> str | None:
    url = tag_cfg.get("url") or ""
    return os.path.basename(url) or None


_CLIP_EXPLICIT_ERRORS = ExplicitWeightsErrors(
    bad_suffix="weights file {path} has an unsupported ending; use one of {suffixes}",
    empty_dir="weights folder {path} for {name!r} holds none of {files}",
    missing="weights {path!r} for {name!r} do not exist",
)


def resolve_clip_weights(cfg: BackboneCfg, weights: str | os.PathLike | None = None, *,
                         weights_dir: str | os.PathLike | None = None, allow_download: bool = False) -> WeightsSource:
    """Find the CLIP weights of ``cfg`` without the network (see the module docstring)."""
    request = weights_request(weights)
    if isinstance(request, WeightsSource):
        return request
    tag_cfg = clip_tag_cfg(cfg)

    # (1) an explicit path
    if request is not None:
        path = Path(request).expanduser()
        return explicit_weights(path, cfg.name, [path / name for name in CLIP_DIR_FILES], _CLIP_EXPLICIT_ERRORS)

    tried: list[str] = []  # every place looked at, for the error
    found = (  # (2) the weights directory, (3) the Hugging Face cache, (4) open_clip's download cache
        find_in_weights_dir(weights_dir, lambda folder: _clip_weights_dir_candidates(folder, cfg, tag_cfg), tried)
        or _find_in_clip_hf_cache(tag_cfg, tried)
        or _find_in_open_clip_cache(tag_cfg, tried)
    )
    if found is not None:
        return found
    # (5) download through open_clip, when allowed
    if allow_download:
        return _clip_download_source(cfg, tag_cfg, tried)
    raise _clip_weights_not_found(cfg, tried)


def _open_clip_hf_files(tag_cfg: dict) -> tuple[str, list[str]] | None:
    """The Hugging Face repo of a tag and the files looked for in it; ``None`` when it has none.

    open_clip's ``hf_hub`` entries are ``"org/repo/"`` (default file names) or ``"org/repo/<file>"``.
    """
    hf_hub = tag_cfg.get("hf_hub") or ""
    if not hf_hub.strip("/"):
        return None
    parts = hf_hub.split("/")
    named_file = [parts[2]] if len(parts) > 2 and parts[2] else []
    return "/".join(parts[:2]), named_file + list(CLIP_DIR_FILES)


def _clip_weights_dir_candidates(folder: Path, cfg: BackboneCfg, tag_cfg: dict) -> list[Path]:
    """The files looked for in a weights directory, in the module docstring's order."""
    stems = [f"{cfg.timm_name}@{cfg.pretrained_tag}", f"{cfg.timm_name}.{cfg.pretrained_tag}"] if cfg.pretrained_tag \
        else [cfg.timm_name]
    candidates = stem_files(folder, stems)
    url_name = _url_name(tag_cfg)
    if url_name:
        candidates.append(folder / url_name)
    hf_files = _open_clip_hf_files(tag_cfg)
    if hf_files is not None:
        repo_id, filenames = hf_files
        candidates += [folder / repo_id.split("/")[-1] / name for name in filenames]
    return candidates


def _find_in_clip_hf_cache(tag_cfg: dict, tried: list[str]) -> WeightsSource | None:
    """Step (3): the tag's ``hf_hub`` repo in the Hugging Face cache."""
    hf_files = _open_clip_hf_files(tag_cfg)
    if hf_files is None:
        return None
    repo_id, filenames = hf_files
    tried.append(f"Hugging Face cache {repo_id}")
    return hf_cached_file(repo_id, filenames)


def _find_in_open_clip_cache(tag_cfg: dict, tried: list[str]) -> WeightsSource | None:
    """Step (4): open_clip's download of the tag's url, in ``~/.cache/clip``."""
    url_name = _url_name(tag_cfg)
    if not url_name:
        return None
    return find_downloaded(Path(os.path.expanduser("~/.cache/clip")) / url_name, "open_clip cache", tried)


def _clip_download_source(cfg: BackboneCfg, tag_cfg: dict, tried: list[str]) -> WeightsSource:
    """Step (5): a download through open_clip, if open_clip knows the name's pretrained tag."""
    if not tag_cfg:
        raise WeightsNotFoundError(f"{cfg.name!r} names no pretrained tag; nothing to download", tried)
    return WeightsSource(kind="download")


def _clip_weights_not_found(cfg: BackboneCfg, tried: list[str]) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"no weights for CLIP {cfg.name!r}; looked in: " + "; ".join(tried)
        + ". " + fix_hint(f"{cfg.timm_name}@{cfg.pretrained_tag}.pt", download=bool(cfg.pretrained_tag)), tried)
