"""The HTML report's images: small thumbnails as data URIs (:func:`thumbnail`), the report's PNG
figures as data URIs (:func:`file_uri`), a cache of thumbnails by image id over the store's
image paths (:class:`ThumbnailCache`) and the thumbnails one task's payload carries
(:class:`TaskThumbs`). Images without a readable file have no thumbnail (None): the page shows
a placeholder instead."""

from __future__ import annotations

import base64
import io
import logging
import os
from pathlib import Path

from PIL import Image
from swsa_store.samples import to_rgb

from swsa_engine.run.report_inputs import StoreImages

__all__ = ["data_uri", "thumbnail", "file_uri", "ThumbnailCache", "TaskThumbs"]

log = logging.getLogger(__name__)


def data_uri(data: bytes, mime: str) -> str:
    """``data`` as a base64 ``data:`` URI of type ``mime``."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def thumbnail(path: str | os.PathLike | None, size: int = 64) -> str | None:
    """A small PNG or JPEG (whichever is smaller) data URI of the image at ``path``; None when
    there is no readable image file (missing, unreadable or not an image: logged at debug level)."""
    if not path:
        return None
    try:
        with Image.open(path) as image:
            image = to_rgb(image)  # 16-bit scaled, palette/CMYK converted
            image.thumbnail((size, size))
            best = None
            for fmt, mime, kwargs in (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 80})):
                buffer = io.BytesIO()
                image.save(buffer, fmt, **kwargs)
                if best is None or buffer.tell() < len(best[0]):
                    best = (buffer.getvalue(), mime)
        return data_uri(*best)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # shown as a placeholder
        log.debug("no thumbnail of %s: %s", path, error)
        return None


def file_uri(path: Path | None) -> str | None:
    """The PNG file at ``path`` as a data URI; None when there is no such file."""
    if path is None or not Path(path).is_file():
        return None
    return data_uri(Path(path).read_bytes(), "image/png")


class ThumbnailCache:
    """Thumbnails of ``thumb_size`` px of the store's images, by image id, each made once."""

    def __init__(self, images: StoreImages, thumb_size: int):
        self.images, self.thumb_size = images, thumb_size
        self._thumbs: dict[int, str | None] = {}

    def get(self, image_id: int) -> str | None:
        """The thumbnail data URI of ``image_id``; None when it has no readable file."""
        image_id = int(image_id)
        if image_id not in self._thumbs:
            path = self.images.image_path(image_id)
            self._thumbs[image_id] = thumbnail(path, self.thumb_size) if path is not None else None
        return self._thumbs[image_id]


class TaskThumbs:
    """The thumbnails one task's payload carries, keyed by image id (a string), in the order the
    payload first names them."""

    def __init__(self, cache: ThumbnailCache):
        self.cache = cache
        self.by_id: dict[str, str | None] = {}

    def use(self, image_id) -> int:
        """Carry ``image_id``'s thumbnail; returns the id as an int."""
        self.by_id[str(int(image_id))] = self.cache.get(image_id)
        return int(image_id)
