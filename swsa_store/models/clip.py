"""CLIP through open_clip: image embeddings as a backbone, text embeddings of prompts, prompt
sets (SWSA paper, Appendix A) and the BLISS dictionary (Goodge et al.).

Names. A CLIP backbone is ``clip/<open_clip architecture>[@<pretrained tag>]``, e.g. the
paper's ``clip/ViT-B-16-plus-240@laion400m_e32``. Its image embeddings go through the ordinary
:func:`swsa_store.ingest.embed_store` (the model's own preprocessing, ``encode_image`` output,
*not* normalised — the scores normalise) and are stored as ``/embeddings/clip-<arch>@<tag>``.
Architectures that open_clip does not ship can be added with :func:`register_clip_architecture`
(a model config dict, as in open_clip's ``model_configs/*.json``) — the tests use a tiny one.

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
(:class:`~swsa_store.models.backbones.RandomWeightsWarning`).

Text. :func:`embed_text_store` embeds, once, every prompt of every task for each prompt set,
the BLISS class prompts ("This is a photo of a {class label}") and the BLISS dictionary, and
writes them under ``/text/<embedding name>/<set>`` (strings, L2-normalised embeddings, a row
table ``task_id, template, side, row`` and attrs with the model, its logit scale and the
normalisation). Identical strings are embedded once.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from swsa_store.models.backbones import RANDOM_INIT_SEED, BackboneCfg, LoadedBackbone
from swsa_store.models.checkpoints import WeightsLoadError
from swsa_store.models.preprocessing import PreprocessCfg
from swsa_store.registry import UnknownNameError
from swsa_store.models.weights import (
    ExplicitWeightsErrors, RandomWeightsWarning, WeightsNotFoundError, WeightsSource, attr_value, explicit_weights,
    find_downloaded, find_in_weights_dir, fix_hint, hf_cached_file, stem_files, weights_request,
)

if TYPE_CHECKING:
    from swsa_store.store import TextEmbeddings

log = logging.getLogger(__name__)

__all__ = [
    "BLISS_TEMPLATE", "CLIP_PREFIX", "PAPER_CLIP", "PAPER_TEMPLATES", "GENERIC_TEMPLATES", "ClipModel", "PromptSet",
    "bliss_dictionary", "clip_backbone_cfg", "embed_text_store", "embed_texts", "load_clip", "load_prompt_file",
    "paper_prompt_set", "read_text_prior_inputs", "register_clip_architecture", "resolve_clip_weights",
    "task_prompt_table", "text_model_name", "TextPriorInputs",
]

CLIP_PREFIX = "clip/"
#: The SWSA paper's CLIP (Section 4.3): ViT-B-16-plus-240 with LAION-400M weights.
PAPER_CLIP = "clip/ViT-B-16-plus-240@laion400m_e32"
#: BLISS's prompt for class labels and dictionary entries (Section 5).
BLISS_TEMPLATE = "This is a photo of a {}"
#: Files looked for inside a weights folder.
CLIP_DIR_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# --------------------------------------------------------------------------------------------
# Prompt sets (SWSA paper, Appendix A): (normal, anomaly) template pairs, the default first.
# --------------------------------------------------------------------------------------------

_PHRASES = [("a photo of a {}", "a photo of {}"), ("a cropped photo of a {}", "a cropped photo of {}"),
            ("a dark photo of a {}", "a dark photo of {}"), ("a photo of a {} for inspection", "a photo of {} for inspection"),
            ("a photo of a {} for viewing", "a photo of {} for viewing"), ("a bright photo of a {}", "a bright photo of {}"),
            ("a close-up photo of a {}", "a close-up photo of {}"), ("a blurry photo of a {}", "a blurry photo of {}"),
            ("a photo of a small {}", "a photo of a small {}"), ("a photo of a large {}", "a photo of a large {}")]


def _natural(noun: str) -> list[tuple[str, str]]:
    pairs = []
    for normal, anomaly in _PHRASES:
        pairs.append((normal.replace("{}", "{} " + noun), anomaly.replace("{}", "some " + noun)))
    return pairs


#: Appendix A, verbatim (including its "a photo of a small some bird" and
#: "a blurry photo of {} with defect" wordings).
PAPER_TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "flowers": _natural("flower"),
    "cub": _natural("bird"),
    "industrial": [
        ("a photo of a {}", "a photo of a {} with defect"),
        ("a cropped photo of a {}", "a cropped photo of a {} with defect"),
        ("a dark photo of a {}", "a dark photo of a {} with defect"),
        ("a photo of a {} for inspection", "a photo of a {} with defect for inspection"),
        ("a photo of a {} for viewing", "a photo of a {} with defect for viewing"),
        ("a bright photo of a {}", "a bright photo of a {} with defect"),
        ("a close-up photo of a {}", "a close-up photo of a {} with defect"),
        ("a blurry photo of a {}", "a blurry photo of {} with defect"),
        ("a photo of a small {}", "a photo of a small {} with defect"),
        ("a photo of a large {}", "a photo of a large {} with defect"),
    ],
}
#: Not from the paper: the same ten phrasings for other multi-class datasets, anomaly = "some object".
GENERIC_TEMPLATES: list[tuple[str, str]] = [(n, a.replace("{}", "some object")) for n, a in _PHRASES]
# which family a dataset uses; defect-protocol datasets default to "industrial"
_DATASET_FAMILY = {"flowers": "flowers", "oxford_flowers": "flowers", "cub": "cub", "cub200": "cub",
                   "mvtec": "industrial", "mvtec_ad": "industrial", "visa": "industrial"}


@dataclass
class PromptSet:
    """Template pairs per dataset: ``templates[key]`` is a list of ``(normal, anomaly)`` strings
    with ``{}`` standing for the task's class label; the first pair is the default prompt.

    ``key`` is a dataset name, a protocol (``"defect"``, ``"multiclass"``) or ``"*"`` (any).
    All lists of one set have the same length (the prompts are candidates ``prompt01``...).
    """

    name: str
    templates: dict[str, list[tuple[str, str]]]
    description: str = ""

    def __post_init__(self):
        lengths = {k: len(v) for k, v in self.templates.items()}
        if not lengths or min(lengths.values()) == 0:
            raise ValueError(f"prompt set {self.name!r} has no templates")
        if len(set(lengths.values())) > 1:
            raise ValueError(f"prompt set {self.name!r}: every template list must have the same length, got {lengths}")
        for key, pairs in self.templates.items():
            for pair in pairs:
                if len(pair) != 2 or not all(isinstance(p, str) and p.strip() for p in pair):
                    raise ValueError(f"prompt set {self.name!r}, {key!r}: each template is a [normal, anomaly] pair "
                                     f"of non-empty strings, got {pair!r}")
        self.templates = {k: [tuple(p) for p in v] for k, v in self.templates.items()}

    @property
    def n_templates(self) -> int:
        return len(next(iter(self.templates.values())))

    def templates_for(self, dataset: str, protocol: str = "multiclass") -> list[tuple[str, str]]:
        for key in (dataset, _DATASET_FAMILY.get(dataset.lower()), protocol,
                    "industrial" if protocol == "defect" else None, "*"):
            if key is not None and key in self.templates:
                return self.templates[key]
        raise ValueError(f"prompt set {self.name!r} has no templates for dataset {dataset!r} "
                         f"(keys: {', '.join(self.templates)}); add a '*' entry")


def paper_prompt_set() -> PromptSet:
    """Appendix A's three families (+ a generic one for other datasets), named ``paper``."""
    return PromptSet("paper", {**{k: list(v) for k, v in PAPER_TEMPLATES.items()}, "*": list(GENERIC_TEMPLATES)},
                     "SWSA paper Appendix A (flowers, cub, industrial = MVTec-AD / VisA); '*' other datasets")


