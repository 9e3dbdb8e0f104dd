"""CutPaste synthetic anomalies (Li et al., *CutPaste: Self-Supervised Learning for Anomaly
Detection and Localization*, CVPR 2021), as used by SWSA (Fung et al., Sec. 3.2).

Two variants, with the paper's parameters:

* ``normal`` — cut a rectangle whose area is a uniform 2–15 % of the image
  (``area_ratio=(0.02, 0.15)``) and whose aspect ratio (w/h) is log-uniform in
  ``(0.3, 3.3)`` (i.e. (0.3, 1/0.3)), colour-jitter it (brightness, contrast, saturation
  and hue, each 0.1) and paste it back at a uniform location of the same image.
* ``scar`` — cut a thin rectangle of width 2–16 px and length 10–25 px at the paper's 256-px
  images, colour-jitter it, rotate it by a uniform angle in [-45°, 45°] and paste it (with its
  rotation mask) at a uniform location.

Sizes scale with the image. The normal patch's area is a share of the image area (the paper's
definition). The scar's width and length are fractions of the image's shorter side — the
paper's pixels divided by 256: width 0.0078–0.0625, length 0.039–0.098 — so the defaults are
exactly the paper's at 256 px, and 2.3–18.8 × 11.7–29.3 px on a 300-px ELPV cell. Below about
128 px those fractions give scars of 1–2 px (a 32-px image: 0.25–2 × 1.25–3 px, invisible or a
single pixel), so each range is floored at ``scar_min_px`` = (2, 5) px (width, length): the
smallest scar stays a thin line, 2 px wide and 2.5× as long, like the paper's smallest (2 × 10
px). A floored range keeps its upper end when that is larger (64 px: width 2–4, length 5–6.25
px); the length floor acts below 128 px, the width floor below 256 px (where it only lifts the
low end, e.g. 1.6 → 2 px at 200 px, which rounding did anyway), neither at 256 px and above. The generator's base
(:class:`~swsa_store.synth.base.SingleParentGenerator`) redraws any output that still leaves its
parent unchanged (a scar cut from and pasted onto flat background).

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

__all__ = ["SCAR_REFERENCE_SIDE", "CutPasteConfig", "CutPasteGenerator", "color_jitter", "cutpaste", "scar_ranges_px"]

#: The paper's image side (px): its scar sizes in px, divided by this, are the default fractions.
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
    scar_width, scar_length: scar size as fractions of the image's shorter side, each
        uniform in (min, max) (defaults: the paper's 2–16 and 10–25 px at 256 px); width is
        the x extent, length the y extent.
    scar_min_px: (width, length) floors in px for the two ranges (default (2, 5)): a range
        whose ends fall below its floor is raised to it, so small images get visible scars.
    scar_rotation: scar rotation in degrees (counter-clockwise), uniform in (min, max).
    """

    variant: str = "normal"
    area_ratio: tuple[float, float] = (0.02, 0.15)
    aspect_ratio: tuple[float, float] = (0.3, 3.3)
    jitter: float = 0.1
    scar_width: tuple[float, float] = (2.0 / SCAR_REFERENCE_SIDE, 16.0 / SCAR_REFERENCE_SIDE)
    scar_length: tuple[float, float] = (10.0 / SCAR_REFERENCE_SIDE, 25.0 / SCAR_REFERENCE_SIDE)
    scar_min_px: tuple[float, float] = (2.0, 5.0)
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
        for label in ("scar_width", "scar_length"):
            value = getattr(self, label)
            try:
                set_(label, _check_range(label, value, low=0.0, high=1.0, open_low=True))
            except ValueError:
                raise ValueError(
                    f"expected CutPasteConfig.{label} = (min, max) fractions of the image's shorter side in "
                    f"(0, 1], got {value!r} (the paper's px at 256 px divided by 256, e.g. (2/256, 16/256)); "
                    f"fix CutPasteConfig.{label}"
                ) from None
        set_("scar_min_px", _check_range("scar_min_px", self.scar_min_px, low=0.0, high=None))
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


def scar_ranges_px(side: int, cfg: CutPasteConfig) -> tuple[tuple[float, float], tuple[float, float]]:
    """The scar's (width, length) ranges in px for an image whose shorter side is ``side``:
    the configured fractions times ``side``, each end raised to its ``scar_min_px`` floor."""
    out = []
    for (lo, hi), floor in zip((cfg.scar_width, cfg.scar_length), cfg.scar_min_px):
        out.append((max(lo * side, floor), max(hi * side, floor)))
    return out[0], out[1]


def _cutpaste_scar(img: Image.Image, rng: np.random.Generator, cfg: CutPasteConfig) -> dict:
    width, height = img.size
    side = min(width, height)
    width_px, length_px = scar_ranges_px(side, cfg)
    pw = int(min(max(round(float(rng.uniform(*width_px))), 1), width))
    ph = int(min(max(round(float(rng.uniform(*length_px))), 1), height))
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
        "side": side,
        "width_range_px": list(width_px),
        "length_range_px": list(length_px),
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
    for ``scar`` also ``angle`` (degrees, counter-clockwise), ``rotated_size``, ``side`` (the
    shorter side) and ``width_range_px`` / ``length_range_px`` (the ranges drawn from, in px).
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
