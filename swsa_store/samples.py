"""The samples-table contract shared by every dataset loader: its columns, how one image file
becomes a row, and the checks on a finished table.

* :data:`SAMPLE_COLUMNS` — the columns every loader's samples table starts with (see
  :mod:`swsa_store.datasets` for their meaning);
* :func:`read_image` — the one place that turns a file into an RGB :class:`PIL.Image.Image`
  (raises :class:`ImageReadError`, a ``ValueError``, with a one-line message);
  :func:`inspect_image_file` — the same read as a row's ``(status, skip_reason, sha256, width,
  height)``, never raising;
* :func:`require_usable_classes` — "every image of a class was skipped" is one clear error: such
  a class would be catalogued as a class of skipped rows and silently give no task (or a
  skipped one), which hides the cause (typically a dataset assembled from symlinks that lead out
  of the root, or a folder of files that are not images).

This module imports no loader, so the loaders' modules (:mod:`swsa_store.datasets`,
:mod:`swsa_store.datasets.base`, ...) can all import it without an import cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from PIL import Image, ImageFile

__all__ = [
    "SAMPLE_COLUMNS",
    "ImageReadError",
    "SOURCE_NAME",
    "check_source_name",
    "check_test_fraction",
    "decode_rgb",
    "frame_count",
    "inspect_image_file",
    "make_samples_table",
    "path_inside",
    "read_image",
    "reason_kind",
    "require_usable_classes",
    "short_error",
    "to_rgb",
]

log = logging.getLogger(__name__)

#: Column name -> dtype of the samples table, in column order.
SAMPLE_COLUMNS: dict[str, str] = {
    "path": "str",
    "rel_path": "str",
    "class_name": "str",
    "split": "str",
    "dataset": "str",
    "source_index": "int64",
    "status": "str",
    "skip_reason": "str",
    "sha256": "str",
    "width": "int64",
    "height": "int64",
}


class ImageReadError(ValueError):
    """An image file that cannot be read or fully decoded."""


def short_error(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """A one-line, short description of ``exc`` (without repeating the file path)."""
    msg = str(exc)
    if path is not None:
        for p in {str(path), os.fspath(path)}:
            msg = msg.replace(repr(p), "").replace(p, "")
    msg = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", msg)  # "<_io.BytesIO object at 0x..>"
    msg = " ".join(msg.split()).strip(" :")
    if len(msg) > 200:
        msg = msg[:197] + "..."
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


#: Modes whose samples span 0..65535 (16-bit PNG/TIFF greyscale; Pillow opens some as "I").
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` (an opened image, at its first frame) as a fully decoded 8-bit RGB image.

    16-bit greyscale (modes ``I;16*``, and ``I`` holding 0..65535) is scaled by 1/257 and rounded
    (65535 -> 255; a plain ``convert`` would clip everything above 255 to white); palette (with or
    without transparency), ``LA``/``RGBA`` (alpha dropped), ``CMYK``, ``YCbCr``, ``1`` and ``L``
    go through Pillow's conversion. Float images (mode ``F``: range unknown) raise ``ValueError``.
    """
    if im.mode in _WIDE_MODES:
        wide = np.asarray(im, dtype=np.int64)
        grey = np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode == "F":
        raise ValueError("32-bit float image (mode F): its value range is unknown; save it as 8- or 16-bit")
    if im.mode == "P" and "transparency" in im.info:
        return im.convert("RGBA").convert("RGB")  # no Pillow warning; alpha dropped as for RGBA
    return im.convert("RGB")


def frame_count(data: bytes) -> int:
    """How many frames the image file ``data`` holds (1 for a still image; raises like :func:`decode_rgb`)."""
    with Image.open(io.BytesIO(data)) as im:
        return int(getattr(im, "n_frames", 1))


#: Decodes under way (threads of the ingest runner decode at once) and the flag they found, guarded by a lock:
#: Pillow reads ``LOAD_TRUNCATED_IMAGES`` as a module global, so it is set off by the first and restored by the last.
_TRUNCATED_GUARD = threading.Lock()
_truncated_state = {"decoding": 0, "previous": False}