def load_prompt_file(path: str | os.PathLike) -> PromptSet:
    """A user prompt set from TOML or JSON::

        name = "mine"                       # prompt set name (default: the file's stem)
        [templates]
        "*" = [["a photo of a {}", "a photo of a damaged {}"],   # first = default prompt
               ["a close-up photo of a {}", "a close-up photo of a broken {}"]]
        my_dataset = [[...], [...]]         # optional per-dataset (or "defect"/"multiclass") lists
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    templates = data.get("templates")
    if isinstance(templates, list):
        templates = {"*": templates}
    if not isinstance(templates, dict):
        raise ValueError(f"prompt file {path} needs a 'templates' table: {{dataset or '*': [[normal, anomaly], ...]}}")
    return PromptSet(str(data.get("name") or path.stem), templates, str(data.get("description", f"from {path}")))


def _fill(template: str, label: str) -> str:
    return template.replace("{}", label)


def task_label(task) -> str:
    """The cleaned class name of a task row (``class_label``, else ``normal_class``)."""
    label = getattr(task, "class_label", None)
    if label is None or (isinstance(label, float) and np.isnan(label)) or not str(label).strip():
        label = task.normal_class
    return str(label)


def task_prompt_table(tasks: pd.DataFrame, prompt_set: PromptSet) -> pd.DataFrame:
    """Rows ``(task_id, template, side, text)`` for every task of ``tasks``; side 0 = normal, 1 = anomaly."""
    rows = []
    for task in tasks.itertuples(index=False):
        protocol = str(getattr(task, "protocol", "") or "multiclass")
        label = task_label(task)
        for j, (normal, anomaly) in enumerate(prompt_set.templates_for(str(task.dataset), protocol)):
            rows.append((int(task.task_id), j, 0, _fill(normal, label)))
            rows.append((int(task.task_id), j, 1, _fill(anomaly, label)))
    return pd.DataFrame(rows, columns=["task_id", "template", "side", "text"]).astype(
        {"task_id": np.int64, "template": np.int64, "side": np.int8})


def bliss_dictionary(unique: bool = True, template: str | None = BLISS_TEMPLATE) -> list[str]:
    """BLISS's dictionary: the ImageNet-1k class names (timm's lemma list), split at commas into
    separate entries ("goldfish, Carassius auratus" → "goldfish", "Carassius auratus"), 1,860
    entries; ``unique=True`` (default) drops repeated names (e.g. two "crane"s) keeping the first:
    1,842. Each entry is put in ``template`` (``None``: the bare entries)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    entries = []
    for i in range(info.num_classes()):
        entries += [part.strip() for part in info.index_to_description(i).split(",") if part.strip()]
    if unique:
        entries = list(dict.fromkeys(entries))
    return [_fill(template, e) for e in entries] if template else entries


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

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
        import difflib

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


