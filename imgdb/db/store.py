"""imgdb's SQL for the index registry, per-index vector tables, bulk writes and reads.

Everything else in imgdb talks to PostgreSQL through these functions, on connections whose search
path starts with imgdb's schema (:mod:`imgdb.db.schema`), so names here are unqualified. Per index
(with id ``N`` and name ``NAME``) there are three objects besides its ``indexes`` row:

* ``vectors_N (image_id, embedding, ann_code, direct)``: the vectors (``vector`` or ``halfvec``, one
  fixed dimension per table, since a pgvector index needs one), for the Python-side first stages
  each vector's PQ/LSH code, and whether a direct ingest put the image there (``direct`` false:
  only rows of attached tables hold it); a statement trigger bumps ``indexes.version`` on every write;
* ``vectors_N_ann``: its HNSW or IVFFlat index (L2 ops; extractors' vectors are unit length, so L2
  ranks like cosine), or for binary quantization an HNSW index on the vectors' sign bits;
* ``images_NAME``: the view plain SQL queries (:func:`imgdb.db.derived.create_view`).

The search statements live in :mod:`imgdb.db.search`, attached tables in :mod:`imgdb.db.attached`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from pgvector import HalfVector
from pgvector.psycopg import register_vector
from pgvector.sqlalchemy import HALFVEC, Vector
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from imgdb.db import derived
from imgdb.db import search as reads
from imgdb.db.records import MAX_ID, NAME, PGVECTOR_METHODS, check_name  # noqa: F401 - (the registry's rules)
from imgdb.db.search import CENTER_KEY, as_array, sign_bits  # noqa: F401 - (shared with the search path)
from imgdb.errors import ImgdbError, IndexExists, IndexNotFound
from imgdb.io.reader import ImageFacts
from imgdb.orm import Image, IndexState, SearchIndex

STORAGES = ("vector", "halfvec")
#: pgvector's limits on indexed dimensions, per column type (binary quantization indexes bits).
INDEXED_DIM_LIMIT = {"vector": 2000, "halfvec": 4000, "bit": 64000}
#: Rows per page when reading a whole index's vectors or codes back.
READ_PAGE = 65_536
#: First key of the advisory lock that serialises training an index (the second is its id).
TRAINING_LOCK = 0x7EA1

_images = Image.__table__


# ---------------------------------------------------------------- registry

def get_index(conn: Connection, name: str) -> SearchIndex | None:
    check_name(name)
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


def create_index(conn: Connection, name: str, extractor: str, dim: int, ann: str, ann_params: dict[str, int],
                 storage: str = "vector") -> SearchIndex:
    """Register an index and create its vector table, trigger, view and (empty) ANN index; ``ann``
    and ``ann_params`` are the first stage's method and every parameter, spelled out."""
    check_name(name)
    check_ann(ann, dim, storage)
    # ON CONFLICT rather than a look-up first: two processes may create the same index at once.
    row = conn.execute(
        pg_insert(SearchIndex.__table__)
        .values(name=name, extractor=extractor, dim=dim, ann=ann, ann_params=ann_params, storage=storage)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(*SearchIndex.__table__.c)
    ).mappings().first()
    if row is None:
        raise IndexExists(f"index {name!r} exists already")
    index = SearchIndex(**row)
    _create_vectors_table(conn, index, index.vectors_table)
    derived.create_index_trigger(conn, index)
    derived.create_view(conn, index)
    ensure_ann(conn, index)
    return index


def _create_vectors_table(conn: Connection, index: SearchIndex, name: str) -> None:
    conn.exec_driver_sql(
        f'CREATE TABLE "{name}" ('
        f" image_id bigint PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,"
        f" embedding {index.storage}({index.dim}) NOT NULL, ann_code bytea, direct boolean NOT NULL DEFAULT true)"
    )


