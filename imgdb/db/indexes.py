"""SQL of the index registry: the ``indexes`` rows, and the objects each index owns.

Everything in imgdb talks to PostgreSQL on connections whose search path starts with imgdb's schema
(:mod:`imgdb.db.schema`), so names here are unqualified. Per index (with id ``N`` and name ``NAME``)
there are, besides its ``indexes`` row:

* ``vectors_N`` (:mod:`imgdb.db.vectors`): its vectors, one fixed dimension per table since a
  pgvector index needs one; a statement trigger bumps ``indexes.version`` on every write;
* ``vectors_N_ann``: the pgvector index its ANN method keeps, if any (:mod:`imgdb.db.pgvector`);
* ``images_NAME``: the view plain SQL queries (:func:`imgdb.db.derived.create_view`).

Rows are read as :class:`~imgdb.db.records.IndexRecord` values through the search path's one
statement (:func:`imgdb.db.search.lookup`), so that writers and queries see an index alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from imgdb.db import cluster, derived, vectors
from imgdb.db import search as reads
from imgdb.db.models import SearchIndex
from imgdb.db.records import IndexRecord, check_name, check_storage
from imgdb.errors import IndexExists, IndexNotFound

_indexes = SearchIndex.__table__


def get(conn: Connection, name: str, state_keys: Sequence[str] = ()) -> IndexRecord | None:
    """The index named ``name`` (with the learned arrays of ``state_keys``), or None."""
    check_name(name)
    return reads.lookup(conn.connection.driver_connection, name, state_keys, cluster.distributed(conn))


def require(conn: Connection, name: str) -> IndexRecord:
    index = get(conn, name)
    if index is None:
        raise IndexNotFound(f"no index named {name!r} (create it with `imgdb index create {name} --extractor SPEC`)")
    return index


def counted(conn: Connection, index: IndexRecord) -> IndexRecord:
    """The index with its number of vectors filled in."""
    return replace(index, images=vectors.count(conn, index))


def all_indexes(conn: Connection) -> list[IndexRecord]:
    """Every index, by name, with its number of vectors."""
    names = conn.execute(sa.select(_indexes.c.name).order_by(_indexes.c.name)).scalars().all()
    return [counted(conn, require(conn, name)) for name in names]


def create(conn: Connection, name: str, extractor: str, dim: int, ann: str, ann_params: dict[str, int],
           storage: str = "vector") -> IndexRecord:
    """Register an index and create its vector table, trigger and view; ``ann`` and ``ann_params``
    are its first stage's method and every parameter, spelled out (checked by the caller against
    the dimension and storage: :func:`imgdb.ann.registry.check`)."""
    check_name(name)
    check_storage(storage)
    # ON CONFLICT rather than a look-up first: two processes may create the same index at once.
    created = conn.execute(
        pg_insert(_indexes).values(name=name, extractor=extractor, dim=dim, ann=ann, ann_params=ann_params,
                                   storage=storage)
        .on_conflict_do_nothing(index_elements=["name"]).returning(_indexes.c.id)
    ).scalar()
    if created is None:
        raise IndexExists(f"index {name!r} exists already")
    index = require(conn, name)
    vectors.create_table(conn, index, index.vectors_table)
    derived.create_index_trigger(conn, index)
    derived.create_view(conn, index)
    return index


def set_ann(conn: Connection, index: IndexRecord, ann: str, ann_params: dict[str, Any]) -> IndexRecord:
    """Switch an index to another ANN method or parameters (the caller rebuilds what it needs)."""
    conn.execute(sa.update(_indexes).where(_indexes.c.id == index.id).values(ann=ann, ann_params=ann_params))
    return require(conn, index.name)


def drop(conn: Connection, index: IndexRecord) -> None:
    """Delete an index: its view, its vectors (with their pgvector index), its registry row (and,
    by cascade, its learned state)."""
    conn.exec_driver_sql(f'DROP VIEW IF EXISTS "{index.relation}", "{index.duplicates_relation}"')
    conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{index.vectors_table}"')
    conn.execute(sa.delete(_indexes).where(_indexes.c.id == index.id))