def _tag_cfg(cfg: BackboneCfg) -> dict:
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
    tag_cfg = _tag_cfg(cfg)

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


@dataclass
class ClipModel:
    """A loaded open_clip model: image and text towers, tokenizer, preprocessing, provenance."""

    cfg: BackboneCfg
    model: torch.nn.Module
    tokenizer: Any
    transform: Any
    preprocess: PreprocessCfg
    weights: WeightsSource
    embed_dim: int
    logit_scale: float
    device: str = "cpu"
    image_size: int | None = None
    n_params: int = 0

    @property
    def embedding_name(self) -> str:
        return self.cfg.name.replace("/", "-")

    def attrs(self) -> dict[str, Any]:
        import open_clip
        import timm

        return {
            "backbone": self.cfg.name, "timm_name": self.cfg.timm_name, "pretrained_tag": attr_value(self.cfg.pretrained_tag),
            "timm_model": self.cfg.timm_model_name, "family": "clip", "description": self.cfg.description,
            "feature_dim": int(self.embed_dim), "n_params": int(self.n_params), "weights_kind": self.weights.kind,
            "weights_origin": self.weights.origin, "weights_path": attr_value(self.weights.path),
            "weights_sha256": attr_value(self.weights.sha256),
            "image_size": attr_value(self.image_size), "preprocess": self.preprocess.to_attrs(),
            "logit_scale": float(self.logit_scale), "image_features": "encode_image output, not normalised",
            "torch_version": torch.__version__, "timm_version": timm.__version__, "open_clip_version": open_clip.__version__,
        }


