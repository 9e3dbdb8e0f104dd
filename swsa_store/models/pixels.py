"""``pixels`` / ``pixels@N``: the image itself, resized, as a feature source that needs no weights."""

from __future__ import annotations

import torch
from torchvision import transforms

from swsa_store.models.backbone_cfg import BackboneCfg, LoadedBackbone
from swsa_store.models.preprocessing import PreprocessCfg
from swsa_store.models.weights import WeightsSource

__all__ = ["PIXELS_DEFAULT_SIZE", "load_pixels_backbone", "pixels_backbone_cfg"]

#: Side of ``pixels`` without ``@N``: 16 x 16 RGB, 768 values.
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
