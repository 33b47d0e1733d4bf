"""Which PostgreSQL imgdb talks to, the SQLAlchemy engines on it, and keeping its schema current."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import psycopg
import sqlalchemy as sa
from pgvector.psycopg import register_vector
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

import imgdb_migrations

from imgdb.config import Settings
from imgdb.db.embedded import EmbeddedServer
from imgdb.db.schema import DEFAULT_SCHEMA, check_schema, first_line, place
from imgdb.errors import DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")
log = logging.getLogger("imgdb")


def sqlalchemy_url(url: str) -> str:
    """Point a plain ``postgresql://`` URL at the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise DatabaseError(f"not a PostgreSQL URL: {url.split('@')[-1]!r}")


def alembic_config(connection: Connection | None = None, schema: str = DEFAULT_SCHEMA) -> Config:
    """An alembic config over the installed migrations, optionally bound to an open connection of
    imgdb's (whose search path starts with ``schema``)."""
    from alembic.config import Config  # (alembic is loaded by migrations only)

    config = Config()
    config.set_main_option("script_location", str(Path(str(resources.files("imgdb_migrations")))))
    if connection is not None:
        config.attributes["connection"] = connection
        config.attributes["schema"] = schema
    return config


def lost_to_a_conflict(exc: sa.exc.OperationalError) -> bool:
    """Whether PostgreSQL aborted the transaction to break a deadlock or a serialisation conflict:
    the one failure a writer is asked to retry."""
    return isinstance(exc.orig, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure))