def check_ann(method: str, dim: int, storage: str) -> None:
    """Refuse an ANN method the vectors' type and dimension cannot have."""
    if storage not in STORAGES:
        raise ImgdbError(f"unknown storage {storage!r}: use vector or halfvec")
    if method in ("hnsw", "ivfflat") and dim > INDEXED_DIM_LIMIT[storage]:
        hint = "--storage halfvec, " if storage == "vector" and dim <= INDEXED_DIM_LIMIT["halfvec"] else ""
        raise ImgdbError(f"pgvector indexes {storage} columns of at most {INDEXED_DIM_LIMIT[storage]} dimensions, "
                         f"these vectors have {dim}: use {hint}--ann bq, pq, ivfpq, lsh or none")
    if method == "bq" and dim > INDEXED_DIM_LIMIT["bit"]:
        raise ImgdbError(f"binary quantization indexes at most {INDEXED_DIM_LIMIT['bit']} dimensions, not {dim}")


def set_ann(conn: Connection, index: SearchIndex, ann: str, ann_params: dict[str, int]) -> SearchIndex:
    """Switch an index to another ANN method or parameters (the caller rebuilds what it needs)."""
    check_ann(ann, index.dim, index.storage)
    table = SearchIndex.__table__
    conn.execute(sa.update(table).where(table.c.id == index.id).values(ann=ann, ann_params=ann_params))
    return require_index(conn, index.name)


def drop_index(conn: Connection, name: str) -> None:
    index = require_index(conn, name)
    conn.exec_driver_sql(f'DROP VIEW IF EXISTS "{index.relation}"')
    conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{index.vectors_table}"')
    conn.execute(sa.delete(SearchIndex.__table__).where(SearchIndex.id == index.id))


def save_state(conn: Connection, index: SearchIndex, arrays: dict[str, np.ndarray], owner: str = "") -> None:
    """Store learned arrays (as ``.npy`` bytes) with the index, replacing what ``owner`` stored before.

    ``owner`` namespaces the keys: ``""`` for the extractor, ``"ann."`` for the index layer, so that
    retraining one never erases the other.
    """
    table = IndexState.__table__
    mine = table.c.key.startswith(owner) if owner else ~table.c.key.contains(".")
    keys = [owner + key for key in arrays]
    conn.execute(sa.delete(table).where(table.c.index_id == index.id, mine, table.c.key.not_in(keys)))
    for key, array in arrays.items():
        # An upsert: two processes that learned the same state at once must not collide.
        statement = pg_insert(table).values(index_id=index.id, key=owner + key, value=npy_bytes(array))
        conn.execute(statement.on_conflict_do_update(index_elements=["index_id", "key"],
                                                     set_={"value": statement.excluded.value}))


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes, without pickles: how learned state is stored (and exported)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def lock_training(conn: Connection, index: SearchIndex) -> None:
    """Serialise learning an index's extractor state across processes (until the transaction ends)."""
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(TRAINING_LOCK, index.id)))


def load_state(conn: Connection, index: SearchIndex, owner: str = "") -> dict[str, np.ndarray]:
    """:func:`imgdb.db.search.state`, in ``conn``'s transaction."""
    return reads.state(conn.connection.driver_connection, index, owner)


# ---------------------------------------------------------------- ANN index

def has_ann(conn: Connection, index: SearchIndex) -> bool:
    return conn.execute(sa.text("SELECT to_regclass(format('%I.%I', current_schema(), CAST(:n AS text))) IS NOT NULL"),
                        {"n": index.ann_index}).scalar()


def drop_ann(conn: Connection, index: SearchIndex) -> None:
    """Drop the ANN index before a bulk load: building it once afterwards is much faster than
    inserting every vector into the graph one by one."""
    conn.exec_driver_sql(f'DROP INDEX IF EXISTS "{index.ann_index}"')


