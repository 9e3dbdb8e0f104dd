"""CutPaste synthetic anomalies (Li et al., *CutPaste: Self-Supervised Learning for Anomaly
Detection and Localization*, CVPR 2021), as used by SWSA (Fung et al., Sec. 3.2).

Two variants, with the paper's parameters:

* ``normal`` — cut a rectangle whose area is a uniform 2–15 % of the image
  (``area_ratio=(0.02, 0.15)``) and whose aspect ratio (w/h) is log-uniform in
  ``(0.3, 3.3)`` (i.e. (0.3, 1/0.3)), colour-jitter it (brightness, contrast, saturation
  and hue, each 0.1) and paste it back at a uniform location of the same image.
* ``scar`` — cut a thin rectangle of width 2–16 px and length 10–25 px (at a 256-px image;
  here scaled linearly with the image's shorter side), colour-jitter it, rotate it by a
  uniform angle in [-45°, 45°] and paste it (with its rotation mask) at a uniform location.

Everything random is drawn from the ``numpy.random.Generator`` passed in, including the
colour-jitter factors and their order (torchvision's ``ColorJitter`` would use torch's
global RNG), so results are reproducible from :func:`swsa_store.synth.generator_rng`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image

from swsa_store.synth.base import SingleParentGenerator, check_edit_args, register_generator

__all__ = ["CutPasteConfig", "CutPasteGenerator", "color_jitter", "cutpaste"]

#: Image size (shorter side, px) at which the scar's width/length are given (the paper's 256).
SCAR_REFERENCE_SIDE = 256

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
VARIANTS = ("normal", "scar")


def _check_range(label: str, value: Any, *, low: float, high: float | None = None,
                 open_low: bool = False) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"expected CutPasteConfig.{label} to be a (min, max) pair, got {value!r}; "
            f"fix CutPasteConfig.{label}"
        ) from None
    too_low = (a <= low) if open_low else (a < low)
    if too_low or a > b or (high is not None and b > high) or not (math.isfinite(a) and math.isfinite(b)):
        bound = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}]"
        raise ValueError(
            f"expected CutPasteConfig.{label} = (min, max) with min <= max inside {bound}, "
            f"got {value!r}; fix CutPasteConfig.{label}"
        )
    return a, b


@dataclass(frozen=True)
class CutPasteConfig:
    """CutPaste settings; the defaults are those of Li et al. (CVPR 2021).

    variant: ``"normal"`` (rectangular patch) or ``"scar"`` (thin rotated patch).
    area_ratio: normal patch area as a fraction of the image area, uniform in (min, max).
    aspect_ratio: normal patch width/height, log-uniform in (min, max).
    jitter: colour-jitter strength for brightness, contrast and saturation (factor uniform
        in [1 - jitter, 1 + jitter]) and hue (shift uniform in [-jitter, jitter]).
    scar_width, scar_length: scar size in px at a 256-px image (scaled with the shorter
        side), each uniform in (min, max); width is the x extent, length the y extent.
    scar_rotation: scar rotation in degrees (counter-clockwise), uniform in (min, max).
    """

    variant: str = "normal"
    area_ratio: tuple[float, float] = (0.02, 0.15)
    aspect_ratio: tuple[float, float] = (0.3, 3.3)
    jitter: float = 0.1
    scar_width: tuple[float, float] = (2.0, 16.0)
    scar_length: tuple[float, float] = (10.0, 25.0)
    scar_rotation: tuple[float, float] = (-45.0, 45.0)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"expected CutPasteConfig.variant in {list(VARIANTS)}, got {self.variant!r}; "
                "fix the variant"
            )
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("area_ratio", _check_range("area_ratio", self.area_ratio, low=0.0, high=1.0, open_low=True))
        set_("aspect_ratio", _check_range("aspect_ratio", self.aspect_ratio, low=0.0, open_low=True))
        set_("scar_width", _check_range("scar_width", self.scar_width, low=0.0, open_low=True))
        set_("scar_length", _check_range("scar_length", self.scar_length, low=0.0, open_low=True))
        set_("scar_rotation", _check_range("scar_rotation", self.scar_rotation, low=-360.0, high=360.0))
        jitter = self.jitter
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0.0 <= jitter <= 0.5:
            raise ValueError(
                f"expected CutPasteConfig.jitter in [0, 0.5] (hue shifts are bounded by 0.5), "
                f"got {jitter!r}; fix CutPasteConfig.jitter"
            )
        set_("jitter", float(jitter))

    def to_dict(self) -> dict:
        """JSON-serialisable form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def color_jitter(patch: Image.Image, rng: np.random.Generator, strength: float) -> tuple[Image.Image, dict]:
    """Deterministic ``torchvision.transforms.ColorJitter(s, s, s, s)`` driven by ``rng``.

    As torchvision does, draws a random order of the four operations, then a brightness,
    contrast and saturation factor uniform in [max(0, 1 - s), 1 + s] and a hue shift
    uniform in [-s, s], and applies them with ``torchvision.transforms.functional``.
    Returns the jittered patch and ``{"order": [...], "brightness": f, ...}``.
    """
    order = [JITTER_OPS[int(i)] for i in rng.permutation(len(JITTER_OPS))]
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    factors = {
        "brightness": float(rng.uniform(lo, hi)),
        "contrast": float(rng.uniform(lo, hi)),
        "saturation": float(rng.uniform(lo, hi)),
        "hue": float(rng.uniform(-strength, strength)),
    }
    ops = {
        "brightness": TF.adjust_brightness,
        "contrast": TF.adjust_contrast,
        "saturation": TF.adjust_saturation,
        "hue": TF.adjust_hue,
    }
    for op in order:
        patch = ops[op](patch, factors[op])
    return patch, {"order": order, **factors}


