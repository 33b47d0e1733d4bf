"""SQL of the ``images`` table: one row per distinct image (by content hash), its facts and the
user's metadata, shared by every index that holds the image."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.engine import Connection

from imgdb.db.models import Image
from imgdb.db.records import MAX_ID, IndexRecord
from imgdb.io.reader import ImageFacts

_images = Image.__table__


@dataclass(frozen=True)
class StoredImage:
    """An image of an index as a job reads it again (re-encoding, local features, training)."""

    image_id: int
    uri: str
    sha256: str
    #: Whether a direct ingest put it in the index (else only attached tables' rows hold it).
    direct: bool


def upsert(conn: Connection, rows: Sequence[tuple[str, ImageFacts, dict[str, Any]]]) -> list[int]:
    """Insert images (uri, facts, user metadata) unless their content is known; return their ids in order.

    For images already present, user metadata given now is merged into what is stored.
    """
    if not rows:
        return []
    raw = conn.connection.driver_connection
    columns = (
        [uri for uri, _, _ in rows], [f.sha256 for _, f, _ in rows], [f.width for _, f, _ in rows],
        [f.height for _, f, _ in rows], [f.format for _, f, _ in rows], [f.file_size for _, f, _ in rows],
        [f.taken_at for _, f, _ in rows], [f.camera for _, f, _ in rows], [Jsonb(m) for _, _, m in rows],
    )
    ids = raw.execute(
        """
        INSERT INTO images (uri, sha256, width, height, format, file_size, taken_at, camera, metadata)
        SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::text[], %s::bigint[],
                             %s::timestamp[], %s::text[], %s::jsonb[])
        ON CONFLICT (sha256) DO UPDATE SET metadata = images.metadata || EXCLUDED.metadata
        RETURNING id, sha256
        """,
        columns,
    ).fetchall()
    by_hash = {sha: image_id for image_id, sha in ids}
    return [by_hash[f.sha256] for _, f, _ in rows]


def merge_metadata(conn: Connection, labels: dict[str, dict[str, Any]]) -> None:
    """Merge user metadata into images already stored, by content hash."""
    raw = conn.connection.driver_connection
    raw.cursor().executemany(
        "UPDATE images SET metadata = metadata || %s WHERE sha256 = %s",
        [(Jsonb(meta), sha) for sha, meta in labels.items()],
    )


def get(conn: Connection, image_id: int) -> dict[str, Any] | None:
    """One ``images`` row as a dict (None if there is no such image)."""
    if not 0 < image_id <= MAX_ID:
        return None
    row = conn.execute(sa.select(_images).where(_images.c.id == image_id)).mappings().first()
    return dict(row) if row else None


def ids_by_hash(conn: Connection, hashes: Sequence[str]) -> dict[str, int]:
    rows = conn.execute(sa.select(_images.c.sha256, _images.c.id).where(_images.c.sha256.in_(list(hashes))))
    return {sha: image_id for sha, image_id in rows}


def metadata(conn: Connection, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The user metadata of images, by id."""
    rows = conn.execute(sa.select(_images.c.id, _images.c.metadata).where(_images.c.id.in_(list(ids))))
    return {image_id: meta or {} for image_id, meta in rows}


def delete(conn: Connection, ids: Iterable[int]) -> int:
    """Delete images; their vectors in every index go with them (ON DELETE CASCADE)."""
    ids = [i for i in ids if 0 < i <= MAX_ID]  # others name no image
    return int(conn.execute(sa.delete(_images).where(_images.c.id.in_(ids))).rowcount)


def hashes_in_index(conn: Connection, index: IndexRecord) -> set[str]:
    """Content hashes of every image that already has a vector in ``index`` (to skip re-ingest)."""
    return set(conn.exec_driver_sql(
        f'SELECT i.sha256 FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id'
    ).scalars())


def in_index(conn: Connection, index: IndexRecord, sha256: str) -> bool:
    """Whether ``index`` holds a vector of the image with this content hash."""
    return bool(conn.exec_driver_sql(
        f'SELECT EXISTS (SELECT 1 FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id'
        " WHERE i.sha256 = %s)", (sha256,)).scalar())


def of_index(conn: Connection, index: IndexRecord) -> list[StoredImage]:
    """Every image of an index, in id order."""
    rows = conn.exec_driver_sql(f'SELECT i.id, i.uri, i.sha256, v.direct FROM images i JOIN "{index.vectors_table}" v'
                                " ON v.image_id = i.id ORDER BY i.id").all()
    return [StoredImage(*row) for row in rows]


def rows_of_index(conn: Connection, index: IndexRecord) -> list[dict[str, Any]]:
    """Every image of an index, whole (facts, metadata, and whether a direct ingest put it there),
    in id order (as :func:`imgdb.db.vectors.read` reads their vectors)."""
    rows = conn.execute(sa.text(
        f'SELECT i.*, v.direct FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id ORDER BY i.id'))
    return [dict(row) for row in rows.mappings()]
