"""Anomaly heat maps of patch-level predictions and their HTML gallery (``swsa predict --heatmaps DIR``).

For each scored image, :func:`overlay_heatmap` draws its per-patch anomaly map (the squared
distance of each patch to its nearest reference patch, whose maximum is the image's score:
:meth:`swsa_engine.run.predict.Predictor.predict_with_maps`) over the image as the backbone saw it
(resized and cropped: the frame the patch grid covers). The map is upsampled bilinearly from the
patch grid to the image (a cell's value sits at its centre, so the hottest pixel lies in the
hottest patch), coloured with :data:`HEATMAP_COLORMAP` on one colour scale shared by every image
of the run (so a normal image looks cool beside an anomalous one: :func:`colour_scale`) and
blended with weight :data:`HEATMAP_ALPHA`. Images smaller than :data:`MIN_SIDE` pixels are
enlarged for display.

:func:`write_prediction_gallery` writes one PNG per scored image (``NNNNN_<name>.png``) and
``index.html``: a self-contained page (thumbnails embedded as data URIs, no script, no external
file but the PNGs it links) listing every image by descending score with its score and decision,
the images that could not be scored last with their reason. Every path shown is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["HEATMAP_ALPHA", "HEATMAP_COLORMAP", "MIN_SIDE", "GALLERY_FILE", "colour_scale", "upsample_map",
           "overlay_heatmap", "heatmap_name", "gallery_html", "write_prediction_gallery"]

#: weight of the colour map in the blend (the image keeps 1 − alpha)
HEATMAP_ALPHA = 0.5
#: matplotlib colour map of the anomaly maps (dark: close to a normal patch; bright: far)
HEATMAP_COLORMAP = "inferno"
#: images whose shorter side is below this are enlarged for display (bilinear)
MIN_SIDE = 224
#: the gallery page inside the heat-map folder
GALLERY_FILE = "index.html"
_THUMB = 160


def colour_scale(maps: np.ndarray) -> tuple[float, float]:
    """``(low, high)``: the smallest and largest finite patch score over all ``maps`` (N, h, w); the
    colour scale every heat map of one run shares (``high = low + 1`` when they are all equal)."""
    values = np.asarray(maps, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    return low, (high if high > low else low + 1.0)


def upsample_map(patch_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float32: the patch map (h, w) upsampled bilinearly to ``size`` = (H, W) pixels."""
    grid = np.asarray(patch_map, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"a patch map must be a 2-d grid (h, w), got shape {grid.shape}")
    height, width = size
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR), dtype=np.float32)


def overlay_heatmap(view: np.ndarray, patch_map: np.ndarray, scale: tuple[float, float], *,
                    alpha: float = HEATMAP_ALPHA, colormap: str = HEATMAP_COLORMAP) -> np.ndarray:
    """(H', W', 3) uint8: the patch map (h, w) coloured on ``scale`` = (low, high) and blended over
    ``view`` (H, W, 3) uint8, the image as the backbone saw it (enlarged to :data:`MIN_SIDE` when smaller)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the heat map's alpha must be in [0, 1], got {alpha!r}")
    image = Image.fromarray(np.asarray(view, dtype=np.uint8))
    factor = max(1.0, MIN_SIDE / min(image.size))
    if factor > 1.0:
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.BILINEAR)
    low, high = scale
    heat = upsample_map(patch_map, (image.height, image.width))
    colours = matplotlib.colormaps[colormap](np.clip((heat - low) / (high - low), 0.0, 1.0))[..., :3]
    blended = (1.0 - alpha) * np.asarray(image, dtype=np.float64) + alpha * 255.0 * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def heatmap_name(index: int, path: str) -> str:
    """``NNNNN_<stem>.png``: a file name for image ``index`` of the run, safe on every file system."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(path)).stem)[:60].strip("._") or "image"
    return f"{index:05d}_{stem}.png"


