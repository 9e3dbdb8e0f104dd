"""Perlin-noise synthetic anomalies, as in DRAEM (Zavrtanik et al., ICCV 2021) and anomalib's
``val_split_mode: synthetic``.

For each anomaly a seed image is drawn, and

1. a **mask**: 2-D Perlin noise (gradient noise on a lattice of ``2**kx × 2**ky`` cells across
   the image, each exponent drawn independently from ``PerlinConfig.scale_range``; a number of
   cells across the side is a size relative to the image, so the blobs scale with it — capped at
   ``side // MIN_CELL_PX`` cells so that a cell is at least 4 px), optionally
   rotated by an angle uniform in ``PerlinConfig.rotation``, thresholded at
   ``PerlinConfig.threshold``. A mask whose coverage (share of pixels inside) falls outside
   ``PerlinConfig.coverage`` is redrawn (scales, angle and noise), at most
   ``PerlinConfig.max_tries`` times, after which a clear error says which setting to change;
2. a **texture** of the image's size: a file drawn uniformly from ``texture_dir`` (e.g. the
   Describable Textures Dataset), resized bilinearly; or, with no folder, a *self texture* —
   the seed image colour-jittered (the CutPaste jitter, strength ``PerlinConfig.jitter``) and
   cut into ``shuffle_grid × shuffle_grid`` equal tiles that are shuffled;
3. a **blend**: inside the mask, ``(1 - a) · image + a · texture`` with the texture's weight
   ``a`` uniform in ``PerlinConfig.blend`` (DRAEM's ``1 - beta``); outside it the image is
   left exactly as it was.

Everything random (seed choice, scales, angle, lattice gradients, texture file, jitter, tile
order, blend factor) comes from the ``numpy.random.Generator`` passed in, so the images are
deterministic per (task, seed) through :func:`swsa_store.synth.generator_rng`. The noise is
vectorised numpy (one array expression per image, any image size, no power-of-two padding).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from swsa_store.samples import to_rgb
from swsa_store.synth.base import SingleParentGenerator, check_edit_args, register_generator
from swsa_store.synth.cutpaste import color_jitter

__all__ = [
    "MIN_CELL_PX",
    "TEXTURE_EXTENSIONS",
    "PerlinConfig",
    "PerlinGenerator",
    "list_textures",
    "perlin_anomaly",
    "perlin_mask",
    "perlin_noise",
]

#: Smallest noise cell (px). DRAEM / anomalib draw 1–32 cells across a 256-px image (cells of 8
#: px and more); the cap ``side // MIN_CELL_PX`` leaves that range untouched from 128 px up and,
#: below, stops at 4-px cells. Measured on 200 masks of a 32-px image: with 2-px cells (the old
#: cap) 96 % of the mask's blobs are 1-2 px specks (median 1 px), with 4-px cells 44 % (median 3).
MIN_CELL_PX = 4

#: Image file suffixes (lower case) taken from a texture folder.
TEXTURE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _range(label: str, value: Any, *, low: float, high: float | None = None,
           open_low: bool = False) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"expected PerlinConfig.{label} to be a (min, max) pair, got {value!r}; fix PerlinConfig.{label}"
        ) from None
    too_low = (a <= low) if open_low else (a < low)
    if not (math.isfinite(a) and math.isfinite(b)) or too_low or a > b or (high is not None and b > high):
        bound = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}]"
        raise ValueError(
            f"expected PerlinConfig.{label} = (min, max) with min <= max inside {bound}, got {value!r}; "
            f"fix PerlinConfig.{label}"
        )
    return a, b


def _is_power_of_two(value: float) -> bool:
    return value >= 1 and float(value).is_integer() and (int(value) & (int(value) - 1)) == 0


@dataclass(frozen=True)
class PerlinConfig:
    """Perlin-noise anomaly settings (defaults follow DRAEM / anomalib where they have one).

    scale_range: (min, max) number of noise cells across the image, powers of two; per image
        and axis the number is ``2**k`` with ``k`` a uniform integer in [log2 min, log2 max]
        (anomalib: 1–32), capped at ``side // MIN_CELL_PX`` so that a cell is at least 4 px.
    threshold: noise level above which a pixel is in the mask (noise is in about [-1, 1]).
    rotation: rotation of the noise field in degrees, uniform in (min, max); (0, 0) for none.
    blend: the texture's weight inside the mask, uniform in (min, max) (DRAEM: 1 - beta with
        beta uniform in [0, 0.8], i.e. 0.2–1.0).
    coverage: accepted share of the image inside the mask, [min, max]; otherwise redrawn.
    max_tries: how many masks are drawn at most to meet ``coverage``.
    texture_dir: folder of texture images (searched recursively, e.g. DTD's ``images/``);
        None: the self texture (a shuffled, colour-jittered copy of the seed image).
    shuffle_grid: self texture: tiles per side (the image is cut into grid × grid tiles).
    jitter: self texture: colour-jitter strength (brightness/contrast/saturation factors in
        [1 - j, 1 + j], hue shift in [-j, j]).
    """

    scale_range: tuple[int, int] = (1, 32)
    threshold: float = 0.5
    rotation: tuple[float, float] = (-90.0, 90.0)
    blend: tuple[float, float] = (0.2, 1.0)
    coverage: tuple[float, float] = (0.01, 0.5)
    max_tries: int = 100
    texture_dir: str | None = None
    shuffle_grid: int = 4
    jitter: float = 0.3

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        lo, hi = _range("scale_range", self.scale_range, low=1.0)
        if not (_is_power_of_two(lo) and _is_power_of_two(hi)):
            raise ValueError(
                f"expected PerlinConfig.scale_range to be powers of two (1, 2, 4, ...), got {self.scale_range!r}; "
                "fix PerlinConfig.scale_range"
            )
        set_("scale_range", (int(lo), int(hi)))
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 < threshold < 1.0:
            raise ValueError(
                f"expected PerlinConfig.threshold in (-1, 1) (the noise lies in about [-1, 1]), got {threshold!r}; "
                "fix PerlinConfig.threshold"
            )
        set_("threshold", float(threshold))
        set_("rotation", _range("rotation", self.rotation, low=-360.0, high=360.0))
        set_("blend", _range("blend", self.blend, low=0.0, high=1.0, open_low=True))
        set_("coverage", _range("coverage", self.coverage, low=0.0, high=1.0, open_low=True))
        for label, value, least in (("max_tries", self.max_tries, 1), ("shuffle_grid", self.shuffle_grid, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(
                    f"expected PerlinConfig.{label} to be an integer >= {least}, got {value!r}; fix PerlinConfig.{label}"
                )
            set_(label, int(value))
        jitter = self.jitter
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0.0 <= jitter <= 0.5:
            raise ValueError(
                f"expected PerlinConfig.jitter in [0, 0.5] (hue shifts are bounded by 0.5), got {jitter!r}; "
                "fix PerlinConfig.jitter"
            )
        set_("jitter", float(jitter))
        if self.texture_dir is not None:
            if not isinstance(self.texture_dir, (str, os.PathLike)):
                raise TypeError(
                    f"expected PerlinConfig.texture_dir to be a folder path or None, got {type(self.texture_dir).__name__}"
                )
            set_("texture_dir", str(self.texture_dir))
        elif self.shuffle_grid == 1 and self.jitter == 0.0:
            raise ValueError(
                "PerlinConfig.shuffle_grid=1 with jitter=0 and no texture_dir makes the texture the seed image itself, "
                "so every output equals its parent; set shuffle_grid >= 2, jitter > 0 or a texture_dir"
            )

    def to_dict(self) -> dict:
        """JSON-serialisable form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------- noise and mask


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator, angle: float = 0.0
) -> np.ndarray:
    """2-D Perlin (gradient) noise of ``shape`` (H, W), float64 in about [-1, 1].

    ``cells`` = (cells along y, cells along x) across the image; ``angle`` (degrees,
    counter-clockwise) rotates the noise field about the image centre (the lattice is made
    large enough that the rotated field covers the whole image). Gradient directions are
    uniform angles drawn from ``rng``.
    """
    h, w = int(shape[0]), int(shape[1])
    cy, cx = float(cells[0]), float(cells[1])
    ys = np.arange(h, dtype=np.float64) + 0.5 - h / 2.0
    xs = np.arange(w, dtype=np.float64) + 0.5 - w / 2.0
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if angle:
        theta = math.radians(angle)
        c, s = math.cos(theta), math.sin(theta)
        yy, xx = c * yy - s * xx, s * yy + c * xx
    v = yy * (cy / h)  # lattice coordinates
    u = xx * (cx / w)
    v = v - math.floor(float(v.min()))
    u = u - math.floor(float(u.min()))
    i0 = np.floor(v).astype(np.int64)
    j0 = np.floor(u).astype(np.int64)
    fy, fx = v - i0, u - j0
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(int(i0.max()) + 2, int(j0.max()) + 2))
    gy, gx = np.sin(angles), np.cos(angles)

    def corner(di: int, dj: int) -> np.ndarray:
        i, j = i0 + di, j0 + dj
        return gy[i, j] * (fy - di) + gx[i, j] * (fx - dj)

    ty, tx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1.0 - tx) + corner(0, 1) * tx
    bottom = corner(1, 0) * (1.0 - tx) + corner(1, 1) * tx
    return math.sqrt(2.0) * (top * (1.0 - ty) + bottom * ty)


