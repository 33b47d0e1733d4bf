"""imgdb as a guest in someone else's database: one schema of its own, and how a connection finds it.

Like an extension, imgdb keeps everything it creates in one schema (``imgdb``, or ``IMGDB_SCHEMA``):
its tables, the per-index vector tables and views, the sync queue, its functions, and alembic's
version table. The only thing it may create outside is ``CREATE EXTENSION vector``, where the
extension is not installed yet; an installed extension is used in whatever schema it lives.

Every connection imgdb opens carries, from its start-up packet (libpq ``options``, no extra round
trip), ``search_path = <schema>, <the extension's schema>`` and pgvector's iterative-scan settings:
imgdb's own SQL names its tables unqualified and resolves them in its schema, and where the role
cannot ``ALTER DATABASE`` the settings still hold for imgdb's sessions.

Functions run by other roles' statements (the triggers on attached tables, ``similar()``) never
trust the caller's search path: they name imgdb's tables with the schema and pin their own path.

Installs from before the schema (tables beside the application's, in ``public``) are moved into it:
:func:`adopt_legacy` hands their alembic version table over, and migration 0003 moves the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from imgdb.errors import DatabaseError, ImgdbError, first_line

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

DEFAULT_SCHEMA = "imgdb"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
#: Schemas imgdb refuses to call its own: sharing them is what the schema exists to avoid.
_NOT_OURS = ("public", "information_schema")
#: pgvector's settings on every imgdb session (filtered ``LIMIT k`` queries return k rows: strict
#: order for HNSW; IVFFlat can only do relaxed order, and imgdb re-sorts its results).
SESSION_SETTINGS = {"hnsw.iterative_scan": "strict_order", "ivfflat.iterative_scan": "relaxed_order"}
#: Whether migration 0001 could make the iterative HNSW scan the database's default (its owner can).
ITERATIVE_SCAN_IS_DEFAULT = (
    "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
    " WHERE d.datname = current_database() AND s.setrole = 0"
    " AND 'hnsw.iterative_scan=strict_order' = ANY (s.setconfig))")
#: The schema pgvector is installed in (no row while it is not).
EXTENSION_SCHEMA = ("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
                    " WHERE e.extname = 'vector'")
#: Alembic revisions of the layout before imgdb had a schema of its own.
LEGACY_REVISIONS = ("0001", "0002")
#: (table, column) pairs that only an imgdb install of that era has together.
_LEGACY_SHAPE = (("alembic_version", "version_num"), ("indexes", "extractor"), ("indexes", "ann_params"),
                 ("index_state", "value"), ("images", "sha256"))


def check_schema(name: str) -> str:
    """The schema name, if imgdb can use it; a one-line reason otherwise."""
    if not _SCHEMA_NAME.fullmatch(name) or name.startswith("pg_") or name in _NOT_OURS:
        raise ImgdbError(f"IMGDB_SCHEMA {name!r} is not usable: give a lower-case identifier (letters, digits, _) "
                         "of imgdb's own, not public, information_schema or pg_*")
    return name


def quote(identifier: str) -> str:
    """An SQL identifier as imgdb writes it into a statement: double-quoted, and where it holds
    anything but ASCII letters, digits, ``_`` and spaces, Unicode-escaped (``U&"ph \\003Ai"`` is
    ``ph :i``). A name an application chose may hold ``:`` (a bind parameter to SQLAlchemy's
    ``text()``), ``%`` (a placeholder to psycopg), ``$`` (the end of a dollar-quoted function body)
    or ``"``; escaped, none of them is in the statement's text, and PostgreSQL reads the same name."""
    if not identifier or "\x00" in identifier:
        raise ImgdbError(f"{identifier!r} is not an SQL identifier")
    if all(c.isascii() and (c.isalnum() or c in "_ ") for c in identifier):
        return f'"{identifier}"'
    return 'U&"' + "".join(c if c.isascii() and (c.isalnum() or c in "_ ") else
                           f"\\{ord(c):04X}" if ord(c) < 0x10000 else f"\\+{ord(c):06X}" for c in identifier) + '"'


@dataclass(frozen=True)
class Placement:
    """Where imgdb lives in one database: its schema, the schema pgvector was installed in (None
    while the extension is missing, before the first migration), whether the database is a Citus
    coordinator, and whether imgdb's tables are distributed over its workers
    (``imgdb db distribute``, :mod:`imgdb.db.cluster`)."""

    schema: str
    extension_schema: str | None
    citus: bool = False
    distributed: bool = False

    @property
    def search_path(self) -> str:
        parts = [self.schema] + ([self.extension_schema] if self.extension_schema not in (None, self.schema) else [])
        return ", ".join(quote(p) for p in parts)

    def connect_options(self, existing: str = "") -> str:
        """libpq ``options`` for every imgdb connection: the search path and pgvector's settings,
        after whatever ``options`` the user's URL carries."""
        # On Citus, SET LOCAL inside a transaction reaches the workers' connections too: how a
        # query's pgvector settings get to every shard (:mod:`imgdb.db.search`).
        citus = {"citus.propagate_set_commands": "local"} if self.citus else {}
        settings = {"search_path": self.search_path, **SESSION_SETTINGS, **citus}
        ours = " ".join(f"-c {key}={_escape_option(value)}" for key, value in settings.items())
        return f"{existing} {ours}".strip()


