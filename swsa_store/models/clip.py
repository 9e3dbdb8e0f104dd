"""CLIP through open_clip: image embeddings as a backbone, text embeddings of prompts, prompt
sets (SWSA paper, Appendix A) and the BLISS dictionary (Goodge et al.).

Names. A CLIP backbone is ``clip/<open_clip architecture>[@<pretrained tag>]``, e.g. the
paper's ``clip/ViT-B-16-plus-240@laion400m_e32``. Its image embeddings go through the ordinary
:func:`swsa_store.ingest.embed_store` (the model's own preprocessing, ``encode_image`` output,
*not* normalised — the scores normalise) and are stored as ``/embeddings/clip-<arch>@<tag>``.
Architectures that open_clip does not ship can be added with :func:`register_clip_architecture`
(a model config dict, as in open_clip's ``model_configs/*.json``) — the tests use a tiny one.

Names and weights (the offline search order): :mod:`swsa_store.models.clip_weights`; prompt sets
and the BLISS dictionary: :mod:`swsa_store.models.prompts` (both re-exported here). ``weights="random"``
builds the architecture with a fixed seed and warns loudly
(:class:`~swsa_store.models.weights.RandomWeightsWarning`).

Text. :func:`embed_text_store` embeds, once, every prompt of every task for each prompt set,
the BLISS class prompts ("This is a photo of a {class label}") and the BLISS dictionary, and
writes them under ``/text/<embedding name>/<set>`` (strings, L2-normalised embeddings, a row
table ``task_id, template, side, row`` and attrs with the model, its logit scale and the
normalisation). Identical strings are embedded once.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from swsa_store.models.backbone_cfg import RANDOM_INIT_SEED, BackboneCfg, LoadedBackbone
from swsa_store.models.checkpoints import WeightsLoadError
from swsa_store.models.clip_weights import (
    CLIP_DIR_FILES, CLIP_PREFIX, clip_backbone_cfg, clip_tag_cfg, parse_clip_name, register_clip_architecture,
    resolve_clip_weights,
)
from swsa_store.models.preprocessing import PreprocessCfg
from swsa_store.models.prompts import (
    BLISS_TEMPLATE, GENERIC_TEMPLATES, PAPER_TEMPLATES, PromptSet, bliss_dictionary, fill_template,
    load_prompt_file, paper_prompt_set, task_label, task_prompt_table,
)
from swsa_store.models.weights import RandomWeightsWarning, WeightsNotFoundError, WeightsSource, attr_value
from swsa_store.schema import DONE_WRITTEN, StoreError, TextEmbeddings
from swsa_store.store import edit_store, open_store

log = logging.getLogger(__name__)

__all__ = [
    "BLISS_TEMPLATE", "CLIP_DIR_FILES", "CLIP_PREFIX", "PAPER_CLIP", "PAPER_TEMPLATES", "GENERIC_TEMPLATES",
    "ClipBackbone", "ClipModel", "PromptSet", "bliss_dictionary", "clip_backbone_cfg", "embed_text_store",
    "embed_texts", "load_clip", "load_clip_backbone", "load_prompt_file", "paper_prompt_set", "parse_clip_name",
    "read_text_prior_inputs", "register_clip_architecture", "resolve_clip_weights", "task_label",
    "task_prompt_table", "text_model_name", "TextPriorInputs",
]

#: The SWSA paper's CLIP (Section 4.3): ViT-B-16-plus-240 with LAION-400M weights.
PAPER_CLIP = "clip/ViT-B-16-plus-240@laion400m_e32"


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
    tag_cfg = clip_tag_cfg(cfg)
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
                          "text": [fill_template(BLISS_TEMPLATE, task_label(t)) for t in tasks.itertuples(index=False)]})
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
    (:meth:`swsa_engine.run.text_prior.TextPrior.from_store`).

    ``model``: the CLIP embedding name; ``text``: its prompt set
    (:class:`~swsa_store.schema.TextEmbeddings`: strings, (U, D) unit rows, row table, attrs);
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
