"""All of imgdb's SQL: the index registry, per-index vector tables, bulk writes and vector search.

Everything else in imgdb talks to PostgreSQL through these functions. Per index ``NAME`` there are
three objects besides its ``indexes`` row:

* ``imgdb_vectors_NAME (image_id, embedding)``: the vectors, one fixed dimension per table, since a
  pgvector index needs one;
* ``imgdb_vectors_NAME_ann``: its HNSW or IVFFlat index (``vector_l2_ops``; vectors are unit length,
  so L2 ranks like cosine);
* ``images_NAME``: a view joining ``images`` to the vectors, the relation plain SQL queries.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from pgvector.psycopg import register_vector
from pgvector.sqlalchemy import Vector
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from imgdb.errors import ImgdbError, IndexExists, IndexNotFound
from imgdb.features.whitening import MAX_INDEXED_DIM
from imgdb.io.reader import ImageFacts
from imgdb.orm import Image, IndexState, SearchIndex

NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
ANN_METHODS = ("hnsw", "ivfflat", "none")
HNSW_DEFAULTS = {"m": 16, "ef_construction": 64, "ef_search": 40}
#: IVFFlat lists visited per query (pgvector's own default of 1 misses too much).
IVFFLAT_PROBES = 10

_images = Image.__table__


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ImgdbError(f"bad index name {name!r}: use lower-case letters, digits and _, starting with a letter")
    return name


# ---------------------------------------------------------------- registry

def get_index(conn: Connection, name: str) -> SearchIndex | None:
    row = conn.execute(sa.select(SearchIndex.__table__).where(SearchIndex.name == name)).mappings().first()
    return SearchIndex(**row) if row else None


def require_index(conn: Connection, name: str) -> SearchIndex:
    index = get_index(conn, name)
    if index is None:
        raise IndexNotFound(f"no index named {name!r} (create it with `imgdb index create {name} --extractor SPEC`)")
    return index


def list_indexes(conn: Connection) -> list[tuple[SearchIndex, int]]:
    """Every index with its number of vectors."""
    rows = conn.execute(sa.select(SearchIndex.__table__).order_by(SearchIndex.name)).mappings().all()
    return [(index, count_vectors(conn, index)) for index in (SearchIndex(**row) for row in rows)]


def create_index(conn: Connection, name: str, extractor: str, dim: int, ann: str = "hnsw",
                 ann_params: dict[str, Any] | None = None) -> SearchIndex:
    """Register an index and create its vector table, view and (empty) ANN index."""
    check_name(name)
    if ann not in ANN_METHODS:
        raise ImgdbError(f"unknown ANN method {ann!r}: use one of {', '.join(ANN_METHODS)}")
    if ann != "none" and dim > MAX_INDEXED_DIM:
        raise ImgdbError(f"{dim}-dimensional vectors are above pgvector's {MAX_INDEXED_DIM}-dimension index limit; use --ann none")
    params = dict(HNSW_DEFAULTS) if ann == "hnsw" else {}
    params.update(ann_params or {})
    # ON CONFLICT rather than a look-up first: two processes may create the same index at once.
    row = conn.execute(
        pg_insert(SearchIndex.__table__)
        .values(name=name, extractor=extractor, dim=dim, ann=ann, ann_params=params)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(*SearchIndex.__table__.c)
    ).mappings().first()
    if row is None:
        raise IndexExists(f"index {name!r} exists already")
    index = SearchIndex(**row)
    conn.exec_driver_sql(
        f'CREATE TABLE "{index.vectors_table}" ('
        f" image_id bigint PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,"
        f" embedding vector({dim}) NOT NULL)"
    )
    create_view(conn, index)
    ensure_ann(conn, index)
    return index


def create_view(conn: Connection, index: SearchIndex) -> None:
    """(Re)create the SQL-facing view; run again after a migration adds ``images`` columns."""
    columns = ", ".join(f"i.{c.name}" for c in _images.columns)
    conn.exec_driver_sql(
        f'CREATE OR REPLACE VIEW "{index.relation}" AS SELECT {columns}, v.embedding'
        f' FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id'
    )


def drop_index(conn: Connection, name: str) -> None:
    index = require_index(conn, name)
    conn.exec_driver_sql(f'DROP VIEW IF EXISTS "{index.relation}"')
    conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{index.vectors_table}"')
    conn.execute(sa.delete(SearchIndex.__table__).where(SearchIndex.id == index.id))


def save_state(conn: Connection, index: SearchIndex, arrays: dict[str, np.ndarray]) -> None:
    """Store an extractor's learned arrays (as ``.npy`` bytes) with the index."""
    table = IndexState.__table__
    conn.execute(sa.delete(table).where(table.c.index_id == index.id))
    for key, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array), allow_pickle=False)
        conn.execute(sa.insert(table).values(index_id=index.id, key=key, value=buffer.getvalue()))