def _png_uri(pixels: np.ndarray, side: int) -> str:
    image = Image.fromarray(pixels)
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:170px;border:2px solid #ccc;border-radius:6px;padding:4px;font-size:12px}
figure.anomaly{border-color:#c0392b}figure.normal{border-color:#27ae60}figure.error{border-color:#999;background:#f4f4f4}
figcaption code{word-break:break-all;font-size:11px}img{display:block;margin:auto}"""


def _figure(row, name: str, thumb: str) -> str:
    path = html.escape(str(row["path"]), quote=True)
    if row["error"]:
        return (f'<figure class="error"><figcaption><b>not scored</b>: {html.escape(str(row["error"]))}<br>'
                f"<code>{path}</code></figcaption></figure>")
    link = html.escape(name, quote=True)
    return (f'<figure class="{html.escape(str(row["decision"]))}"><a href="{link}"><img src="{thumb}" alt="{path}"></a>'
            f'<figcaption>score <b>{float(row["score"]):.6g}</b> · {html.escape(str(row["decision"]))}<br>'
            f"<code>{path}</code></figcaption></figure>")


def gallery_html(frame: pd.DataFrame, names: list[str], thumbs: list[str], scale: tuple[float, float], *,
                 alpha: float = HEATMAP_ALPHA, colormap: str = HEATMAP_COLORMAP) -> str:
    """The gallery page of a predictions table ``frame`` (``path, score, decision, error``; its
    ``attrs`` name the candidate and threshold), each row's PNG file name and thumbnail data URI
    ("" where not scored): scored images by descending score, then the others."""
    order = np.argsort(-frame["score"].to_numpy(dtype=float), kind="stable")  # NaN (not scored) sort last
    figures = "\n".join(_figure(frame.iloc[i], names[i], thumbs[i]) for i in order)
    candidate = html.escape(str(frame.attrs.get("candidate", "")))
    rule = html.escape(str(frame.attrs.get("threshold", "")))
    scored = int(frame["score"].notna().sum())
    anomalies = int((frame["decision"] == "anomaly").sum())
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>swsa predict: {candidate}</title>'
            f"<style>{_STYLE}</style></head><body>\n<h1>Anomaly heat maps: {candidate}</h1>\n"
            f"<p>{len(frame)} images, {scored} scored, {anomalies} flagged as anomalies (score &ge; threshold {rule} = "
            f"{float(frame.attrs.get('threshold_value', np.nan)):.6g}); sorted by score, highest first. Each map is "
            f"the squared distance of every patch to its nearest reference patch (its maximum is the score), "
            f"upsampled from the patch grid, coloured with {html.escape(colormap)} on one scale for all images "
            f"[{scale[0]:.6g}, {scale[1]:.6g}] and blended with alpha {alpha:g} over the image as the backbone saw "
            f'it. Click a thumbnail for the full-size PNG.</p>\n<div class="grid">\n{figures}\n</div>\n</body></html>\n')


def write_prediction_gallery(folder: str | os.PathLike, frame: pd.DataFrame, maps: np.ndarray,
                             view_of: Callable[[str], np.ndarray], *, alpha: float = HEATMAP_ALPHA,
                             colormap: str = HEATMAP_COLORMAP, progress: bool = False) -> tuple[Path, list[str]]:
    """Write a heat-map PNG per scored row of ``frame`` and ``index.html`` into ``folder``.

    ``maps`` (N, h, w): each row's patch map (NaN rows are not drawn); ``view_of(path)`` → (H, W, 3)
    uint8, the image as the backbone saw it. Returns the page's path and each row's PNG path ("" where none)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    scale = colour_scale(maps)
    names, thumbs, written = [""] * len(frame), [""] * len(frame), [""] * len(frame)
    rows = [i for i in range(len(frame)) if not frame["error"].iloc[i] and np.isfinite(maps[i]).all()]
    for i in tqdm(rows, desc="heat maps", unit="img", disable=not progress, dynamic_ncols=True):
        path = str(frame["path"].iloc[i])
        pixels = overlay_heatmap(view_of(path), maps[i], scale, alpha=alpha, colormap=colormap)
        names[i] = heatmap_name(i, path)
        Image.fromarray(pixels).save(out / names[i])
        written[i] = str(out / names[i])
        thumbs[i] = _png_uri(pixels, _THUMB)
    page = out / GALLERY_FILE
    staging = out / f".{GALLERY_FILE}.{os.getpid()}.tmp"
    staging.write_text(gallery_html(frame, names, thumbs, scale, alpha=alpha, colormap=colormap), encoding="utf-8")
    os.replace(staging, page)
    return page, written
