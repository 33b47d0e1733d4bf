"""SQL of application tables attached to an index: attach and detach, the change queue, claims,
refs and failures.

An attached table is a ``sources`` row. Its triggers (:func:`imgdb.db.derived.create_enqueue_function`)
put the keys of changed rows in ``queue``; a sync worker claims queued keys with ``FOR UPDATE SKIP
LOCKED`` plus an advisory lock per key, reads each row's *current* image in the same statement, and,
in the same transaction, writes the images and vectors, points ``refs`` at them and deletes the
claimed queue entries. Several workers therefore never embed one key at once, the newest state of
a row always wins (a change queued while a worker holds the key waits for it), and a worker that
dies rolls back: its keys are still queued. Rows that cannot be embedded go to ``failures`` with
their reason and are queued again with back-off.

The application's table is only ever read, and given the four triggers; detach drops them with the
function they call (``DROP FUNCTION ... CASCADE``, which needs no ownership of the table).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from imgdb.db import cluster, derived, images
from imgdb.db.records import TABLE_NAME, TABLE_PARTS, IndexRecord, Source
from imgdb.db.schema import quote
from imgdb.errors import ImgdbError, first_line

#: Trigger events, each with the transition tables its trigger declares.
_EVENTS = (("insert", "INSERT", "REFERENCING NEW TABLE AS new_rows"),
           ("update", "UPDATE", "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"),
           ("delete", "DELETE", "REFERENCING OLD TABLE AS old_rows"),
           ("truncate", "TRUNCATE", ""))
#: Failed rows are tried again after this many seconds, doubled per attempt, at most RETRY_MAX.
RETRY_BASE_S = 60
RETRY_MAX_S = 24 * 3600


@dataclass(frozen=True)
class Claimed:
    """A queued key taken by a worker, with its row's image as the row holds it now."""

    ref: str
    #: Whether the row still exists.
    found: bool
    #: Bytes in the image column (None: the column is NULL).
    size: int | None
    #: The column's value (a path or URL for text columns, the image for bytea), None when NULL or
    #: over the size limit.
    value: str | bytes | None
    #: The image the key pointed at before, and its content hash.
    image_id: int | None
    sha256: str | None


#: A source's table as SQL names it now (it follows renames), or, once dropped, as it was attached.
_SOURCE_COLUMNS = (f"SELECT s.id, s.index_id, x.name AS index_name, {TABLE_NAME} AS table,"
                   " s.column_name AS column, s.column_kind, s.key_column AS key, s.key_type, s.root,"
                   f" {TABLE_PARTS}"
                   " FROM sources s JOIN indexes x ON x.id = s.index_id")


def sources(conn: Connection, index: IndexRecord | None = None) -> list[Source]:
    """The attached tables of ``index`` (or of every index), in the order they were attached."""
    where = " WHERE s.index_id = :i" if index is not None else ""
    rows = conn.execute(sa.text(_SOURCE_COLUMNS + where + " ORDER BY s.id"),
                        {"i": index.id if index is not None else None}).mappings().all()
    return [Source(**row) for row in rows]


def has_sources(conn: Connection, index: IndexRecord) -> bool:
    return bool(conn.execute(sa.text("SELECT EXISTS (SELECT 1 FROM sources WHERE index_id = :i)"),
                             {"i": index.id}).scalar())


# ---------------------------------------------------------------- attach and detach

#: What a key's type name (``format_type``, pasted into casts and the views' ``ref``) may not hold:
#: a bind parameter's ``:``, a placeholder's ``%``, a dollar quote's ``$``, a statement's end.
_UNWRITABLE_TYPE = re.compile(r"[:%$;\\]")


@dataclass(frozen=True)
class _Table:
    relid: int
    #: As people read it (PostgreSQL's quoting).
    name: str
    kind: str
    #: As imgdb writes it into SQL (:attr:`imgdb.db.records.Source.relation`).
    relation: str


