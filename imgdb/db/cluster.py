"""imgdb on a Citus cluster: its tables distributed over the workers (``imgdb db distribute``).

The layout, chosen so that a search is one distributed statement whose every shard runs its own
index scan and joins its own image rows:

* ``images`` and every index's ``vectors_N`` (and ``local_features``, and the duplicates job's
  tables) are hash-distributed by image id and co-located: an image's row, its vectors and its local features live in the same shard, so
  a hit's join with its image row never leaves its shard, and each shard keeps its own HNSW (or
  IVFFlat, or bit) index;
* ``image_hashes`` (content hash → image id), distributed by the hash, keeps deduplication exact
  across shards: a distributed table's unique constraints must include its distribution column, so
  ``images`` cannot keep its own unique hash;
* the small registry tables (``indexes``, ``index_state``, ``networks``, ``sources``, ``refs``,
  ``failures``, ``grants``) are reference tables, a copy on every node;
* the queue attached tables' triggers write stays a table of the coordinator: an application's
  write never waits on the workers.

What Citus does not carry over, imgdb does itself on a distributed database: foreign keys from the
reference tables into ``images`` (``refs``) become deletes in the same transaction
(:func:`imgdb.db.images.delete`), and the statement triggers that count an index's writes become
explicit updates by the writers (:func:`touch`). Statements of the search path set pgvector's
settings with ``SET LOCAL`` in their transaction, which ``citus.propagate_set_commands = local``
(set on every imgdb connection to a Citus database) sends to the workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from imgdb.db.engine import DISTRIBUTED
from imgdb.db.records import IndexRecord
from imgdb.db.schema import ITERATIVE_SCAN_IS_DEFAULT, quote
from imgdb.errors import ImgdbError

log = logging.getLogger(__name__)

#: Tables every node holds whole.
REFERENCE = ("indexes", "index_state", "networks", "sources", "refs", "failures", "grants")
#: Tables distributed by image id, co-located with ``images`` (besides the indexes' vectors).
COLOCATED = ("local_features", "image_paths", "duplicate_pairs", "duplicate_members", "duplicate_checked")
#: The content-hash arbiter of a distributed database.
HASHES = "image_hashes"


def distributed(conn: Connection) -> bool:
    """Whether the database ``conn`` works on has imgdb's tables distributed (what the engine was
    told when it was made: :attr:`imgdb.db.engine.Database.distributed`)."""
    return bool(conn.get_execution_options().get(DISTRIBUTED))


def has_citus(conn: Connection) -> bool:
    """Whether Citus is installed in the database (distributed or not yet)."""
    return bool(conn.execute(sa.text("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")).scalar())


@contextmanager
def coordinator_only(conn: Connection) -> Iterator[None]:
    """DDL that stays on the coordinator, where Citus would also run it on the workers: objects only
    the coordinator uses (``similar()``, whose ``SET hnsw.…`` a worker takes for an unknown setting
    that only a superuser may set, pgvector not being loaded in the sessions Citus opens there)."""
    if not has_citus(conn):
        yield
        return
    before = conn.execute(sa.text("SELECT current_setting('citus.enable_ddl_propagation')")).scalar_one()
    conn.execute(sa.text("SELECT set_config('citus.enable_ddl_propagation', 'off', true)"))
    try:
        yield
    finally:
        conn.execute(sa.text("SELECT set_config('citus.enable_ddl_propagation', :v, true)"), {"v": before})


def distribute(conn: Connection, shards: int | None = None) -> None:
    """Distribute imgdb's tables over the coordinator's workers, in ``conn``'s transaction; tables
    distributed already stay as they are, so running it again changes nothing. ``shards``: the
    shard count of a first distribution (default: ``citus.shard_count``)."""
    if not has_citus(conn):
        raise ImgdbError("this database has no Citus: run imgdb db distribute against a Citus coordinator "
                         "(CREATE EXTENSION citus there, and add its workers)")
    if shards is not None and not 1 <= shards <= 4096:
        raise ImgdbError(f"--shards must be between 1 and 4096, not {shards}")
    vectors = conn.execute(sa.text("SELECT 'vectors_' || id FROM indexes ORDER BY id")).scalars().all()
    done = set(conn.execute(sa.text(
        "SELECT c.relname FROM pg_dist_partition p JOIN pg_class c ON c.oid = p.logicalrelid"
        " WHERE c.relnamespace = current_schema()::regnamespace")).scalars())
    _worker_defaults(conn)
    todo_reference = [t for t in REFERENCE if t not in done]
    todo_distributed = [t for t in ["images", *vectors, *COLOCATED] if t not in done]
    if todo_reference or todo_distributed:
        keys = _drop_foreign_keys(conn)
        if "images" in todo_distributed:
            conn.exec_driver_sql("ALTER TABLE images DROP CONSTRAINT IF EXISTS uq_images_sha256")
        for table in todo_reference:
            conn.execute(sa.text("SELECT create_reference_table(CAST(:t AS regclass))"), {"t": table})
        for table in todo_distributed:
            if table.startswith("vectors_"):
                conn.exec_driver_sql(f'DROP TRIGGER IF EXISTS imgdb_changed ON "{table}"')
            if table == "images":
                count = {"shard_count": shards} if shards else {}
                conn.execute(sa.text("SELECT create_distributed_table('images', 'id'"
                                     + (", shard_count := :shard_count)" if shards else ")")), count)
            else:
                distribute_table(conn, table)
        for table, name, definition in keys:
            referenced = definition.split("REFERENCES ", 1)[1].split("(", 1)[0].strip('"')
            if table not in REFERENCE or referenced in REFERENCE:  # (none from a reference table into a sharded one)
                conn.exec_driver_sql(f'ALTER TABLE "{table}" ADD CONSTRAINT {quote(name)} {definition}')
    if HASHES not in done:
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {HASHES} (sha256 varchar(64) PRIMARY KEY, image_id bigint NOT NULL)")
        count = {"shard_count": shards} if shards else {}
        conn.execute(sa.text(f"SELECT create_distributed_table('{HASHES}', 'sha256'"
                             + (", shard_count := :shard_count)" if shards else ")")), count)
        conn.exec_driver_sql(f"INSERT INTO {HASHES} (sha256, image_id) SELECT sha256, id FROM images"
                             " ON CONFLICT DO NOTHING")
    for role in conn.execute(sa.text("SELECT role FROM grants ORDER BY role")).scalars().all():
        grant_tables(conn, role)  # (roles given the views before the tables under them were distributed)


def distribute_table(conn: Connection, table: str) -> None:
    """Distribute a table of image ids (an index's vectors, a re-encoding's next table) by image id,
    co-located with ``images``."""
    conn.execute(sa.text("SELECT create_distributed_table(CAST(:t AS regclass), 'image_id', colocate_with => 'images')"),
                 {"t": table})


def _drop_foreign_keys(conn: Connection) -> list[tuple[str, str, str]]:
    """Drop the foreign keys among imgdb's tables (Citus converts a table only without them),
    returning ``(table, name, definition)`` of each to add back."""
    keys = [tuple(row) for row in conn.execute(sa.text(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE contype = 'f' AND connamespace = current_schema()::regnamespace ORDER BY conrelid, conname"))]
    for table, name, _ in keys:
        conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT {quote(name)}")
    return [(table.strip('"'), name, definition) for table, name, definition in keys]


def _worker_defaults(conn: Connection) -> None:
    """Make pgvector's iterative HNSW scan the default of imgdb's database on every worker too, as
    migration 0001 does on the coordinator: an application's filtered SQL on the views runs on the
    workers' shards. Citus passes ``ALTER DATABASE`` on only for databases it created itself, so it
    is sent to each worker; as on one node it needs the database's owner, and without one a warning
    says so (``run_command_on_workers`` reports only a command's first statement, so the setting
    is looked up afterwards)."""
    database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
    conn.execute(sa.text("SELECT run_command_on_workers(:c)"), {"c": "SET citus.enable_ddl_propagation TO off; "
                 f"ALTER DATABASE {quote(database)} SET hnsw.iterative_scan = strict_order"})
    without = conn.execute(sa.text("SELECT nodename || ':' || nodeport FROM run_command_on_workers(:c)"
                                   " WHERE result IS DISTINCT FROM 't'"), {"c": ITERATIVE_SCAN_IS_DEFAULT}).scalars().all()
    if without:
        log.warning("this role cannot ALTER DATABASE on the workers (%s), so filtered vector queries of your own need "
                    "SET LOCAL hnsw.iterative_scan = strict_order with citus.propagate_set_commands = local",
                    ", ".join(without))


def grant_tables(conn: Connection, role: str, *, revoke: bool = False) -> None:
    """On Citus, give ``role`` (or take back) SELECT on the distributed and reference tables behind
    imgdb's views: a view reads its tables with its owner's rights only on the coordinator, while
    the shards' queries run on the workers as the querying role (Citus passes the grant on to the
    shards). Nothing without Citus, where :func:`imgdb.db.derived.grant`'s views are enough."""
    if not has_citus(conn):
        return
    tables = conn.execute(sa.text(
        "SELECT DISTINCT c.relname FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class"
        " JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass"
        " JOIN pg_class c ON c.oid = d.refobjid JOIN pg_dist_partition p ON p.logicalrelid = c.oid"
        " WHERE v.relnamespace = current_schema()::regnamespace AND v.relkind = 'v' ORDER BY 1")).scalars().all()
    for table in tables:
        conn.exec_driver_sql(f"REVOKE SELECT ON {quote(table)} FROM {quote(role)}" if revoke
                             else f"GRANT SELECT ON {quote(table)} TO {quote(role)}")


