"""Originals and thumbnails for result grids, only ever of the image that was ingested.

A file at an image's ingested path is served (or made into a thumbnail) only while its bytes still
hash to the stored sha256: a file replaced since, by another picture or by a symlink to
``/etc/shadow``, is refused with that reason. Images of an attached table's ``bytea`` column come
from the table, under the same check.

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
from imgdb.errors import ImageReadError, ImgdbError
from imgdb.io.reader import decode, read_file, sha256_hex

#: Longest side of a thumbnail, in pixels.
SIDE = 256


def original_path(uri: str) -> Path | None:
    """The local file an image was ingested from, if it is still a readable file (URLs have none)."""
    if "://" in uri:
        return None
    path = Path(uri)
    return path if path.is_file() and os.access(path, os.R_OK) else None


def original(uri: str, sha256: str, stored: Callable[[], bytes | None] = lambda: None) -> bytes:
    """The bytes of the image that was ingested: from its file while the file still hashes to
    ``sha256``, else from ``stored()`` (an attached table's bytea) under the same check; otherwise
    :class:`ImageReadError` says why there is none."""
    path = original_path(uri)
    reason = "its original is not available"
    if path is not None:
        try:
            data = read_file(path)
        except ImgdbError as exc:
            data, reason = None, f"its original cannot be read ({exc})"
        if data is not None:
            if sha256_hex(data) == sha256:
                return data
            reason = "the file at its ingested path has changed since it was ingested"
    data = stored()
    if data is not None and sha256_hex(data) == sha256:
        return data
    raise ImageReadError(reason)


def thumbnail(settings: Settings, sha256: str, uri: str,
              stored: Callable[[], bytes | None] = lambda: None) -> Path:
    """The cached JPEG thumbnail of an image, made now if needed from :func:`original`."""
    target = settings.home / "thumbnails" / sha256[:2] / f"{sha256}.jpg"
    if target.is_file():
        return target
    data = original(uri, sha256, stored)
    image = decode(data, max_pixels=settings.max_pixels, scale_hint=lambda w, h: SIDE / max(w, h))
    small = image.pixels.copy()
    small.thumbnail((SIDE, SIDE))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as tmp:
        small.save(tmp, format="JPEG", quality=85)
    os.replace(tmp.name, target)
    return target