def load_clip(name_or_cfg: str | BackboneCfg, weights: str | os.PathLike | None = None, *,
              weights_dir: str | os.PathLike | None = None, allow_download: bool = False,
              image_size: int | None = None, device: str | torch.device = "cpu") -> ClipModel:
    """Build ``clip/<arch>[@<tag>]`` with weights from :func:`resolve_clip_weights`."""
    import open_clip

    cfg = name_or_cfg if isinstance(name_or_cfg, BackboneCfg) else clip_backbone_cfg(name_or_cfg)
    source = resolve_clip_weights(cfg, weights, weights_dir=weights_dir, allow_download=allow_download)
    tag_cfg = _tag_cfg(cfg)
    kwargs: dict[str, Any] = {}
    if image_size is not None:
        kwargs["force_image_size"] = int(image_size)
    for key, arg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                     ("resize_mode", "image_resize_mode")):
        if key in tag_cfg:
            kwargs[arg] = tag_cfg[key]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            if source.kind == "download":
                model, _, transform = open_clip.create_model_and_transforms(cfg.timm_name, pretrained=cfg.pretrained_tag, **kwargs)
                try:
                    found = resolve_clip_weights(cfg, None, weights_dir=weights_dir)
                    source = WeightsSource("download", found.path, found.sha256)
                except WeightsNotFoundError:
                    pass
            else:
                pretrained = None if source.kind == "random" else source.path
                model, _, transform = open_clip.create_model_and_transforms(cfg.timm_name, pretrained=pretrained,
                                                                            pretrained_text=False, **kwargs)
        except (RuntimeError, KeyError, ValueError) as e:
            if source.kind in ("random", "download"):
                raise
            raise WeightsLoadError(f"weights file {source.path} does not fit CLIP {cfg.name!r}: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if source.kind == "random":
        message = (f"CLIP {cfg.name!r} has RANDOM weights (seed {RANDOM_INIT_SEED}): its image and text embeddings "
                   f"are meaningless; use it only for tests and demos")
        warnings.warn(message, RandomWeightsWarning, stacklevel=2)
        log.warning(message)
    model.eval().requires_grad_(False)
    model = model.to(device)
    pcfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pcfg.get("size", getattr(model.visual, "image_size", 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    preprocess = PreprocessCfg(input_size=(3, int(size[0]), int(size[1])), mean=tuple(pcfg.get("mean", ())),
                               std=tuple(pcfg.get("std", ())), interpolation=str(pcfg.get("interpolation", "bicubic")),
                               crop_pct=1.0, crop_mode=str(pcfg.get("resize_mode", "shortest")))
    embed_dim = int(open_clip.get_model_config(cfg.timm_name)["embed_dim"])
    return ClipModel(cfg=cfg, model=model, tokenizer=open_clip.get_tokenizer(cfg.timm_name), transform=transform,
                     preprocess=preprocess, weights=source, embed_dim=embed_dim,
                     logit_scale=float(model.logit_scale.exp().item()), device=str(device), image_size=image_size,
                     n_params=sum(p.numel() for p in model.parameters()))


class _ImageTower(torch.nn.Module):
    """``(B, 3, H, W)`` → ``(B, D)`` CLIP image embeddings (``encode_image``, not normalised)."""

    def __init__(self, clip_model: torch.nn.Module):
        super().__init__()
        self.clip = clip_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)


@dataclass
class ClipBackbone(LoadedBackbone):
    """A CLIP image tower as a :class:`LoadedBackbone` (what ``embed_store`` uses)."""

    clip: ClipModel | None = field(default=None, repr=False)

    def attrs(self) -> dict[str, Any]:
        return self.clip.attrs()


def load_clip_backbone(cfg: BackboneCfg, weights=None, *, weights_dir=None, allow_download: bool = False,
                       image_size: int | None = None, device="cpu") -> ClipBackbone:
    """The registry's loader for family ``clip`` (called by :func:`swsa_store.models.backbones.load_backbone`)."""
    clip = load_clip(cfg, weights, weights_dir=weights_dir, allow_download=allow_download, image_size=image_size, device=device)
    return ClipBackbone(cfg=clip.cfg, model=_ImageTower(clip.model), transform=clip.transform, preprocess=clip.preprocess,
                        weights=clip.weights, feature_dim=clip.embed_dim, n_params=clip.n_params, device=str(device),
                        image_size=image_size, clip=clip)


# --------------------------------------------------------------------------------------------
# Text embeddings
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def embed_texts(clip: ClipModel, strings: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
    """``(len(strings), D)`` float32 L2-normalised text embeddings (``encode_text``)."""
    out = np.empty((len(strings), clip.embed_dim), dtype=np.float32)
    device = torch.device(clip.device)
    for lo in range(0, len(strings), batch_size):
        tokens = clip.tokenizer(list(strings[lo: lo + batch_size])).to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            features = clip.model.encode_text(tokens)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        out[lo: lo + len(tokens)] = features.cpu().numpy()
    if not np.isfinite(out).all():
        raise ValueError(f"CLIP {clip.cfg.name} produced non-finite text embeddings")
    return out


def _text_attrs(clip: ClipModel, prompt_set: str, description: str, extra: dict | None = None) -> dict:
    attrs = {"model": clip.cfg.name, "embedding_name": clip.embedding_name, "prompt_set": prompt_set,
             "description": description, "logit_scale": float(clip.logit_scale),
             "normalisation": "L2 (unit norm) per string, after encode_text", "weights_kind": clip.weights.kind,
             "weights_sha256": attr_value(clip.weights.sha256), "embed_dim": int(clip.embed_dim),
             "config": json.dumps(clip.attrs(), default=str, sort_keys=True)}
    attrs.update(extra or {})
    return attrs


def _table_set(table: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    strings, rows = np.unique(table["text"].to_numpy(dtype=str), return_inverse=True)
    return strings.astype(object), table.drop(columns=["text"]).assign(row=rows.astype(np.int64))


def embed_text_store(store_path: str | os.PathLike, model: str = PAPER_CLIP, *, weights: str | None = None,
                     weights_dir: str | None = None, allow_download: bool = False, device: str = "cpu",
                     prompt_sets: Iterable[PromptSet] | None = None, prompt_files: Iterable[str | os.PathLike] = (),
                     dictionary: bool = True, batch_size: int = 256) -> dict:
    """Embed every prompt of every task (each prompt set: the paper's by default, plus
    ``prompt_files``), the BLISS class prompts (set ``bliss``) and the BLISS dictionary (set
    ``dictionary``) with CLIP ``model``; write them to ``/text/<embedding name>/<set>``.

    Returns ``{set name: number of strings}``.
    """
    from swsa_store.store import StoreError, edit_store, open_store

    with open_store(store_path) as store:
        tasks = store.tasks()
    if len(tasks) == 0:
        raise StoreError(f"store {store_path} has no tasks; run `swsa catalog` first")
    sets = list(prompt_sets) if prompt_sets is not None else [paper_prompt_set()]
    sets += [load_prompt_file(f) for f in prompt_files]
    reserved = {"bliss", "dictionary"}
    names = [s.name for s in sets]
    if len(set(names)) != len(names) or reserved & set(names):
        raise ValueError(f"prompt set names must be unique and not {sorted(reserved)}, got {names}")
    clip = load_clip(model, weights, weights_dir=weights_dir, allow_download=allow_download, device=device)
    tables = {s.name: (task_prompt_table(tasks, s), s) for s in sets}
    bliss = pd.DataFrame({"task_id": tasks["task_id"].to_numpy(np.int64), "template": 0, "side": 0,
                          "text": [_fill(BLISS_TEMPLATE, task_label(t)) for t in tasks.itertuples(index=False)]})
    bliss = bliss.astype({"template": np.int64, "side": np.int8})
    # every distinct string once
    all_strings = set(bliss["text"])
    for table, _ in tables.values():
        all_strings |= set(table["text"])
    dictionary_strings = bliss_dictionary() if dictionary else []
    unique = sorted(all_strings | set(dictionary_strings))
    embedded = embed_texts(clip, unique, batch_size=batch_size)
    position = {s: i for i, s in enumerate(unique)}
    counts = {}
    with edit_store(store_path) as store:
        for name, (table, prompt_set) in tables.items():
            strings, rows = _table_set(table)
            store.write_text_embeddings(clip.embedding_name, name, strings, embedded[[position[s] for s in strings]], rows,
                                        _text_attrs(clip, name, prompt_set.description or name,
                                                    {"templates": json.dumps(prompt_set.templates),
                                                     "n_templates": prompt_set.n_templates, "kind": "two-prompt"}))
            counts[name] = len(strings)
        strings, rows = _table_set(bliss)
        store.write_text_embeddings(clip.embedding_name, "bliss", strings, embedded[[position[s] for s in strings]], rows,
                                    _text_attrs(clip, "bliss", f"BLISS class prompts {BLISS_TEMPLATE!r}",
                                                {"template": BLISS_TEMPLATE, "kind": "class"}))
        counts["bliss"] = len(strings)
        if dictionary:
            store.write_text_embeddings(clip.embedding_name, "dictionary", np.array(dictionary_strings, dtype=object),
                                        embedded[[position[s] for s in dictionary_strings]], None,
                                        _text_attrs(clip, "dictionary", "BLISS dictionary: ImageNet-1k class names split "
                                                    "at commas (unique), in " + repr(BLISS_TEMPLATE),
                                                    {"template": BLISS_TEMPLATE, "kind": "dictionary"}))
            counts["dictionary"] = len(dictionary_strings)
    return {"model": clip.embedding_name, "weights": clip.weights.kind, "strings_embedded": len(unique), **counts}


# --------------------------------------------------------------------------------------------
# Reading text and image embeddings back for the engine
# --------------------------------------------------------------------------------------------


def text_model_name(store, model: str | None) -> str:
    """The embedding name (``clip-<arch>[@<tag>]``) of the text embeddings of CLIP ``model`` in
    the open ``store``; ``None`` picks the only model held (a one-line error if none or several)."""
    held = store.text_models()
    if model is None:
        if len(held) != 1:
            raise ValueError(f"store {store.path} holds text embeddings of {held or 'no model'}; pass --model "
                             f"(run `swsa embed-text` first if none)")
        return held[0]
    name = model.replace("/", "-")
    if name not in held:
        raise ValueError(f"store {store.path} has no text embeddings of {model!r} (held: {held or 'none'}); "
                         f"run `swsa embed-text --store {store.path} --model {model}`")
    return name


@dataclass(frozen=True, eq=False)
class TextPriorInputs:
    """What the residual detector's CLIP text prior is built from
    (:meth:`swsa_engine.run.detector_sweep.TextPrior.from_store`).

    ``model``: the CLIP embedding name; ``text``: its prompt set
    (:class:`~swsa_store.store.TextEmbeddings`: strings, (U, D) unit rows, row table, attrs);
    ``features``: (N, D) float32 image embeddings by the same model, indexed by image id (NaN
    where not written); ``usable``: (N,) bool, images whose CLIP embedding is written and finite.
    """

    model: str
    text: TextEmbeddings
    features: np.ndarray
    usable: np.ndarray


def read_text_prior_inputs(store_path: str | os.PathLike, model: str | None = None,
                           prompt_set: str = "paper") -> TextPriorInputs:
    """Read CLIP ``model``'s prompt set ``prompt_set`` and image embeddings from the store.

    ``model=None`` takes the only CLIP model with text embeddings. A store without text
    embeddings, without that model's image embeddings, or without the prompt set is a one-line
    :class:`~swsa_store.StoreError` saying which ``swsa embed`` / ``swsa embed-text`` to run.
    Images without a written CLIP embedding are not an error: ``usable`` is False for them.
    """
    from swsa_store.store import DONE_WRITTEN, StoreError, open_store

    fix = (f"run `swsa embed --store {store_path} --backbone clip/MODEL` and `swsa embed-text --store {store_path} "
           "--model clip/MODEL` first")
    with open_store(store_path) as store:
        if not store.text_models():
            raise StoreError(f"the residual detector's text prior needs CLIP text embeddings, and store {store_path} "
                             f"has none; {fix}")
        name = text_model_name(store, model)
        if name not in store.backbones():
            raise StoreError(f"the residual detector's text prior needs image embeddings {name!r}; {fix}")
        if prompt_set not in store.text_sets(name):
            raise StoreError(f"store {store_path} has no prompt set {prompt_set!r} for {name} "
                             f"(held: {store.text_sets(name)}); {fix}")
        text = store.text_embeddings(name, prompt_set)
        features = store.embeddings(name)
        usable = (store.done_mask(name) == DONE_WRITTEN) & np.isfinite(features).all(axis=1)
    return TextPriorInputs(name, text, features, usable)