def load_state(conn: Connection, index: SearchIndex) -> dict[str, np.ndarray]:
    table = IndexState.__table__
    rows = conn.execute(sa.select(table.c.key, table.c.value).where(table.c.index_id == index.id))
    return {key: np.load(io.BytesIO(value), allow_pickle=False) for key, value in rows}


# ---------------------------------------------------------------- ANN index

def ann_name(index: SearchIndex) -> str:
    return f"{index.vectors_table}_ann"


def has_ann(conn: Connection, index: SearchIndex) -> bool:
    return conn.execute(sa.select(sa.func.to_regclass(ann_name(index)))).scalar() is not None


def drop_ann(conn: Connection, index: SearchIndex) -> None:
    """Drop the ANN index before a bulk load: building it once afterwards is much faster than
    inserting every vector into the graph one by one."""
    conn.exec_driver_sql(f'DROP INDEX IF EXISTS "{ann_name(index)}"')


def ensure_ann(conn: Connection, index: SearchIndex) -> bool:
    """Create the index's HNSW/IVFFlat index if it is missing; returns whether it built one."""
    if index.ann == "none" or has_ann(conn, index):
        return False
    params = index.ann_params
    # Session-local settings for the build: room to build the graph in memory, and parallel workers.
    conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '1GB'")
    conn.exec_driver_sql("SET LOCAL max_parallel_maintenance_workers = 2")
    if index.ann == "hnsw":
        method = f"hnsw (embedding vector_l2_ops) WITH (m = {int(params['m'])}, ef_construction = {int(params['ef_construction'])})"
    else:
        rows = conn.exec_driver_sql(f'SELECT count(*) FROM "{index.vectors_table}"').scalar_one()
        lists = int(params.get("lists") or ivfflat_lists(rows))
        method = f"ivfflat (embedding vector_l2_ops) WITH (lists = {lists})"
    conn.exec_driver_sql(f'CREATE INDEX IF NOT EXISTS "{ann_name(index)}" ON "{index.vectors_table}" USING {method}')
    return True


