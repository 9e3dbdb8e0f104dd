"""The ADM UNet (OpenAI's guided-diffusion, Dhariwal & Nichol, 2021), split at the h-space.

:class:`ADMUNet` is our own implementation of guided-diffusion's ``UNetModel`` (2-D); its
parameter names equal the original's, so an original checkpoint's ``state_dict`` loads into it
unchanged (``tests/test_diffstyle.py`` checks the outputs against the ``guided-diffusion-sdk``
package on the same random weights). :meth:`ADMUNet.encode` runs the time embedding, the encoder
and the middle block (the h-space of Kwon et al. / Jeong et al.); :meth:`ADMUNet.decode` the
decoder and the output head. Loading, saving and the common wrapper are in :mod:`swsa_store.synth.adm`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ADM_256_UNCOND", "ADMConfig", "ADMUNet", "GroupNorm32", "linear_alphas_cumprod", "timestep_embedding"]


@dataclass(frozen=True)
class ADMConfig:
    """Hyper-parameters of an ADM UNet (names as guided-diffusion's ``UNetModel``).

    ``attention_ds`` are *downsampling rates* at which attention is used (guided-diffusion's
    ``attention_resolutions`` argument of ``UNetModel``): at 256 px, feature resolutions
    32/16/8 are rates 8/16/32. ``num_head_channels`` > 0 fixes the channels per head and
    overrides ``num_heads``.
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (8, 16, 32)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    # the noise schedule the network was trained with (guided-diffusion "linear")
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("attention_ds", tuple(int(a) for a in self.attention_ds))
        set_("channel_mult", tuple(self.channel_mult))
        if self.num_classes is not None:
            set_("num_classes", int(self.num_classes))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "ADMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown ADM config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**values)


#: The SWSA paper's model: guided-diffusion ``256x256_diffusion_uncond.pt`` (flags
#: ``--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256
#: --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64
#: --num_res_blocks 2 --resblock_updown True --use_scale_shift_norm True``).
ADM_256_UNCOND = ADMConfig()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in at least float32 (as ADM does under fp16)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)
        return super().forward(x)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's sinusoidal embedding: ``[cos(t·f_i), sin(t·f_i)]`` with ``f_i = max_period^(-i/half)``."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period) / half)
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None]
    out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        out = F.pad(out, (0, 1))
    return out


class _Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class _Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _ResBlock(nn.Module):
    """ADM residual block (optionally scale-shift norm, optionally up/down-sampling)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = _Upsample(channels, False), _Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = _Downsample(channels, False), _Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        scale_shift = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = scale_shift.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + scale_shift)
        return self.skip_connection(x) + h


class _AttentionBlock(nn.Module):
    """ADM self-attention over spatial positions (legacy or new head order)."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool):
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} not divisible by num_head_channels {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        length, heads = flat.shape[-1], self.num_heads
        ch = c // heads
        if self.new_order:  # split q/k/v first, then heads
            q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:  # split heads first, then q/k/v
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        # softmax(q·k / sqrt(ch)) v over positions; batched heads as (B·H, T, ch)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(a.transpose(1, 2).reshape(b, c, length))
        return (flat + h).reshape(b, c, height, width)


class _EmbedSequential(nn.Sequential):
    """Sequential whose residual blocks also take the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """The ADM UNet (guided-diffusion's ``UNetModel``, 2-D), with an h-space split.

    ``forward(x, t, y=None)`` returns the raw network output (``out_channels`` channels);
    :meth:`encode` / :meth:`decode` split it at the output of the middle block.
    """

    def __init__(self, config: ADMConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = config if config is not None else ADMConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        self.config = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

        def attention(ch: int, heads: int) -> _AttentionBlock:
            return _AttentionBlock(ch, heads, cfg.num_head_channels, cfg.use_new_attention_order)

        def res(ch_in: int, ch_out: int | None = None, **kw: bool) -> _ResBlock:
            return _ResBlock(ch_in, emb_dim, cfg.dropout, ch_out, cfg.use_scale_shift_norm, **kw)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        ch = input_ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attention(ch, cfg.num_heads))
                self.input_blocks.append(_EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else _Downsample(ch, cfg.conv_resample)
                self.input_blocks.append(_EmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = _EmbedSequential(res(ch), attention(ch, cfg.num_heads), res(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in cfg.attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else _Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(_EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1))

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None):
        """Encoder and middle block: returns ``(h, (emb, skips))``."""
        if (y is None) != (self.config.num_classes is None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), (emb, skips)

    def decode(self, h: torch.Tensor, ctx) -> torch.Tensor:
        """Decoder and output head from the middle block's output ``h``."""
        emb, skips = ctx
        for block, skip in zip(self.output_blocks, reversed(skips)):
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.out(h)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(*self.encode(x, timesteps, y))


def linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """ᾱ_t of guided-diffusion's ``linear`` schedule (betas scaled by 1000/num_steps), float64."""
    scale = 1000.0 / num_steps
    betas = np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)