def _uniform_int(rng: np.random.Generator, high_inclusive: int) -> int:
    return int(rng.integers(0, high_inclusive + 1))


def _cutpaste_normal(img: Image.Image, rng: np.random.Generator, cfg: CutPasteConfig) -> dict:
    width, height = img.size
    ratio = float(rng.uniform(*cfg.area_ratio))
    log_lo, log_hi = math.log(cfg.aspect_ratio[0]), math.log(cfg.aspect_ratio[1])
    aspect = float(math.exp(rng.uniform(log_lo, log_hi)))
    area = ratio * width * height
    pw = int(min(max(round(math.sqrt(area * aspect)), 1), width))
    ph = int(min(max(round(math.sqrt(area / aspect)), 1), height))
    sx, sy = _uniform_int(rng, width - pw), _uniform_int(rng, height - ph)
    dx, dy = _uniform_int(rng, width - pw), _uniform_int(rng, height - ph)
    patch = img.crop((sx, sy, sx + pw, sy + ph))
    patch, jitter = color_jitter(patch, rng, cfg.jitter)
    img.paste(patch, (dx, dy))
    return {
        "variant": "normal",
        "image_size": [width, height],
        "src_box": [sx, sy, sx + pw, sy + ph],
        "dst_box": [dx, dy, dx + pw, dy + ph],
        "patch_size": [pw, ph],
        "area_ratio": pw * ph / (width * height),
        "area_ratio_drawn": ratio,
        "aspect_ratio": pw / ph,
        "aspect_ratio_drawn": aspect,
        "jitter": jitter,
    }


