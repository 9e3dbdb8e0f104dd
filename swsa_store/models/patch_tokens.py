"""Patch tokens (``swsa embed --patch-tokens``): the local features of the patch-level detector.

Moved here from :mod:`swsa_store.models.backbones` (which re-exports these names).
"""

from __future__ import annotations

from typing import Any

import torch

from swsa_store.models.backbone_cfg import LoadedBackbone
from swsa_store.models.weights import attr_value

__all__ = ["PATCH_CNN_MAX_REDUCTION", "PatchTokenModel", "patch_token_model"]


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
        "reduction": attr_value(reduction),
        "dtype": "float16",
        "bytes_per_image": n_patches * patch_dim * 2,
    }
    return wrapper, attrs