def _draw_cells(rng: np.random.Generator, cfg: PerlinConfig) -> tuple[int, int]:
    lo, hi = (int(math.log2(v)) for v in cfg.scale_range)
    ky, kx = (int(k) for k in rng.integers(lo, hi + 1, size=2))
    return 2**ky, 2**kx


def perlin_mask(
    shape: tuple[int, int], rng: np.random.Generator, config: PerlinConfig | None = None
) -> tuple[np.ndarray, dict]:
    """A thresholded Perlin-noise mask of ``shape`` (H, W) with coverage in ``config.coverage``.

    Returns ``(mask, params)``: a boolean (H, W) array and ``{"scales": [drawn y, drawn x],
    "cells": [used y, used x], "angle", "threshold", "coverage", "tries"}`` (``cells`` are the
    drawn scales capped at ``side // MIN_CELL_PX``). Raises ValueError when ``max_tries`` masks
    all miss the coverage range.
    """
    cfg = config if config is not None else PerlinConfig()
    h, w = int(shape[0]), int(shape[1])
    lo, hi = cfg.coverage
    seen = []
    for attempt in range(1, cfg.max_tries + 1):
        scales = _draw_cells(rng, cfg)
        cells = (min(scales[0], max(1, h // MIN_CELL_PX)), min(scales[1], max(1, w // MIN_CELL_PX)))
        rot_lo, rot_hi = cfg.rotation
        angle = float(rng.uniform(rot_lo, rot_hi)) if rot_hi > rot_lo else float(rot_lo)
        mask = perlin_noise((h, w), cells, rng, angle) > cfg.threshold
        coverage = float(mask.mean())
        if lo <= coverage <= hi:
            return mask, {
                "scales": [int(scales[0]), int(scales[1])],
                "cells": [int(cells[0]), int(cells[1])],
                "angle": angle,
                "threshold": cfg.threshold,
                "coverage": coverage,
                "tries": attempt,
            }
        seen.append(coverage)
    raise ValueError(
        f"could not draw a Perlin mask with coverage in [{lo}, {hi}] for a {w}x{h} image in "
        f"{cfg.max_tries} tries (coverages seen {min(seen):.3f}–{max(seen):.3f} at threshold {cfg.threshold}); "
        "widen PerlinConfig.coverage, change PerlinConfig.threshold or raise PerlinConfig.max_tries"
    )


# --------------------------------------------------------------------------- textures


def list_textures(texture_dir: str | os.PathLike) -> tuple[str, ...]:
    """Image files under ``texture_dir`` (recursive), as sorted POSIX paths relative to it."""
    root = Path(texture_dir)
    if not root.is_dir():
        raise ValueError(
            f"texture folder {str(root)!r} does not exist or is not a folder; "
            "pass texture_dir=PATH to a folder of texture images (e.g. DTD's images/) or None for the self texture"
        )
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXTURE_EXTENSIONS and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(
            f"texture folder {str(root)!r} holds no images ({', '.join(TEXTURE_EXTENSIONS)}); "
            "point texture_dir at a folder of texture images or pass None for the self texture"
        )
    return tuple(files)


def _load_texture(root: str, relative: str, size: tuple[int, int]) -> np.ndarray:
    path = Path(root) / relative
    try:
        with Image.open(path) as img:
            texture = to_rgb(img)  # 16-bit textures scaled, not clipped
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ValueError(f"cannot read texture image {str(path)!r} ({exc}); remove or fix that file") from None
    if texture.size != size:
        texture = texture.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(texture, dtype=np.float64)


def _self_texture(image: Image.Image, rng: np.random.Generator, cfg: PerlinConfig) -> tuple[np.ndarray, dict]:
    if cfg.jitter > 0:
        jittered, jitter = color_jitter(image, rng, cfg.jitter)
    else:  # no jitter: skip the (lossy) colour-space round trips
        jittered, jitter = image, {}
    arr = np.asarray(jittered, dtype=np.float64).copy()
    h, w = arr.shape[:2]
    grid = max(1, min(cfg.shuffle_grid, min(h, w) // 2))  # tiles of at least 2 px
    th, tw = h // grid, w // grid
    n = grid * grid
    order = np.arange(n)
    if n > 1:
        for _ in range(100):  # a shuffle that moves something (an identity draw is ~1/n!)
            order = rng.permutation(n)
            if (order != np.arange(n)).any():
                break
    tiles = arr[: grid * th, : grid * tw].reshape(grid, th, grid, tw, 3).transpose(0, 2, 1, 3, 4).reshape(n, th, tw, 3)
    arr[: grid * th, : grid * tw] = (
        tiles[order].reshape(grid, grid, th, tw, 3).transpose(0, 2, 1, 3, 4).reshape(grid * th, grid * tw, 3)
    )
    return arr, {"shuffle_grid": grid, "permutation": [int(i) for i in order], "jitter": jitter}


def perlin_anomaly(
    image: Image.Image,
    rng: np.random.Generator,
    config: PerlinConfig | None = None,
    textures: Sequence[str] | None = None,
) -> tuple[Image.Image, np.ndarray, dict]:
    """Apply one Perlin-noise anomaly to ``image`` (not modified).

    Returns ``(RGB image, mask, params)``; ``mask`` is the boolean (H, W) mask (pixels outside
    it are unchanged). ``textures``: relative file names under ``config.texture_dir`` (default:
    :func:`list_textures` of it). ``params`` (JSON-serialisable): ``image_size`` [W, H], the
    mask's ``scales``, ``cells``, ``angle``, ``threshold``, ``coverage``, ``tries``; ``blend``
    (the texture's weight); ``texture`` (``"self"`` or the file relative to ``texture_dir``);
    for the self texture also ``shuffle_grid``, ``permutation`` and ``jitter``.
    """
    cfg = config if config is not None else PerlinConfig()
    if not isinstance(cfg, PerlinConfig):
        raise TypeError(f"expected a PerlinConfig, got {type(cfg).__name__}; build one with PerlinConfig(...)")
    width, height = check_edit_args(image, rng)
    rgb = image.convert("RGB")
    base = np.asarray(rgb, dtype=np.uint8)
    mask, params = perlin_mask((height, width), rng, cfg)
    if cfg.texture_dir is not None:
        names = tuple(textures) if textures is not None else list_textures(cfg.texture_dir)
        if not names:
            raise ValueError(f"no texture images given for texture folder {cfg.texture_dir!r}")
        name = names[int(rng.integers(len(names)))]
        texture = _load_texture(cfg.texture_dir, name, (width, height))
        texture_params: dict = {"texture": name}
    else:
        texture, extra = _self_texture(rgb, rng, cfg)
        texture_params = {"texture": "self", **extra}
    alpha = float(rng.uniform(*cfg.blend))
    blended = np.clip(np.rint((1.0 - alpha) * base + alpha * texture), 0, 255).astype(np.uint8)
    out = np.where(mask[:, :, None], blended, base)
    return Image.fromarray(out, mode="RGB"), mask, {
        "image_size": [width, height], **params, "blend": alpha, **texture_params,
    }


# --------------------------------------------------------------------------- generator


@register_generator("perlin")
class PerlinGenerator(SingleParentGenerator):
    """Perlin-noise anomaly generator (DRAEM / anomalib's synthetic validation split).

    ``PerlinGenerator(config=None, **fields)``: ``fields`` are :class:`PerlinConfig` fields
    (e.g. ``texture_dir="dtd/images"``, ``blend=(0.5, 1.0)``) overriding ``config``. The
    texture folder is listed once, here (a missing or empty folder is an error now, not
    halfway through a run).
    """

    name = "perlin"

    def __init__(self, config: PerlinConfig | None = None, **fields: Any):
        base = config if config is not None else PerlinConfig()
        if not isinstance(base, PerlinConfig):
            raise TypeError(f"expected a PerlinConfig, got {type(base).__name__}; build one with PerlinConfig(...)")
        valid = [f.name for f in dataclasses.fields(PerlinConfig)]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise TypeError(f"expected PerlinConfig fields, got unknown {unknown}; valid fields: {', '.join(valid)}")
        self.config = dataclasses.replace(base, **fields) if fields else base
        self.textures = list_textures(self.config.texture_dir) if self.config.texture_dir is not None else ()

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config.to_dict(), "n_textures": len(self.textures)}

    def __repr__(self) -> str:
        return f"PerlinGenerator({self.config!r})"

    def make(self, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
        """One Perlin-noise anomaly (each parent is drawn uniformly from the seeds by ``generate``)."""
        image, _mask, params = perlin_anomaly(image, rng, self.config, self.textures or None)
        return image, params
