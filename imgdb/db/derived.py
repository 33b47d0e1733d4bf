"""The objects imgdb derives from its tables: views, functions, triggers, grants.

Migrations own the tables and their data; what is computed from them is made here, by the code
that uses it, and remade after every migration (:func:`install`), so a migration never has to
freeze a copy of a view's or a function's text. A change to one of these definitions ships with a
migration (an empty one will do) so that existing databases remake them.

Functions that other roles' statements run (the enqueue trigger of an attached table, fired by the
application's INSERT; ``similar()``, called from the application's SQL) are ``SECURITY DEFINER``
with a pinned ``search_path`` and schema-qualified names: the caller's path is never trusted.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from imgdb.db.cluster import coordinator_only, distributed, grant_tables
from imgdb.db.models import Image
from imgdb.db.records import IndexRecord
from imgdb.db.schema import EXTENSION_SCHEMA, quote
from imgdb.db.search import lookup
from imgdb.errors import ImgdbError

#: The signature of the "more like this" function, for GRANT/REVOKE; and those it had before.
SIMILAR = "similar(text, anyelement, integer, regclass, double precision)"
_FORMER_SIMILAR = ("similar(text, anyelement, integer, regclass)",)


def current_schema(conn: Connection) -> str:
    """imgdb's schema: first on every imgdb connection's search path."""
    return conn.execute(sa.text("SELECT current_schema()")).scalar_one()


def extension_schema(conn: Connection) -> str:
    """The schema pgvector is installed in (its types and operators, on the functions' paths)."""
    return conn.execute(sa.text(EXTENSION_SCHEMA)).scalar_one()


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel attached tables' triggers wake sync workers on."""
    return f"{schema}_sync"


def install(conn: Connection) -> None:
    """(Re)make every derived object of the schema, after a migration."""
    create_index_changed(conn)
    raw = conn.connection.driver_connection
    for name in conn.execute(sa.text("SELECT name FROM indexes ORDER BY name")).scalars().all():
        index = lookup(raw, name)
        assert index is not None  # (this transaction read its name)
        create_index_trigger(conn, index)
        create_view(conn, index)
    for source_id in conn.execute(sa.text("SELECT id FROM sources ORDER BY id")).scalars().all():
        create_enqueue_function(conn, source_id)
    create_status_views(conn)
    create_similar(conn)
    for role in conn.execute(sa.text("SELECT role FROM grants ORDER BY role")).scalars().all():
        _grant_read(conn, role)


# ---------------------------------------------------------------- per index

def create_index_changed(conn: Connection) -> None:
    """The statement trigger function that bumps ``indexes.version`` on every write to an index's
    vectors, whoever writes (cascading deletes, users' own SQL)."""
    schema = quote(current_schema(conn))
    conn.execute(sa.text(f"""
        CREATE OR REPLACE FUNCTION {schema}.index_changed() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
          UPDATE {schema}.indexes SET version = version + 1 WHERE id = TG_ARGV[0]::int;
          RETURN NULL;
        END $$"""))


def create_index_trigger(conn: Connection, index: IndexRecord) -> None:
    """The trigger that counts every write to an index's vectors; on a distributed database, where
    triggers cannot update the registry from the shards, the writers count (:func:`imgdb.db.cluster.touch`)."""
    if distributed(conn):
        return
    conn.execute(sa.text(
        f'CREATE OR REPLACE TRIGGER imgdb_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON "{index.vectors_table}"'
        f" FOR EACH STATEMENT EXECUTE FUNCTION index_changed('{index.id}')"))


def create_view(conn: Connection, index: IndexRecord) -> None:
    """The views plain SQL queries for ``index``.

    ``images_<name>``: every ``images`` column, ``embedding``, and for images that rows of attached
    tables hold, ``ref`` (the row's key, typed as the key is; ``text`` when the index's tables have
    keys of different types) and ``source`` (the table, a ``regclass``). An image held by two rows
    appears once per row, so that a join with the application's table finds both.

    ``duplicates_<name>``: its groups of duplicates (``imgdb duplicates``), a row per member (per
    attached row where tables hold the image; an ``exact`` group, a row per copy: each path at which
    ingest found the bytes, each attached row): ``group`` (the representative's image id; with
    ``level``, the group's name), ``level``, ``image_id``, ``uri``, ``ref``, ``source``, ``score``,
    ``distance`` and ``inliers`` (its evidence against the representative), ``representative``.

    Remade when tables are attached or detached, keeping the grants of :func:`grant`. Where
    the type of ``ref`` changes, CREATE OR REPLACE cannot keep a view: it is dropped first (and
    a user's view built on it makes that fail, with PostgreSQL's reason).
    """
    columns = ", ".join(f"i.{c.name}" for c in Image.__table__.columns)
    key_types = set(conn.execute(sa.text("SELECT key_type FROM sources WHERE index_id = :i"), {"i": index.id}).scalars())
    attached = bool(key_types)
    ref_type = key_types.pop() if len(key_types) == 1 else "text"
    no_ref = f"NULL::{ref_type} AS ref, NULL::regclass AS source"
    ref_columns = f"r.ref::{ref_type} AS ref, s.relid::regclass AS source"
    held_by = ref_columns if attached else no_ref
    #: The rows of this index's attached tables, with their tables.
    its_rows = f"refs r JOIN sources s ON s.id = r.source_id AND s.index_id = {index.id}"

    def rows_of(image_id: str) -> str:
        """The join that brings each image's rows of attached tables; nothing without attached
        tables: no join for the planner to weigh against the vector index's order."""
        return f" LEFT JOIN ({its_rows}) ON r.image_id = {image_id}" if attached else ""

    _replace_view(conn, index.relation, f'SELECT {columns}, v.embedding, {held_by} FROM "{index.vectors_table}" v'
                  f" JOIN images i ON i.id = v.image_id{rows_of('v.image_id')}", ref_type)
    judged = (f"SELECT m.group_id, m.level, m.image_id, i.uri, {held_by}, m.score, m.distance, m.inliers,"
              " m.image_id = m.group_id, 0 FROM duplicate_members m JOIN images i ON i.id = m.image_id"
              f"{rows_of('m.image_id')} WHERE m.index_id = {index.id}")
    # Exact duplicates: the same bytes at several paths (the first, then the others ingest found),
    # or in several rows of attached tables.
    in_rows = f" OR EXISTS (SELECT 1 FROM {its_rows} WHERE r.image_id = v.image_id)" if attached else ""
    copies = " UNION ALL ".join([
        f'SELECT v.image_id, i.uri, {no_ref}, 0 AS rank FROM "{index.vectors_table}" v JOIN images i ON i.id = v.image_id'
        f" WHERE v.direct AND (EXISTS (SELECT 1 FROM image_paths p WHERE p.image_id = v.image_id){in_rows})",
        f'SELECT p.image_id, p.uri, {no_ref}, 1 FROM image_paths p WHERE p.image_id IN (SELECT v.image_id'
        f' FROM "{index.vectors_table}" v)',
        *([f"SELECT r.image_id, i.uri, {ref_columns}, 2 FROM {its_rows} JOIN images i ON i.id = r.image_id"]
          if attached else [])])
    exact = ("SELECT c.image_id, 'exact', c.image_id, c.uri, c.ref, c.source, 1.0, 0.0, NULL::integer,"
             " row_number() OVER (PARTITION BY c.image_id ORDER BY c.rank, c.uri, c.ref) = 1, c.rank"
             f" FROM ({copies}) c WHERE c.image_id IN (SELECT x.image_id FROM ({copies}) x GROUP BY x.image_id"
             " HAVING count(*) > 1)")
    duplicates = ('SELECT d.group_id AS "group", d.level, d.image_id, d.uri, d.ref, d.source, d.score, d.distance,'
                  " d.inliers, d.representative FROM (" + judged + " UNION ALL " + exact + ") AS d(group_id, level,"
                  " image_id, uri, ref, source, score, distance, inliers, representative, rank)")
    _replace_view(conn, index.duplicates_relation, duplicates, ref_type)


def _replace_view(conn: Connection, name: str, body: str, ref_type: str) -> None:
    """(Re)make view ``name`` as ``body``, dropping it first where its ``ref`` changes type, and
    grant it to the roles given imgdb's views."""
    view = quote(name)
    current = conn.execute(sa.text(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " WHERE a.attrelid = to_regclass(format('%I.%I', current_schema(), CAST(:v AS text)))"
        " AND a.attname = 'ref' AND NOT a.attisdropped"), {"v": name}).scalar()
    if current is not None and current != ref_type:
        conn.execute(sa.text(f"DROP VIEW {view}"))
    conn.execute(sa.text(f"CREATE OR REPLACE VIEW {view} AS {body}"))
    for role in conn.execute(sa.text("SELECT role FROM grants")).scalars().all():
        conn.execute(sa.text(f"GRANT SELECT ON {view} TO {quote(role)}"))
        grant_tables(conn, role)


# ---------------------------------------------------------------- attached tables

def create_enqueue_function(conn: Connection, source_id: int) -> str:
    """The trigger function of one attached table; returns its qualified name.

    Statement-level, over transition tables: one ``INSERT ... SELECT`` into the queue per
    statement of the application, however many rows it touched, and one ``NOTIFY``. It queues keys
    only (the worker reads the row itself, so a queued key always gets the row's latest state):
    inserted rows, rows whose image column or key changed, deleted rows, and on TRUNCATE every row
    the index holds. The queue has no index and no foreign key, so the application's writes never
    wait on imgdb's. Whatever goes wrong in here (a renamed column, say) becomes a WARNING, never an
    error: imgdb must not be the reason an application's write fails.
    """
    source = conn.execute(sa.text("SELECT * FROM sources WHERE id = :i"), {"i": source_id}).mappings().one()
    bare = current_schema(conn)
    schema = quote(bare)
    key, column = quote(source["key_column"]), quote(source["column_name"])
    queue = f"INSERT INTO {schema}.queue (source_id, ref) SELECT {source_id},"
    name = f"{schema}.enqueue_{source_id}"
    conn.execute(sa.text(f"""
        CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
        BEGIN
          IF TG_OP = 'INSERT' THEN
            {queue} n.{key}::text FROM new_rows n WHERE n.{key} IS NOT NULL;
          ELSIF TG_OP = 'UPDATE' THEN
            {queue} n.{key}::text FROM new_rows n LEFT JOIN old_rows o ON o.{key} = n.{key}
              WHERE n.{key} IS NOT NULL AND (o.{key} IS NULL OR o.{column} IS DISTINCT FROM n.{column})
            UNION ALL
            SELECT {source_id}, o.{key}::text FROM old_rows o LEFT JOIN new_rows n ON n.{key} = o.{key}
              WHERE o.{key} IS NOT NULL AND n.{key} IS NULL;
          ELSIF TG_OP = 'DELETE' THEN
            {queue} o.{key}::text FROM old_rows o WHERE o.{key} IS NOT NULL;
          ELSE
            {queue} ref FROM {schema}.refs WHERE source_id = {source_id};
          END IF;
          PERFORM pg_notify({_literal(notify_channel(bare))}, '{source_id}');
          RETURN NULL;
        EXCEPTION WHEN OTHERS THEN
          RAISE WARNING 'imgdb: changes to % were not queued for image search (%); run imgdb attach again',
            TG_TABLE_NAME, SQLERRM;
          RETURN NULL;
        END $fn$"""))
    return name


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_status_views(conn: Connection) -> None:
    """``sync_status`` (per attached table: queued, failed and embedded rows, the oldest queued
    change) and ``sync_failures`` (each row that could not be embedded, with its reason), for
    people and monitors alike."""
    conn.execute(sa.text("""
        CREATE OR REPLACE VIEW sync_status AS
        SELECT s.relid::regclass AS source, x.name AS index, s.column_name AS image_column,
               (SELECT count(DISTINCT q.ref) FROM queue q WHERE q.source_id = s.id) AS queued,
               (SELECT count(*) FROM failures f WHERE f.source_id = s.id) AS failed,
               (SELECT count(*) FROM refs r WHERE r.source_id = s.id) AS done,
               (SELECT min(q.queued_at) FROM queue q WHERE q.source_id = s.id) AS oldest_queued,
               (SELECT max(r.synced_at) FROM refs r WHERE r.source_id = s.id) AS last_synced
        FROM sources s JOIN indexes x ON x.id = s.index_id"""))
    conn.execute(sa.text("""
        CREATE OR REPLACE VIEW sync_failures AS
        SELECT s.relid::regclass AS source, x.name AS index, f.ref, f.error, f.attempts,
               f.first_failed_at, f.last_failed_at, f.retry_at
        FROM failures f JOIN sources s ON s.id = f.source_id JOIN indexes x ON x.id = s.index_id"""))


def create_similar(conn: Connection) -> None:
    """``similar(index, ref, k, source, min_score)``: the ``k`` rows of an attached table whose
    images are nearest to the image of row ``ref`` (its key, of the key's own type, which the
    result's ``ref`` has too), with their distances and, once the index learned its scores
    (:mod:`imgdb.query.scores`), their score; "more like this" from SQL alone. ``source`` names the
    table where several are attached to the index; ``min_score`` keeps only rows scored that or
    more, however few (an index that has not learned its scores refuses it). No rows while ``ref``
    is not embedded yet.

    The query vector is read first and passed as a parameter, so that the index's HNSW graph
    serves the ordering; an iterative scan keeps going past images that no row of the table holds.
    """
    schema, extension = current_schema(conn), extension_schema(conn)
    path = ", ".join(quote(p) for p in dict.fromkeys([schema, extension])) + ", pg_temp"
    # The function's SET names a setting of pgvector's: load the library first, or PostgreSQL
    # takes it for an unknown placeholder that only a superuser may set.
    conn.execute(sa.text("SELECT CAST('[0]' AS vector)"))
    with coordinator_only(conn):
        for former in _FORMER_SIMILAR:
            conn.execute(sa.text(f"DROP FUNCTION IF EXISTS {quote(schema)}.{former}"))
        _create_float8s(conn, schema)
        _create_similar(conn, schema, path)


def _create_float8s(conn: Connection, schema: str) -> None:
    """``float8s(npy)``: the numbers of a little-endian float64 ``.npy`` array (how learned state is
    stored, :func:`imgdb.db.state.npy_bytes`), so that SQL reads an index's score model; NULL for
    any other ``.npy``. PostgreSQL has no cast from bytes to float8: the IEEE 754 fields are read
    from the bits (normal numbers and zero: what a fitted model holds)."""
    conn.execute(sa.text(f"""
        CREATE OR REPLACE FUNCTION {quote(schema)}.float8s(npy bytea) RETURNS double precision[]
        LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $fn$
        DECLARE
          start integer;
          bits bigint;
          exponent integer;
          numbers double precision[] := '{{}}';
        BEGIN
          IF length(npy) < 10 OR substring(npy FROM 1 FOR 7) <> '\\x934e554d505901'::bytea THEN
            RETURN NULL;
          END IF;
          start := 10 + get_byte(npy, 8) + 256 * get_byte(npy, 9);
          IF position('<f8' IN convert_from(substring(npy FROM 11 FOR start - 10), 'LATIN1')) = 0
             OR (length(npy) - start) % 8 <> 0 THEN
            RETURN NULL;
          END IF;
          FOR i IN 0 .. (length(npy) - start) / 8 - 1 LOOP
            bits := 0;
            FOR j IN 0 .. 7 LOOP
              bits := bits | (get_byte(npy, start + 8 * i + j)::bigint << (8 * j));
            END LOOP;
            exponent := ((bits >> 52) & 2047)::integer;
            numbers := numbers || CASE WHEN exponent = 0 THEN 0::double precision ELSE
              sign(bits::numeric)::double precision * (1 + (bits & 4503599627370495)::double precision / 4503599627370496)
              * power(2::double precision, exponent - 1023) END;
          END LOOP;
          RETURN numbers;
        END $fn$"""))
    conn.execute(sa.text(f"REVOKE ALL ON FUNCTION {quote(schema)}.float8s(bytea) FROM PUBLIC"))


def _create_similar(conn: Connection, schema: str, path: str) -> None:
    conn.execute(sa.text(f"""
        CREATE OR REPLACE FUNCTION {quote(schema)}.similar(index_name text, key anyelement, k integer DEFAULT 10,
                                                         source regclass DEFAULT NULL,
                                                         min_score double precision DEFAULT NULL)
        RETURNS TABLE (ref anyelement, distance double precision, score double precision)
        LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = {path}
        SET hnsw.iterative_scan = strict_order AS $fn$
        DECLARE
          ix record;
          src record;
          matches integer;
          query_image bigint;
          query_vector text;
          model double precision[];
        BEGIN
          SELECT * INTO ix FROM indexes WHERE name = index_name;
          IF NOT FOUND THEN
            RAISE EXCEPTION 'imgdb: no index named %', index_name USING ERRCODE = 'undefined_object';
          END IF;
          SELECT count(*) INTO matches FROM sources s WHERE s.index_id = ix.id AND (source IS NULL OR s.relid = source);
          IF matches = 0 THEN
            RAISE EXCEPTION 'imgdb: no table % is attached to index %', coalesce(source::text, ''), index_name
              USING ERRCODE = 'undefined_object';
          ELSIF matches > 1 THEN
            RAISE EXCEPTION 'imgdb: several tables are attached to index %: name one, similar(%, key, k, ''table'')',
              index_name, quote_literal(index_name) USING ERRCODE = 'ambiguous_parameter';
          END IF;
          -- The score model: [intercept, weight] of a logistic on the distance (imgdb.query.scores).
          SELECT float8s(st.value) INTO model FROM index_state st WHERE st.index_id = ix.id AND st.key = 'score.distance';
          IF min_score IS NOT NULL THEN
            IF model IS NULL OR cardinality(model) <> 2 THEN
              RAISE EXCEPTION 'imgdb: index % has not learned its scores: run imgdb index calibrate %', index_name,
                index_name USING ERRCODE = 'object_not_in_prerequisite_state';
            ELSIF NOT (min_score >= 0 AND min_score <= 1) THEN
              RAISE EXCEPTION 'imgdb: min_score must be between 0 and 1, not %', min_score
                USING ERRCODE = 'invalid_parameter_value';
            END IF;
          END IF;
          SELECT * INTO src FROM sources s WHERE s.index_id = ix.id AND (source IS NULL OR s.relid = source);
          SELECT r.image_id INTO query_image FROM refs r WHERE r.source_id = src.id AND r.ref = key::text;
          IF NOT FOUND THEN
            RETURN;
          END IF;
          EXECUTE format('SELECT embedding::text FROM vectors_%s WHERE image_id = $1', ix.id)
            INTO query_vector USING query_image;
          -- (Rounded as the API rounds a hit's score, and cut on it as the API cuts.)
          RETURN QUERY EXECUTE format(
            'SELECT h.ref, h.distance, h.score FROM (SELECT n.ref, n.distance, round((1 / (1 + exp(-least(700,'
            '   greatest(-700, $6[1] + $6[2] * n.distance)))))::numeric, 4)::float8 AS score'
            ' FROM (SELECT r.ref::%s AS ref, (v.embedding <-> $1::%s)::float8 AS distance FROM vectors_%s v'
            '       JOIN refs r ON r.image_id = v.image_id AND r.source_id = $2'
            '       WHERE r.ref <> $3 ORDER BY v.embedding <-> $1::%s LIMIT $4) n) h'
            ' WHERE $5 IS NULL OR h.score >= $5 ORDER BY h.distance',
            pg_typeof(key), ix.storage, ix.id, ix.storage)
            USING query_vector, src.id, key::text, k, min_score, model;
        END $fn$"""))
    conn.execute(sa.text(f"REVOKE ALL ON FUNCTION {quote(schema)}.{SIMILAR} FROM PUBLIC"))


# ---------------------------------------------------------------- read access for application roles

def grant(conn: Connection, role: str) -> None:
    """What ``imgdb db grant ROLE`` gives: USAGE on the schema, SELECT on every view (per index and
    sync status), EXECUTE on ``similar()``; nothing on the tables behind them (a view reads them
    with its owner's rights), except on Citus (:func:`imgdb.db.cluster.grant_tables`). The role is
    remembered, so views made later are granted too."""
    _check_role(conn, role)
    conn.execute(sa.text("INSERT INTO grants (role) VALUES (:r) ON CONFLICT DO NOTHING"), {"r": role})
    _grant_read(conn, role)


def revoke(conn: Connection, role: str) -> None:
    """Take back what :func:`grant` gave."""
    _check_role(conn, role)
    conn.execute(sa.text("DELETE FROM grants WHERE role = :r"), {"r": role})
    schema, who = quote(current_schema(conn)), quote(role)
    for view in _views(conn):
        conn.execute(sa.text(f"REVOKE SELECT ON {schema}.{quote(view)} FROM {who}"))
    conn.execute(sa.text(f"REVOKE EXECUTE ON FUNCTION {schema}.{SIMILAR} FROM {who}"))
    conn.execute(sa.text(f"REVOKE USAGE ON SCHEMA {schema} FROM {who}"))
    grant_tables(conn, role, revoke=True)


def _check_role(conn: Connection, role: str) -> None:
    if not conn.execute(sa.text("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :r)"), {"r": role}).scalar():
        raise ImgdbError(f"no role {role!r} in this PostgreSQL server")


def _grant_read(conn: Connection, role: str) -> None:
    schema, who = quote(current_schema(conn)), quote(role)
    conn.execute(sa.text(f"GRANT USAGE ON SCHEMA {schema} TO {who}"))
    for view in _views(conn):
        conn.execute(sa.text(f"GRANT SELECT ON {schema}.{quote(view)} TO {who}"))
    conn.execute(sa.text(f"GRANT EXECUTE ON FUNCTION {schema}.{SIMILAR} TO {who}"))
    grant_tables(conn, role)


def _views(conn: Connection) -> list[str]:
    return list(conn.execute(sa.text(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'v'"
        " ORDER BY c.relname")).scalars())
