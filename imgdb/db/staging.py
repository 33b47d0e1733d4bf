"""SQL of a re-encoding's shadow table: an index's images are encoded again into a table of the
index's shape beside its own, and swapped in, in one transaction, only once they all are
(:mod:`imgdb.jobs.reencode`)."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from imgdb.db import cluster, derived, vectors
from imgdb.db.records import IndexRecord


def next_table(index: IndexRecord) -> str:
    """The table a re-encoding writes, until :func:`swap_in_next` makes it the index's."""
    return f"{index.vectors_table}_next"


def create_next(conn: Connection, index: IndexRecord) -> str:
    """An empty table of the index's shape for a re-encoding (one left by an interrupted one goes)."""
    conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{next_table(index)}"')
    vectors.create_table(conn, index, next_table(index))
    return next_table(index)


def keep_unencoded(conn: Connection, index: IndexRecord) -> int:
    """Copy into the next table the vectors of the images the re-encoding could not read again (and
    of any added meanwhile): an image is never lost for want of its file."""
    return int(conn.exec_driver_sql(
        f'INSERT INTO "{next_table(index)}" (image_id, embedding, direct) SELECT v.image_id, v.embedding, v.direct'
        f' FROM "{index.vectors_table}" v WHERE NOT EXISTS (SELECT 1 FROM "{next_table(index)}" n'
        "                                            WHERE n.image_id = v.image_id)").rowcount)


def swap_in_next(conn: Connection, index: IndexRecord) -> None:
    """Make the next table the index's, in the caller's transaction: its views, trigger and names
    follow; the ANN index is built afterwards by the writer (searches scan exactly meanwhile)."""
    table, staged = index.vectors_table, next_table(index)
    conn.exec_driver_sql(f'DROP VIEW IF EXISTS "{index.relation}", "{index.duplicates_relation}"')
    conn.exec_driver_sql(f'DROP TABLE "{table}"')
    conn.exec_driver_sql(f'ALTER TABLE "{staged}" RENAME TO "{table}"')
    # (its primary key through its index: Citus renames a distributed table's indexes, not its constraints)
    conn.exec_driver_sql(f'ALTER INDEX "{staged}_pkey" RENAME TO "{table}_pkey"')
    derived.create_index_trigger(conn, index)
    derived.create_view(conn, index)
    cluster.touch(conn, index)