class Database:
    """Engines on imgdb's schema in one database, migrated to the current revision.

    ``migrate``: apply pending migrations now (first use). ``create``: install pgvector and the
    schema where they are missing (default: when migrating); without it nothing is written.
    """

    def __init__(self, url: str, *, schema: str = DEFAULT_SCHEMA, migrate: bool = True,
                 create: bool | None = None) -> None:
        self.url = url
        self.schema = check_schema(schema)
        self.placement = place(url, self.schema, create=migrate if create is None else create)
        self.engine: Engine = self._engine(pool_pre_ping=True)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.upgrade(only_if_needed=True)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, migrate: bool = True,
                      create: bool | None = None) -> Database:
        """The configured database: ``IMGDB_DATABASE_URL``, else the embedded server (started on demand)."""
        settings = settings or Settings.from_env()
        url = settings.database_url or EmbeddedServer(settings.home).start()
        return cls(url, schema=settings.schema, migrate=migrate, create=create)

    def _engine(self, **kwargs: object) -> Engine:
        """An engine whose connections start in imgdb's schema (:mod:`imgdb.db.schema`); ORM and
        Core statements name the models' schema, translated where ``IMGDB_SCHEMA`` is not the default."""
        try:
            existing = conninfo_to_dict(self.url).get("options", "")
        except psycopg.ProgrammingError as exc:
            raise DatabaseError(f"not a valid PostgreSQL URL: {first_line(exc)}") from exc
        translate = {} if self.schema == DEFAULT_SCHEMA else {"schema_translate_map": {DEFAULT_SCHEMA: self.schema}}
        return sa.create_engine(sqlalchemy_url(self.url), connect_args={"options": self.placement.connect_options(existing)},
                                execution_options=translate, **kwargs)

    @property
    def head(self) -> str:
        """The newest migration shipped with this imgdb."""
        return imgdb_migrations.HEAD

    def revision(self) -> str | None:
        """The revision imgdb's schema is at (None before the first migration): alembic's version
        table, read by one plain query."""
        table = f'"{self.schema}".alembic_version'
        with self.connect() as conn:
            if conn.execute(sa.text("SELECT to_regclass(:table)"), {"table": table}).scalar() is None:
                return None
            return conn.execute(sa.text(f"SELECT version_num FROM {table}")).scalar()

    def upgrade(self, *, only_if_needed: bool = False) -> bool:
        """Apply pending migrations; returns whether any ran here.

        Run automatically on first use, so checking must be cheap: one query when the schema is current.
        """
        before = self.revision()
        if only_if_needed and before == self.head:
            return False
        from alembic import command

        try:
            with self.engine.begin() as conn:
                command.upgrade(alembic_config(conn, self.schema), "head")
                if before != self.head:
                    self._say_where_settings_hold(conn)
            # Pooled connections predate database-level settings a migration made (ALTER DATABASE).
            self.engine.dispose()
        except sa.exc.OperationalError as exc:
            raise DatabaseError(f"cannot migrate the database: {first_line(exc.orig)}") from exc
        except (sa.exc.ProgrammingError, sa.exc.InternalError, sa.exc.IntegrityError) as exc:
            raise DatabaseError(f"cannot migrate imgdb's schema {self.schema!r}: {first_line(exc.orig)}") from exc
        return before != self.head

    @staticmethod
    def _say_where_settings_hold(conn: Connection) -> None:
        """Once, when the schema is made: whether pgvector's iterative scans are the database's
        default (``ALTER DATABASE``, which needs its owner) or only set on imgdb's own sessions."""
        database_wide = conn.execute(sa.text(
            "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
            " WHERE d.datname = current_database() AND s.setrole = 0"
            " AND 'hnsw.iterative_scan=strict_order' = ANY (s.setconfig))")).scalar()
        if not database_wide:
            log.warning("this role cannot ALTER DATABASE, so imgdb sets hnsw.iterative_scan = strict_order on its own "
                        "sessions only: run SET hnsw.iterative_scan = strict_order in your own filtered vector queries")

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection, with unreachable servers turned into a one-line error."""
        try:
            conn = self.engine.connect()
        except sa.exc.OperationalError as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {first_line(exc.orig)}") from exc
        with conn:
            yield conn

    @cached_property
    def search_engine(self) -> Engine:
        """A second pool, of autocommit connections with pgvector's types registered, whose raw
        psycopg connections serve the search path (:mod:`imgdb.db.search`): no transaction round
        trips, no execution layer, no pre-ping (:meth:`searching` retries on a dropped connection
        instead of paying a round trip per query)."""
        engine = self._engine(isolation_level="AUTOCOMMIT", pool_size=8, max_overflow=24)
        sa.event.listen(engine, "connect", lambda dbapi_connection, _record: register_vector(dbapi_connection))
        return engine

    def searching(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work`` on a pooled search connection. A connection the server dropped (a restart)
        is discarded and the work runs once more on a fresh one; any other failure is final."""
        for attempt in (1, 2):
            try:
                pooled = self.search_engine.raw_connection()
            except sa.exc.OperationalError as exc:
                raise DatabaseError(f"cannot connect to PostgreSQL: {first_line(exc.orig)}") from exc
            try:
                return work(pooled.driver_connection)
            except psycopg.OperationalError as exc:
                # Only a lost connection (a server restart) is worth a second try on a fresh one; a
                # statement that was cancelled (statement_timeout) or refused would fail again.
                if not pooled.driver_connection.broken and not pooled.driver_connection.closed:
                    raise DatabaseError(f"search failed: {first_line(exc)}") from exc
                pooled.invalidate()
                if attempt == 2:
                    raise DatabaseError(f"search failed: {first_line(exc)}") from exc
            finally:
                pooled.close()
        raise AssertionError("unreachable")

    def writing(self, work: Callable[[Connection], T], attempts: int = 3) -> T:
        """Run ``work`` in a transaction of its own, again (on a fresh transaction) when PostgreSQL
        broke a deadlock or a serialisation conflict by aborting it: concurrent writers of the same
        images may meet that way, and the retry is what the server asks of the loser."""
        for attempt in range(1, attempts + 1):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except sa.exc.OperationalError as exc:
                if not lost_to_a_conflict(exc) or attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session that commits on success and rolls back on error."""
        with self.sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        if "search_engine" in self.__dict__:
            self.__dict__.pop("search_engine").dispose()
        self.engine.dispose()
