"""SQL of the pgvector index an ANN method keeps on an index's vectors (``vectors_N_ann``): whether it
exists, dropping it before a bulk load, and building it with the settings a build wants. What to
build is the method's (:meth:`imgdb.ann.method.AnnMethod.structure`)."""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from imgdb.db.records import IndexRecord


def has_ann(conn: Connection, index: IndexRecord) -> bool:
    return conn.execute(sa.text("SELECT to_regclass(format('%I.%I', current_schema(), CAST(:n AS text))) IS NOT NULL"),
                        {"n": index.ann_index}).scalar()


def drop_ann(conn: Connection, index: IndexRecord) -> None:
    """Drop the pgvector index (before a bulk load: building it once afterwards is much faster than
    inserting every vector into the graph one by one; before a rebuild)."""
    conn.exec_driver_sql(f'DROP INDEX IF EXISTS "{index.ann_index}"')


def build_ann(conn: Connection, index: IndexRecord, using: str, memory_mb: int) -> None:
    """``CREATE INDEX ... USING <using>`` on the index's vectors, in ``conn``'s transaction, with the
    build's memory (a graph that outgrows ``maintenance_work_mem`` is finished on disk, several
    times slower) and parallel workers (every core but the leader's, at most 7)."""
    conn.exec_driver_sql(f"SET LOCAL maintenance_work_mem = '{int(memory_mb)}MB'")
    conn.exec_driver_sql(f"SET LOCAL max_parallel_maintenance_workers = {max(0, min(7, (os.cpu_count() or 2) - 1))}")
    conn.exec_driver_sql(f'CREATE INDEX IF NOT EXISTS "{index.ann_index}" ON "{index.vectors_table}" USING {using}')
