"""Diffusion-based synthetic anomalies: DiffStyle h-space content injection (SWSA §3.2).

A task's seed images are split into a *style* half (the first ``n // 2`` seeds, in the order
given — ``synthesize`` passes them sorted by image id, and the seed set itself is a random
draw) and a *content* half (the rest); every (style, content) pair of the cross product makes
one anomaly (20 seeds → 10 × 10 = 100).

For each image: center-crop to a square, resize to the model's resolution (256 for the
paper's model, bicubic) and scale to [−1, 1]. Deterministic DDIM inversion (η = 0) maps it to
x_T along the grid ``τ = round(linspace(0, T−1, steps))`` (T = 1000 training steps, so
τ_S = 999), the clean image standing at τ_0 = 0 as in Asyrp/DiffStyle. On the content
image's inversion path the h-space feature — the output of the UNet's whole middle block —
is recorded at every τ_k (at τ_S = 999 by one extra encoder pass).

Generation starts from the style image's x_T and runs the asymmetric reverse process
(Asyrp, Kwon et al. 2023) from τ_S down to a clean image (ᾱ = 1)::

    x_{τ_{k-1}} = √ᾱ_{τ_{k-1}} · P_t(ε(x_t | h_gen)) + √(1 − ᾱ_{τ_{k-1}}) · ε(x_t)
    P_t(ε) = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t

with ``h_gen = (1 − γ)·h + γ·h_content(t)`` (``interpolation="linear"``, the SWSA paper's,
γ = 0.7) or, as in the original DiffStyle, the spherical interpolation of h and h_content
rescaled to the norm of h (``"slerp"``). Injection applies at steps with t ≥ ``t_edit``
(default 400); below it the step is plain DDIM. Per step the encoder (and middle block) runs
once and the decoder twice (with h and with h_gen), never two full UNet passes; pairs are
processed in batches of ``batch_size``. The optional stochastic "quality boosting" (η = 1 at
steps with t < ``t_boost``, noise from a per-pair seed drawn from the task's rng) is off by
default (``t_boost=0``).

The model is the paper's OpenAI guided-diffusion ``256x256_diffusion_uncond.pt`` (a local
file) or any diffusers ``UNet2DModel`` with its scheduler config (see :mod:`.adm`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from swsa_store.synth.adm import DiffusionModel, load_diffusion_model, num_train_timesteps_hint
from swsa_store.synth.base import (
    AnomalyGenerator, SyntheticImage, check_generate_args, register_generator, unchanged_reason,
)

__all__ = [
    "DEFAULT_GAMMA",
    "DEFAULT_STEPS",
    "DEFAULT_T_EDIT",
    "DiffStyleGenerator",
    "asyrp_generate",
    "check_diffstyle_settings",
    "ddim_invert",
    "ddim_timesteps",
    "interpolate_h",
    "postprocess",
    "preprocess",
    "split_style_content",
]

DEFAULT_STEPS = 50
DEFAULT_GAMMA = 0.7
DEFAULT_T_EDIT = 400
INTERPOLATIONS = ("linear", "slerp")
#: Environment variable naming the default model (file or directory) when none is passed.
MODEL_ENV = "SWSA_DIFFUSION_MODEL"


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The DDIM grid ``round(linspace(0, T-1, steps))`` (increasing ints, 0 ... T-1)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= num_train_timesteps:
        raise ValueError(f"expected steps to be an integer in [2, {num_train_timesteps}], got {steps!r}; fix --steps")
    return np.round(np.linspace(0, num_train_timesteps - 1, int(steps))).astype(np.int64)


def split_style_content(n: int) -> tuple[list[int], list[int]]:
    """Indices of the style half (first ``n // 2``) and the content half (the rest)."""
    if n < 2:
        raise ValueError(f"DiffStyle needs at least 2 seed images (one style, one content), got {n}")
    return list(range(n // 2)), list(range(n // 2, n))


def preprocess(image: Image.Image, size: int) -> "torch.Tensor":
    """Center-crop to a square, resize to ``size`` (bicubic), scale to [-1, 1]: (3, size, size) float32."""
    img = image.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _to_images(x: "torch.Tensor") -> list[Image.Image]:
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu").numpy().astype(np.uint8)
    return [Image.fromarray(a.transpose(1, 2, 0), "RGB") for a in arr]


def postprocess(x: "torch.Tensor") -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → RGB PIL images (clamped, rounded)."""
    return _to_images(x)


def interpolate_h(h: "torch.Tensor", h_content: "torch.Tensor", gamma: float, mode: str = "linear") -> "torch.Tensor":
    """h_gen from the current h and the content's h.

    ``linear``: ``(1 − γ)·h + γ·h_content``. ``slerp``: rescale ``h_content`` to the norm of
    ``h`` (per sample, over all its elements) and interpolate spherically (the original
    DiffStyle); nearly parallel vectors fall back to linear.
    """
    if mode == "linear":
        return (1.0 - gamma) * h + gamma * h_content
    if mode != "slerp":
        raise ValueError(f"expected interpolation in {list(INTERPOLATIONS)}, got {mode!r}")
    flat_h = h.reshape(h.shape[0], -1).double()
    flat_c = h_content.reshape(h.shape[0], -1).double()
    norm_h = flat_h.norm(dim=1, keepdim=True)
    flat_c = flat_c * (norm_h / flat_c.norm(dim=1, keepdim=True).clamp_min(1e-12))
    cos = ((flat_h * flat_c).sum(dim=1, keepdim=True) / (norm_h * norm_h).clamp_min(1e-24)).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    near = sin.abs() < 1e-6
    safe = torch.where(near, torch.ones_like(sin), sin)
    w_h = torch.where(near, torch.full_like(sin, 1.0 - gamma), torch.sin((1.0 - gamma) * theta) / safe)
    w_c = torch.where(near, torch.full_like(sin, gamma), torch.sin(gamma * theta) / safe)
    out = torch.empty_like(h)  # keep h's memory layout (the decoder then runs the same kernels)
    return out.copy_((w_h * flat_h + w_c * flat_c).reshape(h.shape))


def _alpha(model: "DiffusionModel", t: int) -> float:
    return 1.0 if t < 0 else float(model.alphas_cumprod[t])


def _tvec(t: int, x: "torch.Tensor") -> "torch.Tensor":
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def ddim_invert(model: "DiffusionModel", x0: "torch.Tensor", timesteps: Sequence[int], *,
                record_h: bool = True) -> tuple["torch.Tensor", list["torch.Tensor"]]:
    """Deterministic DDIM inversion of ``x0`` (standing at ``timesteps[0]``) to ``timesteps[-1]``.

    Returns ``(x_T, hs)``; ``hs[k]`` is the middle block's output at (x_{τ_k}, τ_k) for every
    k (the last one by an encoder-only pass), or ``[]`` when ``record_h`` is False.
    """
    ts = [int(t) for t in timesteps]
    hs: list[torch.Tensor] = []
    x = x0
    with torch.inference_mode():
        for k, t in enumerate(ts):
            if k == len(ts) - 1:
                if record_h:
                    hs.append(model.encode(x, _tvec(t, x))[0])
                break
            h, ctx = model.encode(x, _tvec(t, x))
            if record_h:
                hs.append(h)
            eps = model.decode(h, ctx)
            a_t, a_next = _alpha(model, t), _alpha(model, ts[k + 1])
            x0_pred = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
            x = math.sqrt(a_next) * x0_pred + math.sqrt(1.0 - a_next) * eps
    return x, hs


def asyrp_generate(model: "DiffusionModel", x_T: "torch.Tensor", timesteps: Sequence[int], *,
                   h_content: Sequence["torch.Tensor"] | None = None, gamma: float = DEFAULT_GAMMA,
                   t_edit: int = DEFAULT_T_EDIT, interpolation: str = "linear", t_boost: int = 0,
                   generators: Sequence["torch.Generator"] | None = None, callback=None) -> "torch.Tensor":
    """The asymmetric reverse process from ``x_T`` (at ``timesteps[-1]``) to a clean image.

    ``h_content[k]`` is the content's h at ``timesteps[k]`` (same batch as ``x_T``); with
    ``h_content=None`` this is plain DDIM. Injection at steps with t ≥ ``t_edit``: the
    encoder runs once, the decoder twice (ε with h for the direction D_t, ε̃ with h_gen for
    P_t). Steps with t < ``t_boost`` are stochastic (η = 1) with noise from ``generators``
    (one ``torch.Generator`` per batch row). ``callback(k, t, x)`` sees x after each step.
    """
    ts = [int(t) for t in timesteps]
    if h_content is not None and len(h_content) != len(ts):
        raise ValueError(f"expected h_content at each of the {len(ts)} timesteps, got {len(h_content)}")
    if t_boost > 0 and (generators is None or len(generators) != x_T.shape[0]):
        raise ValueError("quality boosting (t_boost > 0) needs one torch.Generator per batch row")
    x = x_T
    with torch.inference_mode():
        for k in reversed(range(len(ts))):
            t = ts[k]
            a_t, a_prev = _alpha(model, t), _alpha(model, ts[k - 1] if k > 0 else -1)
            h, ctx = model.encode(x, _tvec(t, x))
            eps = model.decode(h, ctx)
            if h_content is not None and t >= t_edit:
                eps_gen = model.decode(interpolate_h(h, h_content[k], gamma, interpolation), ctx)
            else:
                eps_gen = eps
            x0_pred = (x - math.sqrt(1.0 - a_t) * eps_gen) / math.sqrt(a_t)
            sigma = 0.0
            if t < t_boost and k > 0:
                sigma = math.sqrt((1.0 - a_prev) / (1.0 - a_t)) * math.sqrt(1.0 - a_t / a_prev)
            x = math.sqrt(a_prev) * x0_pred + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                z = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators])
                x = x + sigma * z.to(device=x.device, dtype=x.dtype)
            if callback is not None:
                callback(k, t, x)
    return x


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def check_diffstyle_settings(*, gamma: Any, t_edit: Any, t_boost: Any = 0,
                             num_train_timesteps: int | None = None) -> None:
    """Refuse DiffStyle settings that are invalid or cannot change the image (one-line errors).

    No-ops refused: ``gamma = 0`` (h_gen = h for both interpolations: every output is the DDIM
    reconstruction of its style image) and ``t_edit >= T`` (the DDIM grid's largest step is
    T − 1, so no step injects the content; T = ``num_train_timesteps`` when known, 1000 for the
    paper's model). ``t_edit = 0`` is *not* a no-op (the content is injected at every step, the
    last one included) and is accepted; a negative ``t_edit`` is refused as invalid.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"expected gamma in [0, 1], got {gamma!r}; fix --gamma")
    if gamma == 0:
        raise ValueError("gamma=0 cannot change the image (h_gen = h: every output is its style image's DDIM "
                         "reconstruction, no anomaly); set --gamma in (0, 1] (the paper's 0.7)")
    for label, value in (("t_edit", t_edit), ("t_boost", t_boost)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"expected {label} to be a non-negative integer, got {value!r}")
    if num_train_timesteps is not None and t_edit >= num_train_timesteps:
        raise ValueError(
            f"t_edit={t_edit} cannot change the image: the model has {num_train_timesteps} diffusion steps (the "
            f"largest is t={num_train_timesteps - 1}), so no step injects the content; set --t-edit below "
            f"{num_train_timesteps} (the paper's {DEFAULT_T_EDIT})"
        )


@register_generator("diffusion")
class DiffStyleGenerator(AnomalyGenerator):
    """DiffStyle h-space content injection (Jeong et al. 2023) as used by SWSA (Fung et al.).

    ``DiffStyleGenerator(model=None, steps=50, gamma=0.7, t_edit=400, interpolation="linear",
    t_boost=0, device="auto", batch_size=8, dtype="float32", local_files_only=True)``.
    ``model``: a local ``.pt`` file (ADM, e.g. ``256x256_diffusion_uncond.pt``), a diffusers
    directory or cached repo id, or a module (``ADMUNet`` / ``UNet2DModel`` /
    ``DiffusionModel``); default: ``$SWSA_DIFFUSION_MODEL``. ``adm_config``: the ADM
    configuration of a plain state-dict ``.pt`` file (:func:`~swsa_store.synth.adm.parse_adm_config`:
    a dict, JSON text or a .json/.toml file; default the paper's 256×256 unconditional model). ``count`` in :meth:`generate` is
    the number of pairs (None: all ``|style| × |content|``; fewer: a subset drawn with ``rng``).
    Settings that cannot change the image (``gamma=0``, ``t_edit`` at or above the model's
    number of diffusion steps) are refused here, before the model is loaded when its number of
    steps is known without loading it (:func:`check_diffstyle_settings`).
    """

    name = "diffusion"

    def __init__(self, model: Any = None, *, steps: int = DEFAULT_STEPS, gamma: float = DEFAULT_GAMMA,
                 t_edit: int = DEFAULT_T_EDIT, interpolation: str = "linear", t_boost: int = 0,
                 device: str | None = "auto", batch_size: int = 8, dtype: str = "float32",
                 local_files_only: bool = True, adm_config: Any = None):
        check_diffstyle_settings(gamma=gamma, t_edit=t_edit, t_boost=t_boost,
                                 num_train_timesteps=num_train_timesteps_hint(model))
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"expected interpolation in {list(INTERPOLATIONS)}, got {interpolation!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"expected batch_size to be a positive integer, got {batch_size!r}")
        dtypes = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                  "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise ValueError(f"expected dtype in {list(dtypes)}, got {dtype!r}")
        if model is None:
            model = os.environ.get(MODEL_ENV)
            if not model:
                raise FileNotFoundError(
                    "no diffusion model given: download 256x256_diffusion_uncond.pt (OpenAI guided-diffusion) "
                    f"and pass --model PATH (or set {MODEL_ENV}), or pass a diffusers UNet2DModel directory"
                )
        self.device = _resolve_device(device)
        self.model = load_diffusion_model(model, local_files_only=local_files_only,
                                          adm_config=adm_config).to(self.device, dtypes[dtype])
        check_diffstyle_settings(gamma=gamma, t_edit=t_edit, t_boost=t_boost,
                                 num_train_timesteps=self.model.num_train_timesteps)  # T of a file, now known
        self.timesteps = ddim_timesteps(steps, self.model.num_train_timesteps)
        self.steps, self.gamma, self.t_edit = int(steps), float(gamma), int(t_edit)
        self.interpolation, self.t_boost = interpolation, int(t_boost)
        self.batch_size, self.dtype = int(batch_size), dtype
        self.commit_every = self.batch_size  # each finished batch is catalogued: a kill loses one batch at most

    def describe(self) -> dict:
        return {
            "name": self.name, "steps": self.steps, "gamma": self.gamma, "t_edit": self.t_edit,
            "interpolation": self.interpolation, "t_boost": self.t_boost, "eta": 0.0,
            "image_size": self.model.image_size, "model": self.model.name, "model_sha256": self.model.sha256,
            "model_kind": self.model.kind, "dtype": self.dtype,
        }

    def __repr__(self) -> str:
        return f"DiffStyleGenerator({self.describe()!r})"

    # ----------------------------------------------------------------------------------------

    def resolve_count(self, n_seeds: int, count: int | None) -> int:
        """``count`` (None: every pair) checked against ``|style| × |content|``."""
        style, content = split_style_content(n_seeds)
        n_pairs = len(style) * len(content)
        if count is None:
            return n_pairs
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= n_pairs:
            raise ValueError(
                f"expected count in [0, {n_pairs}] ({len(style)} style × {len(content)} content images from "
                f"{n_seeds} seeds), got {count!r}; omit --count for every pair"
            )
        return int(count)

    def plan(self, n_seeds: int, count: int | None, rng: np.random.Generator) -> list[tuple[int, int, int]]:
        """The (style index, content index, pair seed) of each output, in output order.

        Pairs are ordered style-major; a ``count`` below the number of pairs keeps a subset
        drawn with ``rng``. Pair seeds (used only by quality boosting) are drawn for every
        pair, so ``rng`` is consumed the same way whatever the settings.
        """
        count = self.resolve_count(n_seeds, count)
        style, content = split_style_content(n_seeds)
        n_pairs = len(style) * len(content)
        keep = np.arange(n_pairs) if count == n_pairs else np.sort(rng.choice(n_pairs, size=count, replace=False))
        pair_seeds = rng.integers(0, 2**63 - 1, size=n_pairs, dtype=np.int64)
        return [(style[p // len(content)], content[p % len(content)], int(pair_seeds[p])) for p in keep]

    def run_pairs(self, images: dict[int, "torch.Tensor"], pairs: Sequence[tuple[int, int, int]],
                  wanted: Sequence[int] | None = None) -> Iterator[tuple[int, "torch.Tensor"]]:
        """Generate ``pairs`` (style key, content key, pair seed) from preprocessed ``images``.

        Yields ``(position in pairs, (3, H, W) tensor)`` for the positions in ``wanted``
        (default: all), in order. Every image that ``pairs`` uses is inverted (in fixed batches
        of sorted keys) and the pairs run in fixed batches of ``batch_size`` consecutive
        positions — a batch is computed whole if any of its positions is wanted — so an output
        never depends on which others are wanted (resumed runs give the same bytes).
        """
        model, ts, bs = self.model, self.timesteps, self.batch_size
        dtype = model.dtype
        wanted_set = set(range(len(pairs))) if wanted is None else {int(i) for i in wanted}
        if not wanted_set:
            return
        keys = sorted({s for s, _, _ in pairs} | {c for _, c, _ in pairs})
        contents = {c for _, c, _ in pairs}
        x_T: dict[int, torch.Tensor] = {}
        h_traj: dict[int, torch.Tensor] = {}  # content key -> (S, *h.shape[1:])
        for start in range(0, len(keys), bs):
            chunk = keys[start:start + bs]
            x0 = torch.stack([images[k] for k in chunk]).to(self.device, dtype)
            xt, hs = ddim_invert(model, x0, ts, record_h=any(k in contents for k in chunk))
            for i, k in enumerate(chunk):
                x_T[k] = xt[i]
                if k in contents:
                    h_traj[k] = torch.stack([h[i] for h in hs])
        for start in range(0, len(pairs), bs):
            positions = range(start, min(start + bs, len(pairs)))
            if not wanted_set.intersection(positions):
                continue
            chunk = [pairs[i] for i in positions]
            xt = torch.stack([x_T[s] for s, _, _ in chunk])
            hc = torch.stack([h_traj[c] for _, c, _ in chunk], dim=1)  # (S, B, ...)
            gens = None
            if self.t_boost > 0:
                gens = [torch.Generator().manual_seed(seed) for _, _, seed in chunk]
            out = asyrp_generate(model, xt, ts, h_content=list(hc), gamma=self.gamma, t_edit=self.t_edit,
                                 interpolation=self.interpolation, t_boost=self.t_boost, generators=gens)
            for i, position in enumerate(positions):
                if position in wanted_set:
                    yield position, out[i]

    def iter_generate(self, seed_images: Sequence[Image.Image], seed_ids: Sequence[int], count: int | None,
                      rng: np.random.Generator, skip: Sequence[int] | set[int] = ()) -> Iterator[tuple[int, SyntheticImage]]:
        """Lazily yield ``(index, SyntheticImage)``; indices in ``skip`` are not made (resume).

        An output does not depend on ``skip``: with the same ``batch_size`` and device it has
        the same bytes as in an uninterrupted run (other batch sizes agree up to rounding).
        The base rule of every generator applies (:func:`~swsa_store.synth.base.unchanged_reason`):
        an output within tolerance of its style or its content image (both as preprocessed to the
        model's resolution) is yielded as a skip; it is not redrawn, since the η = 0 process is
        deterministic for a pair (``params["redraws"]`` is always 0).
        """
        count = self.resolve_count(len(seed_images), count)
        check_generate_args(seed_images, seed_ids, count, rng)
        plan = self.plan(len(seed_images), count, rng)
        skip = set(int(i) for i in skip)
        todo = [i for i in range(len(plan)) if i not in skip]
        if not todo:
            return
        used = sorted({s for s, _, _ in plan} | {c for _, c, _ in plan})
        images = {k: preprocess(seed_images[k], self.model.image_size) for k in used}
        base = self.describe()
        base.pop("name")
        n_content = len(split_style_content(len(seed_images))[1])
        n_style = len(seed_images) // 2
        inputs = {k: _to_images(images[k][None])[0] for k in used}  # the parents as the model saw them
        for index, tensor in self.run_pairs(images, plan, wanted=todo):
            s, c, pair_seed = plan[index]
            params = {
                **base, "style_id": int(seed_ids[s]), "content_id": int(seed_ids[c]),
                "pair_index": int(s * n_content + (c - n_style)), "pair_seed": pair_seed, "redraws": 0,
            }
            out = postprocess(tensor[None])[0]
            parent_ids = (int(seed_ids[s]), int(seed_ids[c]))
            reason = next((r for r in (unchanged_reason(out, inputs[k], seed_ids[k], what="diffusion output")
                                       for k in (s, c)) if r), "")
            if reason:  # deterministic (η = 0): a redraw would repeat it, so it is a skip at once
                yield index, SyntheticImage(image=None, parent_ids=parent_ids, params=params,
                                            skip_reason=f"{reason} (at the model's {out.width} px)")
            else:
                yield index, SyntheticImage(image=out, parent_ids=parent_ids, params=params)

    def generate(self, seed_images: Sequence[Image.Image], seed_ids: Sequence[int], count: int | None,
                 rng: np.random.Generator) -> list[SyntheticImage]:
        """Every requested pair's anomaly (``count`` None: ``|style| × |content|``), in order."""
        return [item for _, item in self.iter_generate(seed_images, seed_ids, count, rng)]
