"""Which PostgreSQL imgdb talks to, the SQLAlchemy engine on it, and keeping its schema current."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TypeVar

import psycopg
import sqlalchemy as sa
from alembic import command
from pgvector.psycopg import register_vector
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from imgdb.config import Settings
from imgdb.db.embedded import EmbeddedServer
from imgdb.errors import DatabaseError

T = TypeVar("T")

#: Serialises concurrent first-use migrations from several processes (an arbitrary, fixed key).
_MIGRATION_LOCK = 0x1D6DB


def sqlalchemy_url(url: str) -> str:
    """Point a plain ``postgresql://`` URL at the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise DatabaseError(f"not a PostgreSQL URL: {url.split('@')[-1]!r}")


def alembic_config(connection: Connection | None = None) -> Config:
    """An alembic config over the installed migrations, optionally bound to an open connection."""
    config = Config()
    config.set_main_option("script_location", str(Path(str(resources.files("imgdb_migrations")))))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _reason(exc: BaseException) -> str:
    """The first line of a driver error: psycopg adds hints on further lines, and imgdb's
    failures are one line (CONVENTIONS.md)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Database:
    """An engine on imgdb's database, with its schema migrated to the current revision."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine: Engine = sa.create_engine(sqlalchemy_url(url), pool_pre_ping=True)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.upgrade(only_if_needed=True)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, migrate: bool = True) -> Database:
        """The configured database: ``IMGDB_DATABASE_URL``, else the embedded server (started on demand)."""
        settings = settings or Settings.from_env()
        url = settings.database_url or EmbeddedServer(settings.home).start()
        return cls(url, migrate=migrate)

    @cached_property
    def head(self) -> str | None:
        """The newest migration shipped with this imgdb."""
        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    def revision(self) -> str | None:
        """The schema revision the database is at (None before the first migration)."""
        with self.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def upgrade(self, *, only_if_needed: bool = False) -> bool:
        """Apply pending migrations; returns whether anything ran.

        Run automatically on first use, so checking must be cheap: one query when the schema is current.
        """
        if only_if_needed and self.revision() == self.head:
            return False
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
                if MigrationContext.configure(conn).get_current_revision() == self.head:
                    return False
                command.upgrade(alembic_config(conn), "head")
            # Pooled connections predate database-level settings a migration made (ALTER DATABASE).
            self.engine.dispose()
        except sa.exc.OperationalError as exc:
            raise DatabaseError(f"cannot migrate the database: {_reason(exc.orig)}") from exc
        except sa.exc.ProgrammingError as exc:
            raise DatabaseError(
                f"cannot migrate the database (does the server have pgvector?): {_reason(exc.orig)}"
            ) from exc
        return True

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection, with unreachable servers turned into a one-line error."""
        try:
            conn = self.engine.connect()
        except sa.exc.OperationalError as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {_reason(exc.orig)}") from exc
        with conn:
            yield conn

    @cached_property
    def search_engine(self) -> Engine:
        """A second pool, of autocommit connections with pgvector's types registered, whose raw
        psycopg connections serve the search path (:mod:`imgdb.db.search`): no transaction round
        trips, no execution layer, no pre-ping (:meth:`searching` retries on a dropped connection
        instead of paying a round trip per query)."""
        engine = sa.create_engine(sqlalchemy_url(self.url), isolation_level="AUTOCOMMIT", pool_size=8, max_overflow=24)
        sa.event.listen(engine, "connect", lambda dbapi_connection, _record: register_vector(dbapi_connection))
        return engine

    def searching(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work`` on a pooled search connection. A connection the server dropped (a restart)
        is discarded and the work runs once more on a fresh one."""
        for attempt in (1, 2):
            try:
                pooled = self.search_engine.raw_connection()
            except sa.exc.OperationalError as exc:
                raise DatabaseError(f"cannot connect to PostgreSQL: {_reason(exc.orig)}") from exc
            try:
                return work(pooled.driver_connection)
            except psycopg.OperationalError as exc:
                pooled.invalidate()
                if attempt == 2:
                    raise DatabaseError(f"search failed: {_reason(exc)}") from exc
            finally:
                pooled.close()
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
