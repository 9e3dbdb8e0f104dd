"""Diffusion UNets for the ``diffusion`` (DiffStyle) generator, split at the h-space.

Two model families are supported, both loaded offline:

* **ADM** — the UNet of OpenAI's guided-diffusion (Dhariwal & Nichol, 2021), which the SWSA
  paper uses as ``256x256_diffusion_uncond.pt``. :class:`ADMUNet` is our own implementation of
  that architecture; its parameter names equal the original's, so an original checkpoint's
  ``state_dict`` loads into it unchanged (``tests/test_diffstyle.py`` checks the outputs against
  the ``guided-diffusion-sdk`` package on the same random weights). :func:`load_adm` reads a
  local ``.pt`` file: either an original state dict (the 256×256 unconditional configuration,
  :data:`ADM_256_UNCOND`, is assumed unless ``config`` says otherwise) or our own
  ``{"config": {...}, "state_dict": {...}}`` form written by :func:`save_adm`.
* **diffusers** ``UNet2DModel`` with its scheduler config, from a local directory (a pipeline
  folder with ``unet/`` and ``scheduler/``, or a bare UNet folder) or the Hugging Face cache
  (:func:`load_diffusers_unet`; ``local_files_only=True`` unless downloads are allowed).

Both are wrapped as a :class:`DiffusionModel`: ``encode(x, t) -> (h, ctx)`` runs the time
embedding, the encoder and the whole middle block (``h`` is the middle block's output — the
h-space of Kwon et al. / Jeong et al.); ``decode(h, ctx) -> eps`` runs the decoder and the
output head and returns the predicted noise ε (the first ``in_channels`` output channels when
the model also learns Σ). ``decode(*encode(x, t))`` is exactly one ordinary forward pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ADM_256_UNCOND",
    "ADM_256_UNCOND_URL",
    "ADMConfig",
    "ADMUNet",
    "DiffusionModel",
    "linear_alphas_cumprod",
    "load_adm",
    "load_diffusers_unet",
    "load_diffusion_model",
    "save_adm",
    "sha256_file",
    "state_dict_sha256",
    "timestep_embedding",
]

#: Where OpenAI publishes the SWSA paper's model (download it yourself; nothing is fetched here).
ADM_256_UNCOND_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"


# --------------------------------------------------------------------------------------------
# the ADM architecture
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and float32 values, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# the common wrapper
# --------------------------------------------------------------------------------------------


@dataclass
class DiffusionModel:
    """An ε-predicting UNet split at its h-space, with its training noise schedule.

    ``encode(x, t) -> (h, ctx)``, ``decode(h, ctx) -> eps``; ``alphas_cumprod`` (float64,
    length ``num_train_timesteps``); ``name`` and ``sha256`` go into provenance records.
    """

    module: nn.Module
    alphas_cumprod: np.ndarray
    image_size: int
    in_channels: int
    name: str
    sha256: str
    kind: str  # "adm" | "diffusers"
    info: dict = field(default_factory=dict)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def encoder_modules(self) -> list[nn.Module]:
        """The first module every encoder pass runs (for counting passes with hooks)."""
        return [self.module.input_blocks[0]] if self.kind == "adm" else [self.module.conv_in]

    @property
    def decoder_modules(self) -> list[nn.Module]:
        """The last module every decoder pass runs."""
        return [self.module.out] if self.kind == "adm" else [self.module.conv_out]

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor):
        if self.kind == "adm":
            return self.module.encode(x, timesteps)
        return _diffusers_encode(self.module, x, timesteps)

    def decode(self, h: torch.Tensor, ctx) -> torch.Tensor:
        out = self.module.decode(h, ctx) if self.kind == "adm" else _diffusers_decode(self.module, h, ctx)
        return out[:, : self.in_channels]

    def eps(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """One ordinary forward pass: ε(x_t, t)."""
        return self.decode(*self.encode(x, timesteps))

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "DiffusionModel":
        self.module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


def wrap_adm(module: ADMUNet, *, name: str = "adm", sha256: str | None = None, info: dict | None = None) -> DiffusionModel:
    cfg = module.config
    if cfg.num_classes is not None:
        raise ValueError("class-conditional ADM models are not supported; use the unconditional model")
    if cfg.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"expected an ε model with {cfg.in_channels} or {2 * cfg.in_channels} output channels, got {cfg.out_channels}")
    return DiffusionModel(
        module=module.eval().requires_grad_(False),
        alphas_cumprod=linear_alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end),
        image_size=cfg.image_size, in_channels=cfg.in_channels, name=name,
        sha256=sha256 or state_dict_sha256(module), kind="adm", info=dict(info or {}, config=cfg.to_dict()),
    )


def save_adm(module: ADMUNet, path: str | os.PathLike) -> Path:
    """Save ``{"config": ..., "state_dict": ...}`` (loadable with :func:`load_adm`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": module.config.to_dict(), "state_dict": module.state_dict()}, path)
    return path


def load_adm(path: str | os.PathLike, *, config: ADMConfig | dict | None = None, map_location: str = "cpu") -> DiffusionModel:
    """Load an ADM checkpoint from a local ``.pt`` file (never downloads).

    A plain state dict (the published checkpoints) is built with ``config`` (default
    :data:`ADM_256_UNCOND`, the SWSA paper's model); a ``{"config", "state_dict"}`` file uses
    its own config. The model's name is the file name and its hash the file's sha256.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"diffusion model file not found: {path}; download {ADM_256_UNCOND_URL.rsplit('/', 1)[-1]} "
            f"(from {ADM_256_UNCOND_URL}) and pass --model PATH"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 — a clear one-line reason for any unreadable file
        raise ValueError(f"cannot read diffusion model file {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if isinstance(payload, dict) and "state_dict" in payload and "config" in payload:
        cfg = ADMConfig.from_dict(dict(payload["config"]))
        state = payload["state_dict"]
    else:
        cfg = config if isinstance(config, ADMConfig) else ADMConfig.from_dict(config) if config else ADM_256_UNCOND
        state = payload
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict in {path}, got {type(state).__name__}")
    with torch.device("meta"):  # check names and shapes without allocating or initialising
        module = ADMUNet(cfg)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not match the ADM config (model_channels={cfg.model_channels}, "
            f"channel_mult={cfg.channel_mult}, image_size={cfg.image_size}): missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}; pass the model's config"
        )
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                           strict=True, assign=True)
    return wrap_adm(module, name=path.name, sha256=sha256_file(path), info={"path": str(path)})


# --------------------------------------------------------------------------------------------
# diffusers UNet2DModel
# --------------------------------------------------------------------------------------------


def _diffusers_encode(unet, sample: torch.Tensor, timesteps: torch.Tensor):
    """UNet2DModel.forward up to and including the mid block (same operations, same order)."""
    if unet.mid_block is None:
        raise ValueError("this UNet2DModel has no mid block, so it has no h-space; use one with a mid block")
    if unet.class_embedding is not None:
        raise ValueError("class-conditional UNet2DModels are not supported")
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1)
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    skip_sample = sample
    sample = unet.conv_in(sample)
    res_samples = (sample,)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            sample, res, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        res_samples += res
    h = unet.mid_block(sample, emb)
    return h, (emb, res_samples, timesteps)


def _diffusers_decode(unet, sample: torch.Tensor, ctx) -> torch.Tensor:
    emb, res_samples, timesteps = ctx
    skip_sample = None
    for block in unet.up_blocks:
        res, res_samples = res_samples[-len(block.resnets):], res_samples[: -len(block.resnets)]
        if hasattr(block, "skip_conv"):
            sample, skip_sample = block(sample, res, emb, skip_sample)
        else:
            sample = block(sample, res, emb)
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    if skip_sample is not None:
        sample = sample + skip_sample
    if unet.config.time_embedding_type == "fourier":
        sample = sample / timesteps.reshape((sample.shape[0],) + (1,) * (sample.ndim - 1))
    return sample


def _scheduler_alphas(config: dict) -> np.ndarray:
    from diffusers import DDIMScheduler

    known = {k: v for k, v in config.items() if not k.startswith("_")}
    prediction = known.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"expected an ε-prediction model, got prediction_type={prediction!r}; DiffStyle needs ε")
    scheduler = DDIMScheduler.from_config(known)
    return scheduler.alphas_cumprod.double().numpy()


def wrap_diffusers(unet, scheduler_config: dict | None = None, *, name: str = "diffusers-unet",
                   sha256: str | None = None, info: dict | None = None) -> DiffusionModel:
    """Wrap a diffusers ``UNet2DModel`` (scheduler config default: DDPM linear 1e-4..0.02, 1000 steps)."""
    from diffusers import UNet2DModel

    if not isinstance(unet, UNet2DModel):
        raise TypeError(f"expected a diffusers UNet2DModel, got {type(unet).__name__}")
    sched = dict(scheduler_config or {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                      "beta_schedule": "linear"})
    in_ch = int(unet.config.in_channels)
    if int(unet.config.out_channels) not in (in_ch, 2 * in_ch):
        raise ValueError(f"expected {in_ch} or {2 * in_ch} output channels (ε, optionally Σ), got {unet.config.out_channels}")
    size = unet.config.sample_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return DiffusionModel(
        module=unet.eval().requires_grad_(False), alphas_cumprod=_scheduler_alphas(sched), image_size=size,
        in_channels=in_ch, name=name, sha256=sha256 or state_dict_sha256(unet), kind="diffusers",
        info=dict(info or {}, scheduler={k: v for k, v in sched.items() if not k.startswith("_")}),
    )


def load_diffusers_unet(path_or_id: str | os.PathLike, *, local_files_only: bool = True) -> DiffusionModel:
    """A diffusers ``UNet2DModel`` and its scheduler config from a directory or the HF cache.

    ``path_or_id``: a pipeline folder (``unet/`` + ``scheduler/``), a bare UNet folder
    (``config.json`` + weights; a ``scheduler_config.json`` beside it is used if present,
    else the default linear schedule, with a warning), or a Hugging Face repo id looked up in
    the local cache (downloads only with ``local_files_only=False``).
    """
    import warnings

    from diffusers import UNet2DModel

    source = str(path_or_id)
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            unet_dir = local / "unet" if (local / "unet" / "config.json").is_file() else local
            unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
            sched_file = next((p for p in (local / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json")
                               if p.is_file()), None)
            sched = json.loads(sched_file.read_text()) if sched_file else None
            weights = sorted(p for p in unet_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
            digest = hashlib.sha256()
            for p in weights:
                digest.update(p.name.encode() + b"|" + sha256_file(p).encode())
            sha = digest.hexdigest() if weights else None
        else:
            from diffusers import DDIMScheduler

            try:
                unet = UNet2DModel.from_pretrained(source, subfolder="unet", local_files_only=local_files_only)
            except (OSError, EnvironmentError):
                unet = UNet2DModel.from_pretrained(source, local_files_only=local_files_only)
            try:
                sched = dict(DDIMScheduler.load_config(source, subfolder="scheduler", local_files_only=local_files_only))
            except (OSError, EnvironmentError):
                sched = None
            sha = None
    except (OSError, EnvironmentError) as exc:
        hint = "" if not local_files_only else " (offline: pass a local directory or allow downloads)"
        raise FileNotFoundError(f"cannot load a diffusers UNet2DModel from {source}{hint}: {str(exc).splitlines()[0]}") from None
    if sched is None:
        warnings.warn(f"no scheduler config found for {source}; assuming the linear β schedule 1e-4..0.02 over 1000 steps",
                      stacklevel=2)
    return wrap_diffusers(unet, sched, name=Path(source).name or source, sha256=sha, info={"path": source})


def load_diffusion_model(model: Any, *, local_files_only: bool = True) -> DiffusionModel:
    """A :class:`DiffusionModel` from a ``.pt`` file (ADM), a diffusers directory or repo id,
    an :class:`ADMUNet`, a ``UNet2DModel`` or a :class:`DiffusionModel`."""
    if isinstance(model, DiffusionModel):
        return model
    if isinstance(model, ADMUNet):
        return wrap_adm(model)
    if isinstance(model, nn.Module):
        return wrap_diffusers(model)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        if path.is_dir():
            return load_diffusers_unet(path, local_files_only=True)
        if path.is_file() or path.suffix in (".pt", ".pth", ".ckpt"):
            return load_adm(path)
        if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
            return load_diffusers_unet(str(model), local_files_only=local_files_only)
        return load_adm(path)
    raise TypeError(f"expected a model path, a repo id or a UNet module, got {type(model).__name__}")