def _escape_option(value: str) -> str:
    """libpq splits ``options`` on spaces; a backslash keeps one inside a value."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def place(url: str, schema: str, *, create: bool) -> Placement:
    """Find pgvector and imgdb's schema in the database at ``url``; with ``create``, install what is
    missing (the extension, in ``public`` where that exists; the schema), or say who must.

    One short connection of the database's defaults, before imgdb's own engines exist.
    """
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {first_line(exc)}") from exc
    with conn:
        extension, has_schema, has_public, citus = conn.execute(
            f"SELECT ({EXTENSION_SCHEMA}),"
            " EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s),"
            " EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'public'),"
            " EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
            (schema,),
        ).fetchone()
        distributed = citus and has_schema and conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = to_regclass(format('%%I.images', %s::text)))",
            (schema,)).fetchone()[0]
        if not create:
            return Placement(schema, extension, citus, distributed)
        if extension is None:
            extension = _install_vector(conn, has_public)
        if not has_schema:
            try:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            except psycopg.errors.UniqueViolation:
                pass  # another process created it at the same moment
            except psycopg.errors.InsufficientPrivilege as exc:
                raise DatabaseError(
                    f"cannot create schema {schema!r} ({first_line(exc)}): ask an administrator to run "
                    f"CREATE SCHEMA {quote(schema)} AUTHORIZATION {quote(_user(conn))}") from exc
        can_create = conn.execute("SELECT has_schema_privilege(%s, 'CREATE')", (schema,)).fetchone()[0]
        if not can_create:
            raise DatabaseError(f"role {_user(conn)!r} cannot create objects in schema {schema!r}: ask an "
                                f"administrator to run ALTER SCHEMA {quote(schema)} OWNER TO {quote(_user(conn))}")
    return Placement(schema, extension, citus, distributed)


def _install_vector(conn: psycopg.Connection, has_public: bool) -> str:
    """``CREATE EXTENSION vector``, in ``public`` where there is one (never in imgdb's schema: the
    application may want vectors of its own); the schema it went to."""
    where = sql.SQL(" SCHEMA public") if has_public else sql.SQL("")
    try:
        conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS vector") + where)
    except psycopg.errors.UniqueViolation:
        pass  # another process installed it at the same moment
    except psycopg.errors.UndefinedFile as exc:
        raise DatabaseError("this PostgreSQL server has no pgvector: install it (https://github.com/pgvector/pgvector)"
                            " or use the embedded server (leave IMGDB_DATABASE_URL unset)") from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseError("pgvector is not installed in this database and this role may not install it: "
                            "ask an administrator to run CREATE EXTENSION vector") from exc
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot install pgvector: {first_line(exc)}") from exc
    return conn.execute(EXTENSION_SCHEMA).fetchone()[0]


def _user(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT current_user").fetchone()[0]


# ---------------------------------------------------------------- installs from before the schema

def adopt_legacy(conn: Connection, schema: str) -> str | None:
    """Hand an install of the old layout (imgdb's tables beside the application's, with alembic at
    revision 0001 or 0002) to the schema: move its alembic version table in, so that alembic goes
    on from that revision and migration 0003 moves the rest. Returns the schema it came from.

    Only an install that has every table of that layout (:data:`_LEGACY_SHAPE`) and one of those
    revisions is taken; an application's own ``images`` or ``alembic_version`` never is.
    """
    import sqlalchemy as sa  # (migrations only: this module is on every search's path too)

    if conn.execute(sa.text("SELECT to_regclass(format('%I.alembic_version', CAST(:s AS text))) IS NOT NULL"),
                    {"s": schema}).scalar():
        return None
    pairs = ", ".join(f"('{table}', '{column}')" for table, column in _LEGACY_SHAPE)
    candidates = conn.execute(sa.text(
        "SELECT n.nspname FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind = 'r'"
        " JOIN pg_attribute a ON a.attrelid = c.oid AND NOT a.attisdropped"
        f" WHERE n.nspname <> :s AND (c.relname::text, a.attname::text) IN ({pairs})"
        f" GROUP BY n.nspname HAVING count(*) = {len(_LEGACY_SHAPE)} ORDER BY n.nspname"), {"s": schema}).scalars().all()
    for legacy in candidates:
        revisions = conn.execute(sa.text(f"SELECT version_num FROM {quote(legacy)}.alembic_version")).scalars().all()
        if len(revisions) == 1 and revisions[0] in LEGACY_REVISIONS:
            conn.execute(sa.text(f"ALTER TABLE {quote(legacy)}.alembic_version SET SCHEMA {quote(schema)}"))
            return legacy
    return None