def touch(conn: Connection, index: IndexRecord | None = None) -> None:
    """Count a write to an index's vectors (to every index's, with None), where no trigger can:
    Python-side first stages reload what they hold when the count moves."""
    if distributed(conn):
        where = "" if index is None else f" WHERE id = {int(index.id)}"
        conn.exec_driver_sql(f"UPDATE indexes SET version = version + 1{where}")


def layout(conn: Connection) -> dict[str, Any]:
    """How imgdb's data lies over the cluster: its distributed and reference tables, the shard
    count, and per node its shards, bytes and image rows."""
    tables = conn.execute(sa.text(
        "SELECT c.relname, p.partmethod FROM pg_dist_partition p JOIN pg_class c ON c.oid = p.logicalrelid"
        " WHERE c.relnamespace = current_schema()::regnamespace ORDER BY c.relname")).all()
    nodes = conn.execute(sa.text(
        "SELECT s.nodename, s.nodeport, count(*) FILTER (WHERE s.citus_table_type = 'distributed'),"
        " sum(s.shard_size) FROM citus_shards s JOIN pg_class c ON c.oid = s.table_name"
        " WHERE c.relnamespace = current_schema()::regnamespace GROUP BY 1, 2 ORDER BY 1, 2")).all()
    rows = dict(conn.execute(sa.text(
        "SELECT p.nodename || ':' || p.nodeport, sum(r.result::bigint)"
        " FROM run_command_on_shards(CAST(:t AS regclass), 'SELECT count(*) FROM %s') r"
        " JOIN pg_dist_shard_placement p ON p.shardid = r.shardid GROUP BY 1"),
        {"t": "images"}).all()) if any(name == "images" for name, _ in tables) else {}
    shards = conn.execute(sa.text(
        "SELECT shard_count FROM citus_tables WHERE table_name = CAST(:t AS regclass)"), {"t": "images"}).scalar()
    return {
        "distributed": [name for name, method in tables if method == "h"],
        "reference": [name for name, method in tables if method == "n"],
        "shards": shards,
        "nodes": [{"node": f"{host}:{port}", "shards": int(count), "bytes": int(size or 0),
                   "images": int(rows.get(f"{host}:{port}", 0))} for host, port, count, size in nodes],
    }
