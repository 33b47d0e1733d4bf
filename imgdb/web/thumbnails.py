"""Thumbnails for result grids: made once per image content, cached under ``$IMGDB_HOME/thumbnails``.

Keyed by the content hash, so re-ingesting the same picture from another path reuses its thumbnail,
and written to a temporary file then renamed, so concurrent requests never serve a half-written one.
The original is decoded through the same guarded reader as ingest (pixel limit, EXIF orientation).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from imgdb.config import Settings
from imgdb.io.reader import decode, read_file

#: Longest side of a thumbnail, in pixels.
SIDE = 256


def original_path(uri: str) -> Path | None:
    """The local file an image was ingested from, if it is still a readable file (URLs have none)."""
    if "://" in uri:
        return None
    path = Path(uri)
    return path if path.is_file() and os.access(path, os.R_OK) else None


def thumbnail(settings: Settings, sha256: str, uri: str,
              stored: Callable[[], bytes | None] = lambda: None) -> Path | None:
    """The cached JPEG thumbnail of an image, made now if needed from its file, or else from
    ``stored()`` (the image as an attached table holds it); None when neither has it."""
    target = settings.home / "thumbnails" / sha256[:2] / f"{sha256}.jpg"
    if target.is_file():
        return target
    source = original_path(uri)
    data = read_file(source) if source is not None else stored()
    if data is None:
        return None
    image = decode(data, max_pixels=settings.max_pixels, scale_hint=lambda w, h: SIDE / max(w, h))
    small = image.pixels.copy()
    small.thumbnail((SIDE, SIDE))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as tmp:
        small.save(tmp, format="JPEG", quality=85)
    os.replace(tmp.name, target)
    return target
