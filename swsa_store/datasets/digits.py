"""``digits``: scikit-learn's bundled handwritten digits, rendered to PNG files (see :class:`DigitsDataset`)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from swsa_store.datasets.registry import register_dataset
from swsa_store.samples import check_test_fraction, make_samples_table

__all__ = ["DigitsDataset"]

logger = logging.getLogger(__name__)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file and ``os.replace``.

    A process killed mid-write leaves at most a hidden ``.<name>.<pid>.tmp`` file (ignored by
    :class:`~swsa_store.datasets.folder.ImageFolderDataset`), never a half-written ``path``. No fsync: after a power
    loss a file may hold wrong bytes, but a re-render compares bytes and rewrites it.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC}


@register_dataset("digits")
class DigitsDataset:
    """scikit-learn's bundled handwritten digits (1,797 images, classes "0".."9"), as PNGs.

    Each 8x8 image (values 0..16) is scaled to 0..255 (``round(v * 255 / 16)``), upsampled to
    ``image_size`` x ``image_size`` and written as an RGB PNG (the grey value copied to all
    three channels) to ``image_dir/<class>/<index:04d>.png``, where ``index`` is the sample's
    index in ``load_digits()`` (also its ``source_index``).

    Upsampling defaults to **nearest neighbour** (``resample="nearest"``): it is exact (every
    pixel is one of the 17 original grey levels), identical across Pillow versions, and keeps
    the 8x8 grid visible. ``resample="bicubic"`` gives smoother strokes instead.

    PNG bytes are deterministic (fixed ``compress_level``, no metadata chunks), so the same
    Pillow/zlib build writes the same bytes every run. Rendering is idempotent: a file that
    already holds exactly the right bytes is left untouched; anything else is (re)written
    atomically (temporary file + ``os.replace``).

    The split is a deterministic stratified split:
    ``train_test_split(indices, test_size=test_fraction, stratify=target, random_state=seed)``.

    Rendering happens on the first :meth:`samples` call (or an explicit :meth:`render`).
    """

    name = "digits"
    class_names = tuple(str(d) for d in range(10))

    def __init__(
        self,
        image_dir: str | os.PathLike,
        image_size: int = 64,
        test_fraction: float = 0.5,
        seed: int = 0,
        resample: str = "nearest",
    ):
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        self.image_dir = Path(os.path.abspath(os.fspath(image_dir)))
        self.image_size = int(image_size)
        self.test_fraction = check_test_fraction(test_fraction)
        self.seed = int(seed)
        self.resample = resample
        #: Number of files written by the last :meth:`render` (0 when all were up to date).
        self.files_written = 0
        self._table: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return (
            f"DigitsDataset(image_dir={str(self.image_dir)!r}, image_size={self.image_size}, "
            f"test_fraction={self.test_fraction}, seed={self.seed}, resample={self.resample!r})"
        )

    def _png_bytes(self, image: np.ndarray) -> bytes:
        grey = np.rint(np.asarray(image, dtype=np.float64) * (255.0 / 16.0))
        grey = np.clip(grey, 0, 255).astype(np.uint8)
        img = Image.fromarray(grey)  # uint8 2-D -> mode "L"
        if self.image_size != img.width:
            img = img.resize((self.image_size, self.image_size), _RESAMPLE[self.resample])
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG", compress_level=6, optimize=False)
        return buf.getvalue()

    def render(self) -> pd.DataFrame:
        """Write the PNGs that are missing or differ, and return the samples table."""
        digits = load_digits()
        images, target = digits.images, digits.target
        indices = np.arange(len(target))
        _, test_idx = train_test_split(
            indices, test_size=self.test_fraction, stratify=target, random_state=self.seed
        )
        is_test = np.zeros(len(target), dtype=bool)
        is_test[test_idx] = True

        written = 0
        rows = []
        for cls in self.class_names:
            (self.image_dir / cls).mkdir(parents=True, exist_ok=True)
        for i in indices:
            cls = str(int(target[i]))
            rel = f"{cls}/{i:04d}.png"
            dest = self.image_dir / cls / f"{i:04d}.png"
            data = self._png_bytes(images[i])
            try:
                up_to_date = dest.is_file() and dest.read_bytes() == data
            except OSError:
                up_to_date = False
            if not up_to_date:
                _atomic_write(dest, data)
                written += 1
            rows.append(
                {
                    "path": str(dest),
                    "rel_path": rel,
                    "class_name": cls,
                    "split": "test" if is_test[i] else "train",
                    "dataset": self.name,
                    "source_index": int(i),
                    "status": "ok",
                    "skip_reason": "",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "width": self.image_size,
                    "height": self.image_size,
                }
            )
        self.files_written = written
        if written:
            logger.info("digits: wrote %d of %d PNGs to %s", written, len(rows), self.image_dir)
        self._table = make_samples_table(rows)
        return self._table.copy()

    def samples(self) -> pd.DataFrame:
        """The samples table (renders on first call; later calls return a cached copy)."""
        if self._table is None:
            return self.render()
        return self._table.copy()