def ivfflat_lists(rows: int) -> int:
    """pgvector's rule of thumb: rows/1000 lists up to 1M rows, sqrt(rows) above."""
    return max(1, rows // 1000 if rows <= 1_000_000 else int(rows ** 0.5))


# ---------------------------------------------------------------- writes

def hashes_in_index(conn: Connection, index: SearchIndex) -> set[str]:
    """Content hashes of every image that already has a vector in ``index`` (to skip re-ingest)."""
    return set(conn.exec_driver_sql(
        f'SELECT i.sha256 FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id'
    ).scalars())


def upsert_images(conn: Connection, rows: Sequence[tuple[str, ImageFacts, dict[str, Any]]]) -> list[int]:
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


def copy_vectors(conn: Connection, index: SearchIndex, ids: Sequence[int], vectors: np.ndarray) -> None:
    """Write vectors with binary COPY (the bulk of the bytes an ingest writes)."""
    raw = conn.connection.driver_connection
    register_vector(raw)
    with raw.cursor().copy(
        f'COPY "{index.vectors_table}" (image_id, embedding) FROM STDIN WITH (FORMAT BINARY)'
    ) as copy:
        copy.set_types(["int8", "vector"])
        for image_id, vector in zip(ids, vectors):
            copy.write_row((image_id, vector))


def index_uris(conn: Connection, index: SearchIndex) -> list[str]:
    """Where the images of an index came from, in id order (to re-encode them)."""
    return list(conn.exec_driver_sql(
        f'SELECT i.uri FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id ORDER BY i.id'
    ).scalars())


def clear_vectors(conn: Connection, index: SearchIndex) -> None:
    """Remove every vector of an index (the images stay), before re-encoding them."""
    conn.exec_driver_sql(f'TRUNCATE "{index.vectors_table}"')


def count_vectors(conn: Connection, index: SearchIndex) -> int:
    return int(conn.exec_driver_sql(f'SELECT count(*) FROM "{index.vectors_table}"').scalar_one())


def delete_images(conn: Connection, ids: Iterable[int]) -> int:
    """Delete images; their vectors in every index go with them (ON DELETE CASCADE)."""
    result = conn.execute(sa.delete(_images).where(_images.c.id.in_(list(ids))))
    return int(result.rowcount)


# ---------------------------------------------------------------- reads and search

def vectors_table(index: SearchIndex) -> sa.Table:
    """A Core ``Table`` for an index's vectors, for building queries."""
    return sa.Table(
        index.vectors_table, sa.MetaData(),
        sa.Column("image_id", sa.BigInteger, primary_key=True),
        sa.Column("embedding", Vector(index.dim)),
    )


def image_ids_by_hash(conn: Connection, hashes: Sequence[str]) -> dict[str, int]:
    rows = conn.execute(sa.select(_images.c.sha256, _images.c.id).where(_images.c.sha256.in_(list(hashes))))
    return {sha: image_id for sha, image_id in rows}


def ids_with_vectors(conn: Connection, index: SearchIndex, ids: Sequence[int]) -> set[int]:
    table = vectors_table(index)
    return set(conn.execute(sa.select(table.c.image_id).where(table.c.image_id.in_(list(ids)))).scalars())


def stored_vectors(conn: Connection, index: SearchIndex, ids: Sequence[int]) -> dict[int, np.ndarray]:
    table = vectors_table(index)
    rows = conn.execute(sa.select(table.c.image_id, table.c.embedding).where(table.c.image_id.in_(list(ids))))
    return {image_id: np.asarray(vector, dtype=np.float32) for image_id, vector in rows}


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    uri: str
    distance: float
    metadata: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "uri": self.uri, "distance": self.distance, "metadata": self.metadata}


def search(conn: Connection, index: SearchIndex, vector: np.ndarray, k: int,
           filters: Sequence[ColumnElement[bool]] = ()) -> list[Hit]:
    """The ``k`` images nearest ``vector`` in ``index`` that pass ``filters``, nearest first.

    Served by the ANN index. With filters, pgvector 0.8's iterative index scan keeps walking the
    graph until k rows pass them; if a very selective filter still leaves fewer than k (the scan has a
    tuple budget), the query is answered exactly instead, so a filter never costs results.
    """
    table = vectors_table(index)
    distance = table.c.embedding.l2_distance(vector)
    ef_search = max(int(index.ann_params.get("ef_search", HNSW_DEFAULTS["ef_search"])), k)
    conn.exec_driver_sql(f"SET LOCAL hnsw.ef_search = {min(ef_search, 1000)}")
    conn.exec_driver_sql(f"SET LOCAL ivfflat.probes = {int(index.ann_params.get('probes', IVFFLAT_PROBES))}")
    if filters:
        conn.exec_driver_sql("SET LOCAL hnsw.iterative_scan = strict_order")
        conn.exec_driver_sql("SET LOCAL ivfflat.iterative_scan = relaxed_order")
    hits = _nearest(conn, table, distance, k, filters)
    if filters and len(hits) < k:
        # `+ 0` hides the distance from the planner's index matching: an exact scan of what passes.
        hits = _nearest(conn, table, distance + 0, k, filters)
    return hits


def _nearest(conn: Connection, table: sa.Table, distance: ColumnElement[float], k: int,
             filters: Sequence[ColumnElement[bool]]) -> list[Hit]:
    query = (
        sa.select(_images.c.id, _images.c.uri, _images.c.metadata, distance.label("distance"))
        .join(table, table.c.image_id == _images.c.id)
        .where(*filters)
        .order_by(distance)
        .limit(k)
    )
    rows = conn.execute(query).all()
    # relaxed_order (IVFFlat) may return rows slightly out of order; the caller gets them sorted.
    return sorted((Hit(r.id, r.uri, float(r.distance), r.metadata) for r in rows), key=lambda h: h.distance)

