"""SQL of the ``images`` table: one row per distinct image (by content hash), its facts and the
user's metadata, shared by every index that holds the image."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.engine import Connection

from imgdb.db import cluster
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
    """Insert images (uri, facts, user metadata), of distinct content, unless their content is
    known; return their ids in order.

    For images already present, user metadata given now is merged into what is stored.
    """
    if not rows:
        return []
    if cluster.distributed(conn):
        return _upsert_distributed(conn, rows)
    raw = conn.connection.driver_connection
    ids = raw.execute(
        """
        INSERT INTO images (uri, sha256, width, height, format, file_size, taken_at, camera, metadata)
        SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::text[], %s::bigint[],
                             %s::timestamp[], %s::text[], %s::jsonb[])
        ON CONFLICT (sha256) DO UPDATE SET metadata = images.metadata || EXCLUDED.metadata
        RETURNING id, sha256
        """,
        _columns(rows),
    ).fetchall()
    by_hash = {sha: image_id for image_id, sha in ids}
    return [by_hash[f.sha256] for _, f, _ in rows]


def _columns(rows: Sequence[tuple[str, ImageFacts, dict[str, Any]]]) -> tuple[list[Any], ...]:
    """``images``'s columns (uri first) of ``rows``, one array each, for ``unnest``."""
    return ([uri for uri, _, _ in rows], [f.sha256 for _, f, _ in rows], [f.width for _, f, _ in rows],
            [f.height for _, f, _ in rows], [f.format for _, f, _ in rows], [f.file_size for _, f, _ in rows],
            [f.taken_at for _, f, _ in rows], [f.camera for _, f, _ in rows], [Jsonb(m) for _, _, m in rows])


def _upsert_distributed(conn: Connection, rows: Sequence[tuple[str, ImageFacts, dict[str, Any]]]) -> list[int]:
    """:func:`upsert` where ``images`` is sharded by id and cannot keep its content hash unique:
    each hash is claimed in ``image_hashes`` (sharded by hash) with an id drawn from ``images``'s
    own sequence, the images this transaction claimed are inserted, and the metadata of those that
    were known is merged. A concurrent claim of the same hash waits for this one and takes its id."""
    raw = conn.connection.driver_connection
    hashes = [f.sha256 for _, f, _ in rows]
    drawn = [row[0] for row in raw.execute(
        "SELECT nextval(pg_get_serial_sequence('images', 'id')) FROM generate_series(1, %s)", (len(rows),))]
    claimed = dict(raw.execute(
        f"INSERT INTO {cluster.HASHES} (sha256, image_id) SELECT * FROM unnest(%s::text[], %s::bigint[])"
        " ON CONFLICT DO NOTHING RETURNING sha256, image_id", (hashes, drawn)).fetchall())
    new = [i for i, sha in enumerate(hashes) if sha in claimed]
    if new:
        columns = _columns([rows[i] for i in new])
        raw.execute(
            """
            INSERT INTO images (id, uri, sha256, width, height, format, file_size, taken_at, camera, metadata)
            SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::int[], %s::int[], %s::text[],
                                 %s::bigint[], %s::timestamp[], %s::text[], %s::jsonb[])
            """,
            ([claimed[hashes[i]] for i in new], *columns))
    known = dict(raw.execute(f"SELECT sha256, image_id FROM {cluster.HASHES} WHERE sha256 = ANY(%s)",
                             ([sha for sha in hashes if sha not in claimed],)).fetchall())
    merged = [(known[f.sha256], Jsonb(meta)) for _, f, meta in rows if f.sha256 in known and meta]
    if merged:
        raw.execute("UPDATE images SET metadata = images.metadata || m.meta"
                    " FROM unnest(%s::bigint[], %s::jsonb[]) AS m(id, meta) WHERE images.id = m.id",
                    ([i for i, _ in merged], [m for _, m in merged]))
    return [claimed.get(sha) or known[sha] for sha in hashes]


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
    """Delete images; their vectors in every index, their local features and the rows of attached
    tables that held them go with them (by ON DELETE CASCADE, and on a distributed database, where
    the reference tables keep no key into the shards, by deletes here)."""
    ids = [i for i in ids if 0 < i <= MAX_ID]  # others name no image
    gone = conn.execute(sa.delete(_images).where(_images.c.id.in_(ids)).returning(_images.c.id)).scalars().all()
    forget(conn, gone)
    return len(gone)


def forget(conn: Connection, ids: Sequence[int]) -> None:
    """After images ``ids`` were deleted: on a distributed database, what Citus cannot delete by
    cascade (their content hashes, the attached rows that held them) and the count of every
    index's writes, which no trigger keeps there (on one node, foreign keys and triggers did it all)."""
    if ids and cluster.distributed(conn):
        raw = conn.connection.driver_connection
        raw.execute(f"DELETE FROM {cluster.HASHES} WHERE image_id = ANY(%s)", (list(ids),))
        raw.execute("DELETE FROM refs WHERE image_id = ANY(%s)", (list(ids),))
        cluster.touch(conn)


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


def of_index(conn: Connection, index: IndexRecord, ids: Sequence[int] | None = None) -> list[StoredImage]:
    """Every image of an index (those of ``ids``, where given), in id order."""
    rows = conn.execute(sa.text(
        f'SELECT i.id, i.uri, i.sha256, v.direct FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id'
        " WHERE CAST(:ids AS bigint[]) IS NULL OR i.id = ANY(CAST(:ids AS bigint[])) ORDER BY i.id"),
        {"ids": None if ids is None else list(ids)}).all()
    return [StoredImage(*row) for row in rows]


def rows_of_index(conn: Connection, index: IndexRecord) -> list[dict[str, Any]]:
    """Every image of an index, whole (facts, metadata, and whether a direct ingest put it there),
    in id order (as :func:`imgdb.db.vectors.read` reads their vectors)."""
    rows = conn.execute(sa.text(
        f'SELECT i.*, v.direct FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id ORDER BY i.id'))
    return [dict(row) for row in rows.mappings()]
