"""SQL of the ``local_features`` table (migration 0005): each image's keypoints per local feature
spec, written at ingest and read back by spatial verification."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from imgdb.db.models import LocalFeatures, SearchIndex
from imgdb.db.records import IndexRecord

#: One stored image's features: (scale, xy float32 (n, 2), codes uint8 (n, dim)).
Row = tuple[float, np.ndarray, np.ndarray]


def write(conn: Connection, spec: str, rows: Sequence[tuple[int, float, np.ndarray, np.ndarray]]) -> None:
    """Store ``(image_id, scale, xy, codes)`` rows; an image that has them already keeps its own
    (features depend on the image and the spec alone)."""
    if not rows:
        return
    statement = insert(LocalFeatures.__table__).on_conflict_do_nothing()
    conn.execute(statement, [{"image_id": image_id, "spec": spec, "scale": float(scale), "keypoints": len(xy),
                              "xy": np.ascontiguousarray(xy, np.float32).tobytes(),
                              "descriptors": np.ascontiguousarray(codes, np.uint8).tobytes()}
                             for image_id, scale, xy, codes in rows])


def read(conn: psycopg.Connection, spec: str, dim: int, ids: Sequence[int]) -> dict[int, Row]:
    """The stored features of ``ids`` (those that have them), on a search connection."""
    rows = conn.execute("SELECT image_id, scale, keypoints, xy, descriptors FROM local_features"
                        " WHERE spec = %s AND image_id = ANY(%s)", (spec, list(ids)), binary=True).fetchall()
    return {image_id: (scale, np.frombuffer(xy, np.float32).reshape(n, 2),
                       np.frombuffer(codes, np.uint8).reshape(n, dim))
            for image_id, scale, n, xy, codes in rows}


def without_features(conn: Connection, index: IndexRecord, spec: str) -> list[int]:
    """Images of the index that have no features for ``spec`` yet (to fill in)."""
    return list(conn.execute(sa.text(
        f'SELECT v.image_id FROM "{index.vectors_table}" v WHERE NOT EXISTS (SELECT 1 FROM local_features f'
        " WHERE f.image_id = v.image_id AND f.spec = :s) ORDER BY v.image_id"), {"s": spec}).scalars())


def footprint(conn: Connection, index: IndexRecord, spec: str) -> tuple[int, float]:
    """How many of the index's images have features for ``spec``, and their mean bytes per image."""
    count, mean = conn.execute(sa.text(
        f'SELECT count(*), avg(octet_length(f.xy) + octet_length(f.descriptors)) FROM "{index.vectors_table}" v'
        " JOIN local_features f ON f.image_id = v.image_id AND f.spec = :s"), {"s": spec}).one()
    return int(count), float(mean or 0.0)


def set_spec(conn: Connection, index: IndexRecord, spec: str | None) -> None:
    """Record the spec the index verifies with (None: it stops verifying; the features stay)."""
    table = SearchIndex.__table__
    conn.execute(sa.update(table).where(table.c.id == index.id).values(local=spec))
