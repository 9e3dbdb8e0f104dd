"""What a backbone is and what a loaded one holds: :class:`BackboneCfg` (a name, its timm
architecture and pretrained tag) and :class:`LoadedBackbone` (model, transform, preprocessing,
weights provenance). Shared by the registry (:mod:`swsa_store.models.backbones`), the timm
loader (:mod:`swsa_store.models.timm_backbones`), raw pixels (:mod:`swsa_store.models.pixels`)
and CLIP (:mod:`swsa_store.models.clip`); it imports none of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from swsa_store.models.packaged_weights import PackagedWeights
from swsa_store.models.preprocessing import PreprocessCfg
from swsa_store.models.weights import WeightsSource, attr_value

__all__ = ["RANDOM_INIT_SEED", "TIMM_PREFIX", "BackboneCfg", "Family", "LoadedBackbone"]

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