def resolve_table(conn: Connection, name: str) -> _Table:
    """An application table by name: ``schema.table``, or a bare name found in ``public`` or else in
    the one schema that has a table of that name. Never one of imgdb's own."""
    try:
        with conn.begin_nested():  # (a name that does not parse must not end the caller's transaction)
            parts = conn.execute(sa.text("SELECT parse_ident(:n)"), {"n": name}).scalar_one()
    except sa.exc.DBAPIError:
        raise ImgdbError(f"{name!r} is not a table name") from None
    if len(parts) > 2:
        raise ImgdbError(f"{name!r}: give TABLE or SCHEMA.TABLE")
    rows = conn.execute(sa.text(
        "SELECT c.oid, format('%I.%I', n.nspname, c.relname), c.relkind, n.nspname = current_schema(),"
        " n.nspname, c.relname"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = :t AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        " AND (n.nspname = :s OR (:s IS NULL AND n.nspname NOT IN ('pg_catalog', 'information_schema')))"
        " ORDER BY n.nspname <> 'public', n.nspname"),
        {"t": parts[-1], "s": parts[0] if len(parts) == 2 else None}).all()
    if len(parts) == 1:
        rows = [r for r in rows if not r[3]]
        if len(rows) > 1 and rows[0][1].startswith("public."):
            rows = rows[:1]
    if not rows:
        raise ImgdbError(f"no table {name!r} in this database")
    if len(rows) > 1:
        raise ImgdbError(f"{name!r} is ambiguous: name one of {', '.join(r[1] for r in rows)}")
    relid, qualified, kind, ours, schema, relname = rows[0]
    if ours:
        raise ImgdbError(f"{qualified} is one of imgdb's own tables: attach the application's tables")
    if kind not in ("r", "p"):
        raise ImgdbError(f"{qualified} is not a table (a view or foreign table has no triggers to follow it)")
    return _Table(relid, qualified, kind, f"{quote(schema)}.{quote(relname)}")


def _column(conn: Connection, table: _Table, name: str) -> tuple[str, str, str]:
    """A column's name, SQL type and type category (``S`` for strings), or a reason."""
    row = conn.execute(sa.text(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typcategory::text"
        " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = :r AND a.attname = :c AND a.attnum > 0 AND NOT a.attisdropped"),
        {"r": table.relid, "c": name}).first()
    if row is None:
        raise ImgdbError(f"{table.name} has no column {name!r}")
    return row[0], row[1], row[2]


def _image_kind(conn: Connection, table: _Table, column: str) -> tuple[str, str]:
    name, sql_type, category = _column(conn, table, column)
    if sql_type == "bytea":
        return name, "bytea"
    if category != "S":
        raise ImgdbError(f"{table.name}.{name} is {sql_type}: the image column must hold a file path or an "
                         "http(s) URL (text) or the image itself (bytea)")
    return name, "text"


