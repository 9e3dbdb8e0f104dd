"""Diffusion UNets for the ``diffusion`` (DiffStyle) generator, split at the h-space.

Two model families are supported, both loaded offline:

* **ADM** — the UNet of OpenAI's guided-diffusion (Dhariwal & Nichol, 2021), which the SWSA
  paper uses as ``256x256_diffusion_uncond.pt``. :class:`~swsa_store.synth.adm_unet.ADMUNet`
  (:mod:`swsa_store.synth.adm_unet`) is our own implementation of
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

import hashlib
import json
import os
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from swsa_store.models.weights import file_sha256
from swsa_store.synth.adm_unet import ADM_256_UNCOND, ADMConfig, ADMUNet, linear_alphas_cumprod, timestep_embedding

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
    "num_train_timesteps_hint",
    "save_adm",
    "state_dict_sha256",
    "timestep_embedding",
    "wrap_adm",
    "wrap_diffusers",
]

#: Where OpenAI publishes the SWSA paper's model (download it yourself; nothing is fetched here).
ADM_256_UNCOND_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------


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
    return wrap_adm(module, name=path.name, sha256=file_sha256(path), info={"path": str(path)})


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
                digest.update(p.name.encode() + b"|" + file_sha256(p).encode())
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


def num_train_timesteps_hint(model: Any) -> int | None:
    """The number of training timesteps T of ``model`` when it is known without loading weights:
    a loaded :class:`DiffusionModel`, an :class:`ADMUNet` (its config), a diffusers module (its
    default schedule, 1000) or a diffusers directory (its ``scheduler_config.json``, else 1000);
    ``None`` for a ``.pt`` file or a repo id (known only once loaded)."""
    if isinstance(model, DiffusionModel):
        return model.num_train_timesteps
    if isinstance(model, ADMUNet):
        return int(model.config.num_train_timesteps)
    if isinstance(model, nn.Module):
        return 1000  # wrap_diffusers' default schedule
    if isinstance(model, (str, os.PathLike)) and Path(model).expanduser().is_dir():
        local = Path(model).expanduser()
        unet_dir = local / "unet" if (local / "unet" / "config.json").is_file() else local
        for path in (local / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json"):
            if path.is_file():
                try:
                    return int(json.loads(path.read_text()).get("num_train_timesteps", 1000))
                except (OSError, ValueError, TypeError, AttributeError):
                    return None  # unreadable here: the loader reports it
        return 1000
    return None


def parse_adm_config(value: Any) -> ADMConfig | None:
    """The ADM configuration a user chose: ``None`` (the paper's :data:`ADM_256_UNCOND`), an
    :class:`ADMConfig`, a dict, a JSON object (``'{"model_channels": 128, "channel_mult": [1, 1, 2, 3, 4]}'``)
    or the path of a ``.json`` / ``.toml`` file holding one (keys: :class:`ADMConfig`'s fields,
    guided-diffusion's names). Anything else is a one-line :class:`ValueError`."""
    if value is None or isinstance(value, ADMConfig):
        return value
    if isinstance(value, (str, os.PathLike)):
        text, where = str(value), "--adm-config"
        path = Path(text).expanduser()
        if path.suffix.lower() in (".json", ".toml") or path.is_file():
            try:
                text, where = path.read_text(encoding="utf-8"), str(path)
            except OSError as exc:
                raise ValueError(f"cannot read ADM config {path}: {exc.strerror or exc}") from None
        try:
            value = tomllib.loads(text) if where.lower().endswith(".toml") else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"ADM config {where} is not a JSON object (or a .json/.toml file): "
                             f"{str(exc).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise ValueError(f"an ADM config must be a mapping of ADMConfig fields, got {type(value).__name__}")
    try:
        return ADMConfig.from_dict(value)
    except TypeError as exc:  # a value of the wrong type inside the dataclass
        raise ValueError(f"bad ADM config value: {exc}") from None


def load_diffusion_model(model: Any, *, local_files_only: bool = True, adm_config: Any = None) -> DiffusionModel:
    """A :class:`DiffusionModel` from a ``.pt`` file (ADM), a diffusers directory or repo id,
    an :class:`ADMUNet`, a ``UNet2DModel`` or a :class:`DiffusionModel`. ``adm_config``
    (:func:`parse_adm_config`) builds a plain ADM state dict; a diffusers model ignores it."""
    config = parse_adm_config(adm_config)
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
            return load_adm(path, config=config)
        if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
            return load_diffusers_unet(str(model), local_files_only=local_files_only)
        return load_adm(path, config=config)
    raise TypeError(f"expected a model path, a repo id or a UNet module, got {type(model).__name__}")