def ensure_ann(conn: Connection, index: SearchIndex) -> bool:
    """Create the index's pgvector index (HNSW, IVFFlat, or HNSW on sign bits) if it is missing;
    returns whether it built one."""
    if index.ann not in PGVECTOR_METHODS or has_ann(conn, index):
        return False
    rows = count_vectors(conn, index)
    p = index.ann_params
    ops = f"{index.storage}_l2_ops"
    if index.ann == "ivfflat":
        method = f"ivfflat (embedding {ops}) WITH (lists = {p['lists'] or ivfflat_lists(rows)})"
    else:
        column = f"embedding {ops}"
        if index.ann == "bq":
            column = f"({sign_bits(index, learn_center(conn, index))}) bit_hamming_ops"
        method = f"hnsw ({column}) WITH (m = {p['m']}, ef_construction = {p['ef_construction']})"
    # Build settings for this transaction: the whole HNSW graph in memory (a graph that outgrows
    # maintenance_work_mem is finished on disk, several times slower) and parallel workers.
    conn.exec_driver_sql(f"SET LOCAL maintenance_work_mem = '{build_memory_mb(rows, index, p.get('m', 16))}MB'")
    conn.exec_driver_sql(f"SET LOCAL max_parallel_maintenance_workers = {max(0, min(7, (os.cpu_count() or 2) - 1))}")
    conn.exec_driver_sql(f'CREATE INDEX IF NOT EXISTS "{index.ann_index}" ON "{index.vectors_table}" USING {method}')
    return True


def learn_center(conn: Connection, index: SearchIndex) -> np.ndarray:
    """The mean of the index's vectors, stored with the index (zeros while it is empty).

    pgvector's ``binary_quantize`` keeps the sign of each value. Descriptors that are never negative
    (SIFT, un-whitened CNN activations: most of what imgdb stores) would quantize to nearly constant
    bits, so imgdb quantizes the vector minus the collection's mean instead: every bit then splits
    the collection roughly in half.
    """
    mean = conn.exec_driver_sql(f'SELECT avg(embedding)::vector::text FROM "{index.vectors_table}"').scalar()
    center = np.zeros(index.dim, np.float32) if mean is None else np.asarray(
        [float(x) for x in mean.strip("[]").split(",")], dtype=np.float32)
    save_state(conn, index, {CENTER_KEY: center}, owner="ann.")
    return center


def build_memory_mb(rows: int, index: SearchIndex, m: int) -> int:
    """maintenance_work_mem for building the index's graph: its vectors, 2·m neighbour slots per
    element at layer 0 (16 bytes each), element overhead, and a margin; between 64 MB and 8 GB."""
    vector_bytes = index.dim * (2 if index.storage == "halfvec" else 4)
    estimate = rows * (vector_bytes + 2 * m * 16 + 200) * 1.5
    return int(min(max(estimate / 2**20, 64), 8192))


