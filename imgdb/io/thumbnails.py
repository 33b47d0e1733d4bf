"""Thumbnails for result grids, only ever of the image that was ingested (:func:`imgdb.io.sources.original`).

Thumbnails are made once per image content, cached under ``$IMGDB_HOME/thumbnails``: keyed by the
content hash, so re-ingesting the same picture from another path reuses its thumbnail, and written
to a temporary file then renamed, so concurrent requests never serve a half-written one. The
original is decoded through the same guarded reader as ingest (pixel limit, EXIF orientation).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from imgdb.config import Settings
from imgdb.io.reader import decode
from imgdb.io.sources import original

#: Longest side of a thumbnail, in pixels.
SIDE = 256


def thumbnail(settings: Settings, sha256: str, uri: str,
              stored: Callable[[], bytes | None] = lambda: None) -> Path:
    """The cached JPEG thumbnail of an image, made now if needed from :func:`original`."""
    target = settings.home / "thumbnails" / sha256[:2] / f"{sha256}.jpg"
    if target.is_file():
        return target
    data = original(uri, sha256, stored)
    image = decode(data, limits=settings.decoding, scale_hint=lambda w, h: SIDE / max(w, h))
    small = image.pixels.copy()
    small.thumbnail((SIDE, SIDE))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as tmp:
        small.save(tmp, format="JPEG", quality=85)
    os.replace(tmp.name, target)
    return target