@contextlib.contextmanager
def _truncated_images_refused():
    with _TRUNCATED_GUARD:
        if _truncated_state["decoding"] == 0:
            _truncated_state["previous"] = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _truncated_state["decoding"] += 1
    try:
        yield
    finally:
        with _TRUNCATED_GUARD:
            _truncated_state["decoding"] -= 1
            if _truncated_state["decoding"] == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _truncated_state["previous"]


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode ``data`` into an RGB image (:func:`to_rgb`; an animated file: its first frame);
    truncated files raise (never padded), also while other threads decode."""
    with _truncated_images_refused(), Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        return to_rgb(im)  # forces a full decode


def read_image(path: str | os.PathLike) -> Image.Image:
    """Read ``path`` as a fully decoded RGB image.

    Raises :class:`ImageReadError` ("cannot decode image <path>: <reason>") for a missing or
    unreadable file, an unknown format, or a corrupt/truncated image. Truncated images are
    never silently padded (``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced off while decoding).
    EXIF orientation is not applied (pixels as stored, like torchvision's loader).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or short_error(exc, path)
        raise ImageReadError(f"cannot decode image {path}: {reason}") from None
    try:
        return decode_rgb(data)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise ImageReadError(f"cannot decode image {path}: {short_error(exc, path)}") from None


def inspect_image_file(path: str | os.PathLike) -> tuple[str, str, str, int, int]:
    """``(status, skip_reason, sha256, width, height)`` for one image file: ``("ok", "", hex, w, h)``,
    or ``("skipped", "cannot read file: ..." / "cannot decode image: ...", hex or "", 0, 0)``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return "skipped", f"cannot read file: {exc.strerror or short_error(exc, path)}", "", 0, 0
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = decode_rgb(data)
    except Exception as exc:
        return "skipped", f"cannot decode image: {short_error(exc, path)}", digest, 0, 0
    try:
        frames = frame_count(data)
    except Exception as exc:  # later frames unreadable (a cut multi-frame TIFF); the first decoded fully
        log.warning("%s: its later frames cannot be read (%s): its first frame is used", path, short_error(exc, path))
        frames = 1
    if frames > 1:
        log.warning("%s is animated (%d frames): its first frame is used", path, frames)
    return "ok", "", digest, img.width, img.height


def make_samples_table(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Build the samples table from row dicts: columns :data:`SAMPLE_COLUMNS` with their dtypes,
    sorted by ``(class_name, split, rel_path)``, index ``0..n-1``."""
    rows = sorted(rows, key=lambda r: (r["class_name"], r["split"], r["rel_path"]))
    df = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))
    return df.astype(SAMPLE_COLUMNS).reset_index(drop=True)


#: What a validation source's name may hold: it names a folder under ``<store>.files/synth/``.
SOURCE_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


def check_source_name(source) -> str:
    """``source`` when it is a usable validation-source name (``[A-Za-z0-9_.@-]+``, not "." or
    ".."), else a one-line :class:`ValueError` — a name with a path separator or ".." would make
    synthesis write outside the store's files folder."""
    if not isinstance(source, str) or not SOURCE_NAME.fullmatch(source) or source in (".", ".."):
        raise ValueError(f"source name {source!r} is not allowed: use letters, digits and _ . @ - only "
                         "(no path separators, not '.' or '..'), e.g. cutpaste-scar")
    return source


def path_inside(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """``path`` resolved, when it lies inside ``folder`` (resolved); else a one-line :class:`ValueError`."""
    resolved, base = Path(path).resolve(), Path(folder).resolve()
    if not resolved.is_relative_to(base):
        raise ValueError(f"refusing to write {resolved}: it is outside the store's files folder {base}")
    return resolved


def check_test_fraction(test_fraction: float) -> float:
    """``test_fraction`` as a float strictly between 0 and 1, else a one-line :class:`ValueError`."""
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    return test_fraction


# --------------------------------------------------------------------------- checks on a table

#: How many failing classes and reason kinds one error message names.
_SHOWN = 3

#: Extra advice per reason kind (the text before the first ":" of a skip reason).
_HINTS = {
    "symlink escapes dataset root": (
        "files (or class folders) that are symlinks leading outside the root are not read; point root at "
        "the folder that really holds the images, or copy them in"
    ),
    "path escapes dataset root": "the index file lists paths outside the root; fix the index or the root",
}


def reason_kind(reason: str) -> str:
    """The kind of a skip reason: its text before the first ":" (e.g. ``"cannot decode image"``)."""
    return reason.split(":", 1)[0].strip() or reason


def require_usable_classes(table: pd.DataFrame, dataset: str, root: str | os.PathLike) -> None:
    """Raise a one-line :class:`ValueError` when some class of ``table`` has rows but none "ok".

    ``table``: a samples table (columns ``class_name, rel_path, status, skip_reason``). The message
    names the failing classes (the first few), how many rows they hold, and their reasons grouped
    by kind (most frequent first) with one example each, then how to fix it.
    """
    if not len(table):
        return
    usable = table["status"].eq("ok").groupby(table["class_name"]).any()
    failing = [str(c) for c in usable.index[~usable.to_numpy()]]
    if not failing:
        return
    bad = table[table["class_name"].isin(failing)]
    kinds: dict[str, list] = {}
    for rel, reason in zip(bad["rel_path"], bad["skip_reason"]):
        kinds.setdefault(reason_kind(str(reason)), []).append((str(rel), str(reason)))
    grouped = "; ".join(f"{kind} ({len(rows)}x, e.g. {rows[0][0]}: {rows[0][1]})"
                        for kind, rows in sorted(kinds.items(), key=lambda kv: -len(kv[1]))[:_SHOWN])
    hints = [_HINTS[k] for k in kinds if k in _HINTS] or ["fix or remove those files, or leave the class out"]
    classes = ", ".join(repr(c) for c in failing[:_SHOWN]) + (f" and {len(failing) - _SHOWN} more" if len(failing) > _SHOWN else "")
    noun = "class" if len(failing) == 1 else "classes"
    raise ValueError(
        f"dataset {dataset!r} under {root}: every image of {noun} {classes} was skipped "
        f"({len(bad)} rows): {grouped}; {'; '.join(hints)}"
    )
