"""SQL of an index's vectors table: bulk writes by binary COPY, the first stages' codes, and bulk
reads.

``vectors_N (image_id, embedding, ann_code, direct)``: the vectors (``vector`` or ``halfvec`` of the
index's dimension), for first stages that keep codes each vector's code, and whether a direct ingest
put the image there (``direct`` false: only rows of attached tables hold it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pgvector import HalfVector
from pgvector.psycopg import register_vector
from sqlalchemy.engine import Connection

from imgdb.db import cluster
from imgdb.db.records import IndexRecord

#: Rows per page when reading a whole index's vectors or codes back.
READ_PAGE = 65_536


def create_table(conn: Connection, index: IndexRecord, name: str) -> None:
    """An empty vectors table of the index's shape, named ``name``: on a distributed database,
    sharded with ``images`` (its key to them added once it is, as Citus wants). The key is named
    after the index's own table even in a re-encoding's (:mod:`imgdb.db.staging`): Citus cannot
    rename a distributed table's constraints when that table is swapped in."""
    conn.exec_driver_sql(
        f'CREATE TABLE "{name}" (image_id bigint PRIMARY KEY, embedding {index.storage}({index.dim}) NOT NULL,'
        " ann_code bytea, direct boolean NOT NULL DEFAULT true)")
    if cluster.distributed(conn):
        cluster.distribute_table(conn, name)
    conn.exec_driver_sql(f'ALTER TABLE "{name}" ADD CONSTRAINT "{index.vectors_table}_image_id_fkey"'
                         " FOREIGN KEY (image_id) REFERENCES images(id) ON DELETE CASCADE")


def count(conn: Connection, index: IndexRecord) -> int:
    return int(conn.exec_driver_sql(f'SELECT count(*) FROM "{index.vectors_table}"').scalar_one())


def copy(conn: Connection, index: IndexRecord, ids: Sequence[int], vectors: np.ndarray,
         codes: np.ndarray | None = None, *, direct: bool | Sequence[bool] = True, table: str | None = None) -> None:
    """Write vectors (and their first-stage codes) with binary COPY, the bulk of an ingest's bytes.
    ``direct`` false marks vectors that only attached tables' rows hold (imgdb sync); one flag for
    all, or one per vector. ``table``: another table of the index's shape (a re-encoding's)."""
    raw = conn.connection.driver_connection
    register_vector(raw)
    half = index.storage == "halfvec"
    flags = [direct] * len(ids) if isinstance(direct, bool) else list(direct)
    with raw.cursor().copy(
        f'COPY "{table or index.vectors_table}" (image_id, embedding, ann_code, direct) FROM STDIN WITH (FORMAT BINARY)'
    ) as writer:
        writer.set_types(["int8", index.storage, "bytea", "bool"])
        for i, (image_id, vector) in enumerate(zip(ids, vectors)):
            writer.write_row((image_id, HalfVector(vector) if half else vector,
                              None if codes is None else codes[i].tobytes(), flags[i]))
    if table is None:
        cluster.touch(conn, index)


def mark_direct(conn: Connection, index: IndexRecord, hashes: Sequence[str] = (), *,
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


def write_codes(conn: Connection, index: IndexRecord, ids: np.ndarray, codes: np.ndarray) -> None:
    """Set the first-stage codes of existing rows (after learning, or a rebuild)."""
    raw = conn.connection.driver_connection
    raw.execute("CREATE TEMP TABLE imgdb_codes (image_id int8, ann_code bytea) ON COMMIT DROP")
    with raw.cursor().copy("COPY imgdb_codes FROM STDIN WITH (FORMAT BINARY)") as writer:
        writer.set_types(["int8", "bytea"])
        for image_id, code in zip(ids.tolist(), codes):
            writer.write_row((image_id, code.tobytes()))
    raw.execute(f'UPDATE "{index.vectors_table}" v SET ann_code = c.ann_code FROM imgdb_codes c'
                " WHERE v.image_id = c.image_id")
    raw.execute("DROP TABLE imgdb_codes")
    cluster.touch(conn, index)


def clear_codes(conn: Connection, index: IndexRecord) -> None:
    conn.exec_driver_sql(f'UPDATE "{index.vectors_table}" SET ann_code = NULL WHERE ann_code IS NOT NULL')
    cluster.touch(conn, index)


#: Ids asked about per statement: Citus prunes shards per element of an ``= ANY`` array at a cost
#: that grows faster than the array (a million ids in one statement took 98 s, in 10,000s 4.3 s).
IDS_PER_STATEMENT = 10_000


def ids_with_vectors(conn: Connection, index: IndexRecord, ids: Sequence[int]) -> set[int]:
    """Which of ``ids`` already have a vector in ``index``."""
    raw = conn.connection.driver_connection
    ids = list(ids)
    found: set[int] = set()
    for start in range(0, len(ids), IDS_PER_STATEMENT):
        rows = raw.execute(f'SELECT image_id FROM "{index.vectors_table}" WHERE image_id = ANY(%s)',
                           (ids[start:start + IDS_PER_STATEMENT],))
        found.update(image_id for (image_id,) in rows)
    return found


def read(conn: Connection, index: IndexRecord, *, without_codes: bool = False,
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
    found = np.frombuffer(blob, dtype=dtype).reshape(len(ids), index.dim + header)[:, header:]
    return ids, found.astype(np.float32)


def read_codes(conn: Connection, index: IndexRecord) -> tuple[np.ndarray, bytes]:
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
    last, done = -1, 0
    while limit is None or done < limit:
        ids_blob, data = raw.execute(
            f"SELECT string_agg(int8send(image_id), '' ORDER BY image_id), string_agg({payload}, '' ORDER BY image_id)"
            f" FROM (SELECT * FROM ({rows_sql}) r WHERE image_id > %s ORDER BY image_id LIMIT {READ_PAGE}) page",
            (last,),
        ).fetchone()
        if ids_blob is None:
            return pages
        ids = np.frombuffer(ids_blob, dtype=">i8").astype(np.int64)
        pages.append((ids, bytes(data)))
        last, done = int(ids[-1]), done + len(ids)
        if len(ids) < READ_PAGE:
            return pages
    return pages
