"""Stored images served back: an image's record, its original bytes (only while they are still the
image that was ingested), its thumbnail, and images added from bytes (an upload), kept under
``IMGDB_HOME/uploads`` so that they can be served later."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgdb.catalog import Catalog
from imgdb.db import attached, images
from imgdb.errors import ImageNotFound, ImgdbError
from imgdb.io import sources, thumbnails
from imgdb.io.reader import identify, sha256_hex
from imgdb.jobs.ingest import ingest



#: The content type of each format imgdb reads.
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff",
               "BMP": "image/bmp", "GIF": "image/gif"}


@dataclass(frozen=True)
class Original:
    """An image's bytes as ingested, and the media type of the format imgdb reads in them."""

    data: bytes
    media_type: str


def record(catalog: Catalog, image_id: int) -> dict[str, Any]:
    """The image's row of ``images`` (uri, content hash, facts, user metadata)."""
    with catalog.database.connect() as conn:
        row = images.get(conn, image_id)
    if row is None:
        raise ImageNotFound(f"no image {image_id}")
    return row


def original(catalog: Catalog, image_id: int) -> Original:
    """The image's bytes: its file while it still hashes to what was ingested, or for an image of an
    attached table's ``bytea`` column, the table's bytes under the same check; ImageReadError says
    why there are none."""
    row = record(catalog, image_id)
    data = sources.original(row["uri"], row["sha256"], lambda: _table_bytes(catalog, image_id))
    # (From the bytes, never the stored format: an imported record's format is the archive's word.)
    return Original(data, MEDIA_TYPES[identify(data)])


def thumbnail(catalog: Catalog, image_id: int) -> Path:
    """The image's cached JPEG thumbnail (:mod:`imgdb.io.thumbnails`)."""
    row = record(catalog, image_id)
    return thumbnails.thumbnail(catalog.settings, row["sha256"], row["uri"], lambda: _table_bytes(catalog, image_id))


def _table_bytes(catalog: Catalog, image_id: int) -> bytes | None:
    with catalog.database.connect() as conn:
        return attached.image_bytes(conn, image_id, catalog.settings.fetch.max_bytes)


def add(catalog: Catalog, data: bytes, meta: dict[str, Any], index: str) -> dict[str, Any]:
    """Keep an image's bytes under ``IMGDB_HOME/uploads`` (named by content, so that originals and
    thumbnails can be served later) and ingest it from there into ``index``; its id, whether it was
    new to the index, and where it is kept. An image ingest refuses leaves no file behind."""
    sha = sha256_hex(data)
    path = catalog.settings.home / "uploads" / sha[:2] / f"{sha}.{identify(data).lower()}"
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name of its own: concurrent uploads of the same image each write theirs, and
        # the renames (the same bytes) replace one another atomically.
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{sha}.", suffix=".part", delete=False) as part:
            part.write(data)
        os.replace(part.name, path)
    report = ingest(catalog, [path], index=index, meta=meta)
    with catalog.database.connect() as conn:
        image_id = images.ids_by_hash(conn, [sha]).get(sha)
    if report.failed:
        if created and image_id is None:
            path.unlink(missing_ok=True)  # nothing refers to it: no orphan left under uploads/
        raise ImgdbError(report.failed[0].error)
    assert image_id is not None  # (ingested: its row exists)
    return {"id": image_id, "added": report.added == 1, "uri": str(path)}