def ivfflat_lists(rows: int) -> int:
    """pgvector's rule of thumb: rows/1000 lists up to 1M rows, sqrt(rows) above."""
    return max(1, rows // 1000 if rows <= 1_000_000 else int(rows ** 0.5))


# ---------------------------------------------------------------- writes

def hashes_in_index(conn: Connection, index: SearchIndex) -> set[str]:
    """Content hashes of every image that already has a vector in ``index`` (to skip re-ingest)."""
    return set(conn.exec_driver_sql(
        f'SELECT i.sha256 FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id'
    ).scalars())


def has_content(conn: Connection, index: SearchIndex, sha256: str) -> bool:
    """Whether ``index`` holds a vector of the image with this content hash."""
    return bool(conn.exec_driver_sql(
        f'SELECT EXISTS (SELECT 1 FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id'
        " WHERE i.sha256 = %s)", (sha256,)).scalar())


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


def copy_vectors(conn: Connection, index: SearchIndex, ids: Sequence[int], vectors: np.ndarray,
                 codes: np.ndarray | None = None, *, direct: bool | Sequence[bool] = True,
                 table: str | None = None) -> None:
    """Write vectors (and their first-stage codes) with binary COPY, the bulk of an ingest's bytes.
    ``direct`` false marks vectors that only attached tables' rows hold (imgdb sync); one flag for
    all, or one per vector. ``table``: another table of the index's shape (a re-encoding's)."""
    raw = conn.connection.driver_connection
    register_vector(raw)
    half = index.storage == "halfvec"
    flags = [direct] * len(ids) if isinstance(direct, bool) else list(direct)
    with raw.cursor().copy(
        f'COPY "{table or index.vectors_table}" (image_id, embedding, ann_code, direct) FROM STDIN WITH (FORMAT BINARY)'
    ) as copy:
        copy.set_types(["int8", index.storage, "bytea", "bool"])
        for i, (image_id, vector) in enumerate(zip(ids, vectors)):
            copy.write_row((image_id, HalfVector(vector) if half else vector,
                            None if codes is None else codes[i].tobytes(), flags[i]))


def mark_direct(conn: Connection, index: SearchIndex, hashes: Sequence[str] = (), *,
                ids: Sequence[int] = ()) -> None:
    """Images given to a direct ingest that only attached tables' rows held so far: they now stay
    when those rows go."""
    raw = conn.connection.driver_connection
    if hashes:
        raw.execute(f'UPDATE "{index.vectors_table}" v SET direct = true FROM images i'
                    " WHERE i.id = v.image_id AND NOT v.direct AND i.sha256 = ANY(%s)", (list(hashes),))
    if ids:
        raw.execute(f'UPDATE "{index.vectors_table}" SET direct = true WHERE NOT direct AND image_id = ANY(%s)',
                    (list(ids),))


def write_codes(conn: Connection, index: SearchIndex, ids: np.ndarray, codes: np.ndarray) -> None:
    """Set the first-stage codes of existing rows (after training, or a rebuild)."""
    raw = conn.connection.driver_connection
    raw.execute("CREATE TEMP TABLE imgdb_codes (image_id int8, ann_code bytea) ON COMMIT DROP")
    with raw.cursor().copy("COPY imgdb_codes FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "bytea"])
        for image_id, code in zip(ids.tolist(), codes):
            copy.write_row((image_id, code.tobytes()))
    raw.execute(f'UPDATE "{index.vectors_table}" v SET ann_code = c.ann_code FROM imgdb_codes c'
                " WHERE v.image_id = c.image_id")
    raw.execute("DROP TABLE imgdb_codes")


def clear_codes(conn: Connection, index: SearchIndex) -> None:
    conn.exec_driver_sql(f'UPDATE "{index.vectors_table}" SET ann_code = NULL WHERE ann_code IS NOT NULL')


# ---------------------------------------------------------------- re-encoding into a new table

@dataclass(frozen=True)
class Stored:
    """An image of an index, as a re-encoding reads it again."""

    image_id: int
    uri: str
    sha256: str
    direct: bool


def stored_images(conn: Connection, index: SearchIndex) -> list[Stored]:
    rows = conn.exec_driver_sql(f'SELECT i.id, i.uri, i.sha256, v.direct FROM images i JOIN "{index.vectors_table}" v'
                                " ON v.image_id = i.id ORDER BY i.id").all()
    return [Stored(*row) for row in rows]


def index_images(conn: Connection, index: SearchIndex) -> list[dict[str, Any]]:
    """Every image of an index, whole (facts, metadata, and whether a direct ingest put it there),
    in id order (as :func:`read_vectors` reads their vectors)."""
    rows = conn.execute(sa.text(
        f'SELECT i.*, v.direct FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id ORDER BY i.id'))
    return [dict(row) for row in rows.mappings()]


def image_metadata(conn: Connection, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The user metadata of images, by id."""
    rows = conn.execute(sa.select(_images.c.id, _images.c.metadata).where(_images.c.id.in_(list(ids))))
    return {image_id: meta or {} for image_id, meta in rows}


def next_table(index: SearchIndex) -> str:
    """The table a re-encoding writes, until :func:`swap_in_next` makes it the index's."""
    return f"{index.vectors_table}_next"


def create_next(conn: Connection, index: SearchIndex) -> str:
    """An empty table of the index's shape for a re-encoding (one left by an interrupted one goes)."""
    conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{next_table(index)}"')
    _create_vectors_table(conn, index, next_table(index))
    return next_table(index)


def keep_unencoded(conn: Connection, index: SearchIndex) -> int:
    """Copy into the next table the vectors of the images the re-encoding could not read again (and
    of any added meanwhile): an image is never lost for want of its file."""
    return int(conn.exec_driver_sql(
        f'INSERT INTO "{next_table(index)}" (image_id, embedding, direct) SELECT v.image_id, v.embedding, v.direct'
        f' FROM "{index.vectors_table}" v WHERE NOT EXISTS (SELECT 1 FROM "{next_table(index)}" n'
        "                                            WHERE n.image_id = v.image_id)").rowcount)


def swap_in_next(conn: Connection, index: SearchIndex) -> None:
    """Make the next table the index's, in the caller's transaction: its view, trigger and names
    follow; the ANN index is built afterwards by the writer (searches scan exactly meanwhile)."""
    table, staged = index.vectors_table, next_table(index)
    conn.exec_driver_sql(f'DROP VIEW IF EXISTS "{index.relation}"')
    conn.exec_driver_sql(f'DROP TABLE "{table}"')
    conn.exec_driver_sql(f'ALTER TABLE "{staged}" RENAME TO "{table}"')
    conn.exec_driver_sql(f'ALTER TABLE "{table}" RENAME CONSTRAINT "{staged}_pkey" TO "{table}_pkey"')
    conn.exec_driver_sql(f'ALTER TABLE "{table}" RENAME CONSTRAINT "{staged}_image_id_fkey" TO "{table}_image_id_fkey"')
    derived.create_index_trigger(conn, index)
    derived.create_view(conn, index)


def count_vectors(conn: Connection, index: SearchIndex) -> int:
    return int(conn.exec_driver_sql(f'SELECT count(*) FROM "{index.vectors_table}"').scalar_one())


def delete_images(conn: Connection, ids: Iterable[int]) -> int:
    """Delete images; their vectors in every index go with them (ON DELETE CASCADE)."""
    ids = [i for i in ids if 0 < i <= MAX_ID]  # others name no image
    result = conn.execute(sa.delete(_images).where(_images.c.id.in_(ids)))
    return int(result.rowcount)


# ---------------------------------------------------------------- reads and search

def vectors_table(index: SearchIndex) -> sa.Table:
    """A Core ``Table`` for an index's vectors, for building queries."""
    return sa.Table(
        index.vectors_table, sa.MetaData(),
        sa.Column("image_id", sa.BigInteger, primary_key=True),
        sa.Column("embedding", HALFVEC(index.dim) if index.storage == "halfvec" else Vector(index.dim)),
    )


def get_image(conn: Connection, image_id: int) -> dict[str, Any] | None:
    """One ``images`` row as a dict (None if there is no such image)."""
    if not 0 < image_id <= MAX_ID:
        return None
    row = conn.execute(sa.select(_images).where(_images.c.id == image_id)).mappings().first()
    return dict(row) if row else None


def image_ids_by_hash(conn: Connection, hashes: Sequence[str]) -> dict[str, int]:
    rows = conn.execute(sa.select(_images.c.sha256, _images.c.id).where(_images.c.sha256.in_(list(hashes))))
    return {sha: image_id for sha, image_id in rows}


def ids_with_vectors(conn: Connection, index: SearchIndex, ids: Sequence[int]) -> set[int]:
    """Which of ``ids`` already have a vector in ``index`` (one array parameter, however many)."""
    raw = conn.connection.driver_connection
    rows = raw.execute(f'SELECT image_id FROM "{index.vectors_table}" WHERE image_id = ANY(%s)', (list(ids),))
    return {image_id for (image_id,) in rows}


def stored_vectors(conn: Connection, index: SearchIndex, ids: Sequence[int]) -> dict[int, np.ndarray]:
    """The stored vectors of those of ``ids`` the index holds, by id (the search path's own reader,
    :func:`imgdb.db.search.stored_vectors`, needs pgvector's types registered on its connection)."""
    table = vectors_table(index)
    rows = conn.execute(sa.select(table.c.image_id, table.c.embedding).where(table.c.image_id.in_(list(ids))))
    return {image_id: as_array(vector) for image_id, vector in rows}


def read_vectors(conn: Connection, index: SearchIndex, *, without_codes: bool = False,
                 sample: int | None = None, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image ids and vectors of a whole index (or of its rows lacking a code, or a fixed
    pseudo-random sample), in id order, at most ``limit`` of them.

    Read as pages of ``string_agg(vector_send(...))``: one bytea per page instead of a Python
    object per row, which makes reading a million vectors a matter of seconds.
    """
    where = "WHERE ann_code IS NULL" if without_codes else ""
    source = f'"{index.vectors_table}"'
    if sample is not None:
        # Ordered by a hash of the id, not random(): every page must see the same sample.
        source = f'(SELECT * FROM "{index.vectors_table}" ORDER BY hashint8(image_id) LIMIT {int(sample)})'
    pages = _read_pages(conn, f"SELECT image_id, embedding FROM {source} s {where}",
                        f"{index.storage}_send(embedding)", limit)
    width, dtype = (4, ">f4") if index.storage == "vector" else (2, ">f2")
    header = 4 // width  # vector_send starts with int16 dim and int16 unused
    ids = np.concatenate([p[0] for p in pages]) if pages else np.empty(0, np.int64)
    blob = b"".join(p[1] for p in pages)
    vectors = np.frombuffer(blob, dtype=dtype).reshape(len(ids), index.dim + header)[:, header:]
    return ids, vectors.astype(np.float32)


def read_codes(conn: Connection, index: SearchIndex) -> tuple[np.ndarray, bytes]:
    """Image ids (in order) and their concatenated codes, for rows that have one."""
    pages = _read_pages(conn, f'SELECT image_id, ann_code FROM "{index.vectors_table}" WHERE ann_code IS NOT NULL',
                        "ann_code")
    ids = np.concatenate([p[0] for p in pages]) if pages else np.empty(0, np.int64)
    return ids, b"".join(p[1] for p in pages)


def _read_pages(conn: Connection, rows_sql: str, payload: str,
                limit: int | None = None) -> list[tuple[np.ndarray, bytes]]:
    """Pages of ``(ids, concatenated payload)`` over ``rows_sql``, by keyset on ``image_id``."""
    raw = conn.connection.driver_connection
    pages: list[tuple[np.ndarray, bytes]] = []
    last, read = -1, 0
    while limit is None or read < limit:
        ids_blob, data = raw.execute(
            f"SELECT string_agg(int8send(image_id), '' ORDER BY image_id), string_agg({payload}, '' ORDER BY image_id)"
            f" FROM (SELECT * FROM ({rows_sql}) r WHERE image_id > %s ORDER BY image_id LIMIT {READ_PAGE}) page",
            (last,),
        ).fetchone()
        if ids_blob is None:
            return pages
        ids = np.frombuffer(ids_blob, dtype=">i8").astype(np.int64)
        pages.append((ids, bytes(data)))
        last, read = int(ids[-1]), read + len(ids)
        if len(ids) < READ_PAGE:
            return pages
    return pages


def index_version(conn: Connection, index: SearchIndex) -> int:
    return int(conn.execute(sa.select(SearchIndex.version).where(SearchIndex.id == index.id)).scalar_one())