def _key(conn: Connection, table: _Table, key: str | None) -> tuple[str, str]:
    """The key column (default: the primary key) and its type; it must be unique on its own."""
    if key is None:
        columns = conn.execute(sa.text(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = ANY (i.indkey) WHERE i.indrelid = :r AND i.indisprimary ORDER BY a.attnum"),
            {"r": table.relid}).scalars().all()
        if not columns:
            raise ImgdbError(f"{table.name} has no primary key: give --key COLUMN, a column that is unique on its own")
        if len(columns) > 1:
            raise ImgdbError(f"{table.name} has a composite primary key ({', '.join(columns)}): give --key COLUMN, "
                             "a column that is unique on its own")
        key = columns[0]
    name, sql_type, _ = _column(conn, table, key)
    unique = conn.execute(sa.text(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = i.indkey[0] WHERE i.indrelid = :r AND i.indisunique AND i.indnkeyatts = 1"
        " AND i.indpred IS NULL AND a.attname = :c)"), {"r": table.relid, "c": name}).scalar()
    if not unique:
        raise ImgdbError(f"{table.name}.{name} is not unique on its own: the key must be the primary key or "
                         "have a UNIQUE constraint of its own")
    if _UNWRITABLE_TYPE.search(sql_type):
        raise ImgdbError(f"{table.name}.{name} is of type {sql_type}, whose name imgdb cannot write into a cast: "
                         "give a key of a type named with letters, digits and _")
    return name, sql_type


def attach(conn: Connection, index: IndexRecord, table_name: str, column: str, key: str | None = None,
           root: str | None = None) -> tuple[Source, int]:
    """Attach a table to ``index``: install its triggers and queue every row it has. Attaching the
    same table the same way again changes nothing; another column or key is refused until it is
    detached. Returns the source and how many rows were queued."""
    table = resolve_table(conn, table_name)
    column_name, kind = _image_kind(conn, table, column)
    key_name, key_type = _key(conn, table, key)
    existing = conn.execute(sa.text("SELECT column_name, key_column, root FROM sources WHERE index_id = :i AND relid = :r"),
                            {"i": index.id, "r": table.relid}).first()
    if existing is not None:
        if tuple(existing) != (column_name, key_name, root):
            raise ImgdbError(f"{table.name} is attached to index {index.name!r} already, by column {existing[0]!r} and "
                             f"key {existing[1]!r}: detach it first")
        return _source(conn, index, table.relid), 0
    source_id = conn.execute(sa.text(
        "INSERT INTO sources (index_id, relid, table_name, column_name, column_kind, key_column, key_type, root)"
        " VALUES (:i, :r, :t, :c, :k, :key, :kt, :root) RETURNING id"),
        {"i": index.id, "r": table.relid, "t": table.name, "c": column_name, "k": kind, "key": key_name,
         "kt": key_type, "root": root}).scalar_one()
    function = derived.create_enqueue_function(conn, source_id)
    # Asked now: after a refused statement, the transaction answers nothing more.
    user = conn.execute(sa.text("SELECT current_user")).scalar_one()
    schema = derived.current_schema(conn)
    try:
        for suffix, event, transition in _EVENTS:
            conn.execute(sa.text(
                f"CREATE TRIGGER {quote(trigger_name(schema, source_id, suffix))} AFTER {event} ON {table.relation}"
                f" {transition} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"))
        queued = conn.execute(sa.text(
            f"INSERT INTO queue (source_id, ref) SELECT :s, {quote(key_name)}::text FROM {table.relation}"
            f" WHERE {quote(key_name)} IS NOT NULL"), {"s": source_id}).rowcount
    except sa.exc.ProgrammingError as exc:
        if not isinstance(exc.orig, psycopg.errors.InsufficientPrivilege):
            raise
        raise ImgdbError(f"imgdb's role may not follow {table.name} ({first_line(exc.orig)}): the table's owner can "
                         f"run GRANT SELECT, TRIGGER ON {table.name} TO {quote(user)}") from None
    derived.create_view(conn, index)
    return _source(conn, index, table.relid), int(queued)


def trigger_name(schema: str, source_id: int, suffix: str) -> str:
    """Triggers are named per schema, so that two imgdb schemas can follow one table."""
    return f"{schema}_sync_{source_id}_{suffix}"


def _source(conn: Connection, index: IndexRecord, relid: int) -> Source:
    row = conn.execute(sa.text(_SOURCE_COLUMNS + " WHERE s.index_id = :i AND s.relid = :r"),
                       {"i": index.id, "r": relid}).mappings().one()
    return Source(**row)


def find(conn: Connection, table_name: str, index: IndexRecord | None = None) -> list[Source]:
    """The attachments of a table (to ``index``, or to any index). A table that was dropped is still
    found by the name it had when it was attached."""
    try:
        relid = resolve_table(conn, table_name).relid
        where, params = "s.relid = :r", {"r": relid}
    except ImgdbError:
        where, params = "(s.table_name = :t OR s.relid::regclass::text = :t)", {"t": table_name}
    if index is not None:
        where += " AND s.index_id = :i"
        params["i"] = index.id
    rows = conn.execute(sa.text(_SOURCE_COLUMNS + f" WHERE {where} ORDER BY s.id"), params).mappings().all()
    return [Source(**row) for row in rows]


def detach(conn: Connection, source: Source, index: IndexRecord) -> tuple[int, int]:
    """Remove a table's triggers and everything imgdb keeps of it: its queue entries, refs and
    failures, and the vectors and images only its rows held. Returns (queue entries dropped,
    rows that were embedded)."""
    schema = quote(derived.current_schema(conn))
    conn.execute(sa.text(f"DROP FUNCTION IF EXISTS {schema}.enqueue_{source.id}() CASCADE"))
    images = conn.execute(sa.text("SELECT image_id FROM refs WHERE source_id = :s"), {"s": source.id}).scalars().all()
    dropped = conn.execute(sa.text("DELETE FROM queue WHERE source_id = :s"), {"s": source.id}).rowcount
    conn.execute(sa.text("DELETE FROM sources WHERE id = :s"), {"s": source.id})  # refs, failures cascade
    remove_orphan_images(conn, remove_orphan_vectors(conn, index, images))
    derived.create_view(conn, index)
    return int(dropped), len(images)


# ---------------------------------------------------------------- the queue

def lock_space(conn: Connection, source: Source) -> int:
    """The first key of a source's advisory locks (the second is the hash of the row's key)."""
    return zlib.crc32(f"{derived.current_schema(conn)}.sync.{source.id}".encode()) - 2**31


def claim(conn: Connection, source: Source, limit: int, max_bytes: int) -> list[Claimed]:
    """Take up to ``limit`` queued keys of ``source`` that no other worker holds, with their rows'
    current images; in the caller's transaction, which keeps them until it commits.

    Three statements, each on one kind of table (the queue and the application's table, local to
    the coordinator on Citus; imgdb's refs and images, which may be distributed): Citus plans no
    modification joined with distributed tables by ``ctid``."""
    column, key = quote(source.column), quote(source.key)
    mine = conn.execute(sa.text("""
        WITH picked AS (
            SELECT ctid, ref FROM queue WHERE source_id = :s LIMIT :n FOR UPDATE SKIP LOCKED
        ), mine AS (
            SELECT DISTINCT ref FROM picked WHERE pg_try_advisory_xact_lock(CAST(:space AS int4), hashtext(ref))
        ), taken AS (
            DELETE FROM queue q USING picked p WHERE q.ctid = p.ctid AND p.ref IN (SELECT ref FROM mine)
        )
        SELECT ref FROM mine ORDER BY ref"""),
        {"s": source.id, "n": limit, "space": lock_space(conn, source)}).scalars().all()
    if not mine:
        return []
    rows = conn.execute(sa.text(f"""
        SELECT m.ref, t.found IS NOT NULL AS found, t.size, CASE WHEN t.size <= :max THEN t.value END AS value
        FROM unnest(CAST(:refs AS text[])) m(ref)
        LEFT JOIN LATERAL (SELECT true AS found, octet_length(a.{column}) AS size, a.{column} AS value
                           FROM {source.relation} a WHERE a.{key} = CAST(m.ref AS {source.key_type})) t ON true
        ORDER BY m.ref"""), {"refs": list(mine), "max": max_bytes}).all()
    held = {ref: (image_id, sha256) for ref, image_id, sha256 in conn.execute(sa.text(
        "SELECT r.ref, r.image_id, i.sha256 FROM refs r JOIN images i ON i.id = r.image_id"
        " WHERE r.source_id = :s AND r.ref = ANY(:refs)"), {"s": source.id, "refs": list(mine)})}
    return [Claimed(*row, *held.get(row.ref, (None, None))) for row in rows]


def requeue_failures(conn: Connection, source: Source, *, all_of_them: bool = False) -> int:
    """Queue again the failed rows whose back-off is over (or every failed row)."""
    due = "retry_at IS NOT NULL" if all_of_them else "retry_at <= now()"
    return int(conn.execute(sa.text(
        f"WITH due AS (UPDATE failures SET retry_at = NULL WHERE source_id = :s AND {due} RETURNING ref)"
        " INSERT INTO queue (source_id, ref) SELECT :s, ref FROM due"), {"s": source.id}).rowcount)


def next_retry(conn: Connection, sources_: Sequence[Source]) -> float | None:
    """Seconds until the earliest failed row of ``sources_`` is due again (None: none waits)."""
    return conn.execute(sa.text(
        "SELECT greatest(0, extract(epoch FROM min(retry_at) - now())) FROM failures WHERE source_id = ANY(:s)"),
        {"s": [s.id for s in sources_]}).scalar()


def queued(conn: Connection, sources_: Sequence[Source]) -> int:
    """Distinct keys waiting in the queue for ``sources_``."""
    return int(conn.execute(sa.text("SELECT count(*) FROM (SELECT DISTINCT source_id, ref FROM queue"
                                    " WHERE source_id = ANY(:s)) q"), {"s": [s.id for s in sources_]}).scalar())


def sample_values(conn: Connection, source: Source, n: int, max_bytes: int) -> list[tuple[str, str | bytes]]:
    """Up to ``n`` rows' keys and images, a fixed pseudo-random sample, to learn a codebook from."""
    column, key = quote(source.column), quote(source.key)
    rows = conn.execute(sa.text(
        f"SELECT {key}::text, {column} FROM {source.relation} WHERE {column} IS NOT NULL AND octet_length({column}) <= :max"
        f" ORDER BY hashtext({key}::text) LIMIT :n"), {"n": n, "max": max_bytes}).all()
    return [(ref, bytes(value) if isinstance(value, memoryview) else value) for ref, value in rows]


def image_bytes(conn: Connection, image_id: int, max_bytes: int) -> bytes | None:
    """The bytes of an image as a ``bytea`` column of an attached table holds it now (for
    thumbnails and originals of images that have no file), or None."""
    by_id = {s.id: s for s in sources(conn)}
    holders = conn.execute(sa.text("SELECT r.source_id, r.ref FROM refs r JOIN sources s ON s.id = r.source_id"
                                   " WHERE r.image_id = :i AND s.column_kind = 'bytea' ORDER BY r.source_id, r.ref"),
                           {"i": image_id}).all()
    for source_id, ref in holders:
        source = by_id[source_id]
        column, key = quote(source.column), quote(source.key)
        value = conn.execute(sa.text(
            f"SELECT {column} FROM {source.relation} WHERE {key} = CAST(:r AS {source.key_type})"
            f" AND octet_length({column}) <= :max"), {"r": ref, "max": max_bytes}).scalar()
        if value is not None:
            return bytes(value)
    return None


# ---------------------------------------------------------------- refs and failures

def set_refs(conn: Connection, source: Source, refs: Sequence[str], image_ids: Sequence[int]) -> None:
    if refs:
        conn.execute(sa.text(
            "INSERT INTO refs (source_id, ref, image_id, synced_at)"
            " SELECT :s, r, i, now() FROM unnest(CAST(:r AS text[]), CAST(:i AS bigint[])) AS u(r, i)"
            " ON CONFLICT (source_id, ref) DO UPDATE SET image_id = EXCLUDED.image_id, synced_at = EXCLUDED.synced_at"),
            {"s": source.id, "r": list(refs), "i": list(image_ids)})


def remove_refs(conn: Connection, source: Source, refs: Sequence[str]) -> None:
    if refs:
        conn.execute(sa.text("DELETE FROM refs WHERE source_id = :s AND ref = ANY(:r)"), {"s": source.id, "r": list(refs)})


def record_failures(conn: Connection, source: Source, failures: Sequence[tuple[str, str]]) -> None:
    """Keep each failed row with its reason; the next try waits RETRY_BASE_S doubled per attempt.

    The times are the transaction's ``now()`` as epoch seconds, and arithmetic on those: Citus runs
    an upsert's ``DO UPDATE`` on every copy of a reference table and takes only immutable functions
    there (``to_timestamp(double)`` is; ``now()`` and timestamp-plus-interval are not)."""
    if failures:
        now = conn.execute(sa.text("SELECT extract(epoch FROM now())::float8")).scalar_one()
        conn.execute(sa.text(
            "INSERT INTO failures AS f (source_id, ref, error, attempts, first_failed_at, last_failed_at, retry_at)"
            " SELECT :s, r, e, 1, to_timestamp(:now), to_timestamp(:now), to_timestamp(:now + :base)"
            " FROM unnest(CAST(:r AS text[]), CAST(:e AS text[])) AS u(r, e)"
            " ON CONFLICT (source_id, ref) DO UPDATE SET error = EXCLUDED.error, attempts = f.attempts + 1,"
            " last_failed_at = EXCLUDED.last_failed_at,"
            " retry_at = to_timestamp(:now + least(:max, :base * 2 ^ f.attempts))"),
            {"s": source.id, "r": [r for r, _ in failures], "e": [e for _, e in failures], "now": now,
             "base": RETRY_BASE_S, "max": RETRY_MAX_S})


def clear_failures(conn: Connection, source: Source, refs: Sequence[str]) -> None:
    if refs:
        conn.execute(sa.text("DELETE FROM failures WHERE source_id = :s AND ref = ANY(:r)"),
                     {"s": source.id, "r": list(refs)})


def remove_orphan_vectors(conn: Connection, index: IndexRecord, image_ids: Iterable[int]) -> list[int]:
    """Of ``image_ids``, drop ``index``'s vectors that no direct ingest and no row of its attached
    tables hold any more; returns the images whose vectors went (for :func:`remove_orphan_images`)."""
    ids = sorted(set(image_ids))
    if not ids:
        return []
    gone = list(conn.execute(sa.text(
        f'DELETE FROM "{index.vectors_table}" v WHERE v.image_id = ANY(:ids) AND NOT v.direct'
        " AND NOT EXISTS (SELECT 1 FROM refs r JOIN sources s ON s.id = r.source_id"
        "                 WHERE r.image_id = v.image_id AND s.index_id = :i) RETURNING v.image_id"),
        {"ids": ids, "i": index.id}).scalars())
    cluster.touch(conn, index)
    return gone


def remove_orphan_images(conn: Connection, image_ids: Iterable[int]) -> None:
    """Of ``image_ids``, delete the images that no index and no row of an attached table holds.

    Run in a transaction of its own after the vectors went: it locks image rows, which ingests
    lock before they write vectors, and taking them after would let two transactions wait on
    each other."""
    ids = sorted(set(image_ids))
    if not ids:
        return
    tables = conn.execute(sa.text("SELECT id FROM indexes")).scalars().all()
    held = "".join(f' AND NOT EXISTS (SELECT 1 FROM "vectors_{t}" v WHERE v.image_id = g.id)' for t in tables)
    images.forget(conn, conn.execute(sa.text(
        f"DELETE FROM images g WHERE g.id = ANY(:ids) AND NOT EXISTS (SELECT 1 FROM refs r WHERE r.image_id = g.id)"
        f"{held} RETURNING g.id"), {"ids": ids}).scalars().all())


def status(conn: Connection, index: IndexRecord | None = None) -> list[dict[str, Any]]:
    """The ``sync_status`` view's rows, as JSON-ready dicts."""
    return _view_rows(conn, "sync_status", index)


def failures(conn: Connection, index: IndexRecord | None = None) -> list[dict[str, Any]]:
    """The ``sync_failures`` view's rows, as JSON-ready dicts (keys JSON-typed as their columns)."""
    by_table = {s.table: s for s in sources(conn, index)}
    rows = _view_rows(conn, "sync_failures", index)
    for row in rows:
        row["ref"] = by_table[row["table"]].ref_json(row["ref"]) if row["table"] in by_table else row["ref"]
    return rows


def _view_rows(conn: Connection, view: str, index: IndexRecord | None) -> list[dict[str, Any]]:
    where = " WHERE index = :n" if index is not None else ""
    rows = conn.execute(sa.text(f'SELECT source::text AS "table", * FROM {view}{where} ORDER BY index, source::text'),
                        {"n": index.name if index is not None else None}).mappings().all()
    return [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items() if k != "source"}
            for row in rows]