def _cutpaste_scar(img: Image.Image, rng: np.random.Generator, cfg: CutPasteConfig) -> dict:
    width, height = img.size
    scale = min(width, height) / SCAR_REFERENCE_SIDE
    pw = int(min(max(round(float(rng.uniform(*cfg.scar_width)) * scale), 1), width))
    ph = int(min(max(round(float(rng.uniform(*cfg.scar_length)) * scale), 1), height))
    sx, sy = _uniform_int(rng, width - pw), _uniform_int(rng, height - ph)
    patch = img.crop((sx, sy, sx + pw, sy + ph))
    patch, jitter = color_jitter(patch, rng, cfg.jitter)
    angle = float(rng.uniform(*cfg.scar_rotation))
    # Nearest-neighbour keeps the mask binary (as in the reference implementation), so the
    # rotated patch's corners paste no black fill.
    rotated = patch.rotate(angle, resample=Image.Resampling.NEAREST, expand=True)
    mask = Image.new("L", patch.size, 255).rotate(angle, resample=Image.Resampling.NEAREST, expand=True)
    rw, rh = rotated.size
    if rw > width or rh > height:  # only for configs with scars larger than the image
        cx, cy = (rw - min(rw, width)) // 2, (rh - min(rh, height)) // 2
        box = (cx, cy, cx + min(rw, width), cy + min(rh, height))
        rotated, mask = rotated.crop(box), mask.crop(box)
        rw, rh = rotated.size
    dx, dy = _uniform_int(rng, width - rw), _uniform_int(rng, height - rh)
    img.paste(rotated, (dx, dy), mask)
    return {
        "variant": "scar",
        "image_size": [width, height],
        "src_box": [sx, sy, sx + pw, sy + ph],
        "dst_box": [dx, dy, dx + rw, dy + rh],
        "patch_size": [pw, ph],
        "rotated_size": [rw, rh],
        "scale": scale,
        "area_ratio": pw * ph / (width * height),
        "aspect_ratio": pw / ph,
        "angle": angle,
        "jitter": jitter,
    }


def cutpaste(
    image: Image.Image, rng: np.random.Generator, config: CutPasteConfig | None = None
) -> tuple[Image.Image, dict]:
    """Apply one CutPaste augmentation to ``image`` (not modified); return (RGB image, params).

    ``params`` is JSON-serialisable: ``variant``, ``image_size`` [W, H], ``src_box`` and
    ``dst_box`` [x0, y0, x1, y1] (x1/y1 exclusive; for ``scar`` the destination box is the
    rotated patch's bounding box), ``patch_size`` [w, h], ``area_ratio`` (w·h / W·H actually
    used) and ``aspect_ratio`` (w/h actually used), ``jitter`` (order and factors); for
    ``normal`` also the drawn ``area_ratio_drawn`` / ``aspect_ratio_drawn`` before rounding;
    for ``scar`` also ``angle`` (degrees, counter-clockwise), ``rotated_size`` and ``scale``.
    """
    cfg = config if config is not None else CutPasteConfig()
    if not isinstance(cfg, CutPasteConfig):
        raise TypeError(f"expected a CutPasteConfig, got {type(cfg).__name__}; build one with CutPasteConfig(...)")
    width, height = check_edit_args(image, rng)
    out = image.convert("RGB")
    if out is image:  # never modify the caller's image
        out = image.copy()
    params = (_cutpaste_normal if cfg.variant == "normal" else _cutpaste_scar)(out, rng, cfg)
    return out, params


@register_generator("cutpaste")
class CutPasteGenerator(SingleParentGenerator):
    """CutPaste anomaly generator (Li et al., CVPR 2021).

    ``CutPasteGenerator(config=None, **fields)``: ``fields`` are :class:`CutPasteConfig`
    fields (e.g. ``variant="scar"``) overriding ``config`` (default: the paper's settings).
    """

    name = "cutpaste"

    def __init__(self, config: CutPasteConfig | None = None, **fields: Any):
        base = config if config is not None else CutPasteConfig()
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(CutPasteConfig)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(CutPasteConfig))
            raise TypeError(
                f"expected CutPasteConfig fields, got unknown {unknown}; valid fields: {valid}"
            )
        self.config = dataclasses.replace(base, **fields) if fields else base

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config.to_dict()}

    def __repr__(self) -> str:
        return f"CutPasteGenerator({self.config!r})"

    def make(self, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
        """One CutPaste image (each parent is drawn uniformly from the seeds by ``generate``)."""
        return cutpaste(image, rng, self.config)
