"""Which PostgreSQL imgdb talks to, the connections on it, and keeping its schema current.

Two kinds of connection: the search path's plain psycopg ones (:mod:`imgdb.db.pool`), and a
SQLAlchemy engine for everything that writes, made on first use: a process that only searches
checks the schema's revision and runs its queries without ever importing SQLAlchemy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import conninfo_to_dict

import imgdb_migrations

from imgdb import lazy
from imgdb.config import Settings
from imgdb.db.embedded import EmbeddedServer
from imgdb.db.pool import ConnectionPool
from imgdb.db.schema import DEFAULT_SCHEMA, ITERATIVE_SCAN_IS_DEFAULT, check_schema, place
from imgdb.errors import ConcurrentChange, DatabaseError, ImgdbError, first_line

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session, sessionmaker
else:
    sa = lazy.module("sqlalchemy")

T = TypeVar("T")
#: The engine's execution option that tells the database layer's writers whether imgdb's tables are
#: distributed over a Citus cluster (:func:`imgdb.db.cluster.distributed`).
DISTRIBUTED = "imgdb_distributed"
log = logging.getLogger("imgdb")


_URL_PREFIXES = ("postgresql+psycopg://", "postgresql://", "postgres://")


def sqlalchemy_url(url: str) -> str:
    """Point a plain ``postgresql://`` URL at the psycopg 3 driver."""
    return "postgresql+psycopg://" + _after_scheme(url)


def libpq_url(url: str) -> str:
    """The same URL as libpq (psycopg) takes it: ``postgresql://``."""
    return "postgresql://" + _after_scheme(url)


def _after_scheme(url: str) -> str:
    for prefix in _URL_PREFIXES:
        if url.startswith(prefix):
            return url[len(prefix):]
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


#: The longest imgdb waits for a lock on an application's table at once, and how many times it
#: tries (pausing 0.5, 1, 2... s in between: about 18 s in all) before it gives up.
LOCK_TIMEOUT_S = 0.5
LOCK_TRIES = 6


def lost_to_a_conflict(exc: sa.exc.OperationalError) -> bool:
    """Whether PostgreSQL aborted the transaction to break a deadlock or a serialisation conflict:
    the one failure a writer is asked to retry."""
    return isinstance(exc.orig, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure))


@contextmanager
def bounded_lock_waits(conn: Connection) -> Iterator[None]:
    """Within, ``conn``'s statements wait for no lock longer than LOCK_TIMEOUT_S (they fail instead:
    :func:`kept_waiting`): for work on an application's tables, whose own statements queue behind
    a lock imgdb waits for. (imgdb's own waits, after, are as long as they need.)"""
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{round(LOCK_TIMEOUT_S * 1000)}ms'")
    yield
    conn.exec_driver_sql("SET LOCAL lock_timeout TO DEFAULT")


def kept_waiting(exc: sa.exc.OperationalError) -> bool:
    """Whether a statement gave up waiting for a lock (:func:`bounded_lock_waits`)."""
    return isinstance(exc.orig, psycopg.errors.LockNotAvailable)


class Database:
    """Connections on imgdb's schema in one database, migrated to the current revision.

    ``migrate``: apply pending migrations now (first use). ``create``: install pgvector and the
    schema where they are missing (default: when migrating); without it nothing is written.
    """

    def __init__(self, url: str, *, schema: str = DEFAULT_SCHEMA, migrate: bool = True,
                 create: bool | None = None, read_url: str | None = None) -> None:
        self.url = url
        #: A read replica of ``url`` that searches read from (None: they read ``url``).
        self.read_url = read_url
        self.schema = check_schema(schema)
        self.placement = place(url, self.schema, create=migrate if create is None else create)
        self._options = self._connect_options(url)
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        #: The search path's connections (:meth:`searching`), on the replica where there is one.
        self.search_pool = ConnectionPool(lambda: self._search_connection(read_url or url))
        #: Plain connections on the primary, for reads that must see the latest writes.
        self.primary_pool = ConnectionPool(lambda: self._search_connection(url)) if read_url else self.search_pool
        if migrate:
            self.upgrade(only_if_needed=True)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, migrate: bool = True,
                      create: bool | None = None) -> Database:
        """The configured database: ``IMGDB_DATABASE_URL``, else the embedded server (started on demand)."""
        settings = settings or Settings.from_env()
        url = settings.database_url or EmbeddedServer(settings.home).start()
        return cls(url, schema=settings.schema, migrate=migrate, create=create, read_url=settings.read_database_url)

    def _connect_options(self, url: str) -> str:
        """libpq ``options`` of connections to ``url``: the URL's own, then imgdb's schema and
        settings (:mod:`imgdb.db.schema`)."""
        try:
            existing = conninfo_to_dict(url).get("options", "")
        except psycopg.ProgrammingError as exc:
            raise DatabaseError(f"not a valid PostgreSQL URL: {first_line(exc)}") from exc
        return self.placement.connect_options(existing)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine of everything but the search path, made (and SQLAlchemy imported)
        on first use, once even when the web server's threads ask at the same moment. ORM and Core
        statements name the models' schema, translated where ``IMGDB_SCHEMA`` is not the default."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    options = {} if self.schema == DEFAULT_SCHEMA else {
                        "schema_translate_map": {DEFAULT_SCHEMA: self.schema}}
                    # The database layer's writers ask it whether the tables are distributed.
                    options[DISTRIBUTED] = self.placement.distributed
                    # A writer's transaction on a Citus cluster touches sharded tables and the reference
                    # tables of the registry (an index's count of writes) in turn: Citus allows that
                    # only over one connection per worker.
                    sequential = " -c citus.multi_shard_modify_mode=sequential" if self.placement.citus else ""
                    self._engine = sa.create_engine(sqlalchemy_url(self.url),
                                                    connect_args={"options": self._options + sequential},
                                                    execution_options=options, pool_pre_ping=True)
        return self._engine

    @property
    def distributed(self) -> bool:
        """Whether imgdb's tables are distributed over a Citus cluster (:mod:`imgdb.db.cluster`)."""
        return self.placement.distributed

    def look_again(self) -> None:
        """Read where imgdb lives again (its tables were distributed meanwhile), and start every
        connection afresh with what that changes."""
        self.placement = place(self.url, self.schema, create=False)
        self._options = self._connect_options(self.url)
        self.dispose()
        self._engine = None
        self.__dict__.pop("sessions", None)  # (made on the old engine)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        from sqlalchemy.orm import sessionmaker

        return sessionmaker(self.engine, expire_on_commit=False)

    def _search_connection(self, url: str) -> psycopg.Connection:
        """A new search connection: autocommit (no transaction round trips), pgvector's types
        registered once pgvector is installed (a schema not migrated yet may lack it)."""
        options = self._options if url == self.url else self._connect_options(url)
        conn = psycopg.connect(libpq_url(url), autocommit=True, options=options)
        if self.placement.extension_schema is not None:
            register_vector(conn)
        return conn

    @property
    def head(self) -> str:
        """The newest migration shipped with this imgdb."""
        return imgdb_migrations.HEAD

    def revision(self) -> str | None:
        """The revision imgdb's schema is at (None before the first migration): alembic's version
        table, read by one plain query."""
        table = f'"{self.schema}".alembic_version'

        def read(conn: psycopg.Connection) -> str | None:
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
                return None
            row = conn.execute(f"SELECT version_num FROM {table}").fetchone()
            return None if row is None else row[0]

        return self.searching(read, primary=True)

    def replica_status(self) -> dict[str, Any]:
        """What ``imgdb db status`` says of the read replica: whether it is one (a standby), and how
        far behind the primary its replay is (seconds since the last transaction it replayed)."""
        standby, behind = self.searching(lambda conn: conn.execute(
            "SELECT pg_is_in_recovery(), extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8").fetchone())
        return {"standby": standby, "replay_lag_s": None if behind is None else round(behind, 3)}

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
            # Pooled connections, of both kinds, predate database-level settings a migration made
            # (ALTER DATABASE).
            self.dispose()
        except sa.exc.OperationalError as exc:
            raise DatabaseError(f"cannot migrate the database: {first_line(exc.orig)}") from exc
        except (sa.exc.ProgrammingError, sa.exc.InternalError, sa.exc.IntegrityError) as exc:
            raise DatabaseError(f"cannot migrate imgdb's schema {self.schema!r}: {first_line(exc.orig)}") from exc
        return before != self.head

    @staticmethod
    def _say_where_settings_hold(conn: Connection) -> None:
        """Once, when the schema is made: whether pgvector's iterative scans are the database's
        default (``ALTER DATABASE``, which needs its owner) or only set on imgdb's own sessions."""
        if not conn.execute(sa.text(ITERATIVE_SCAN_IS_DEFAULT)).scalar():
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

    def searching(self, work: Callable[[psycopg.Connection], T], *, primary: bool = False) -> T:
        """Run ``work`` on a pooled search connection: on the read replica where there is one, unless
        ``primary`` (a read that must see what was just written). A connection the server dropped (a
        restart) is discarded and the work runs once more on a fresh one; any other failure is final."""
        for attempt in (1, 2):
            with (self.primary_pool if primary else self.search_pool).connection() as conn:
                try:
                    return work(conn)
                except psycopg.errors.UndefinedTable as exc:
                    # (The registry named an index whose tables a drop removed before the search read them.)
                    raise ConcurrentChange(f"the index changed while it was searched ({first_line(exc)}): "
                                           "ask again") from exc
                except psycopg.OperationalError as exc:
                    # Only a lost connection (a server restart) is worth a second try on a fresh one; a
                    # statement that was cancelled (statement_timeout) or refused would fail again.
                    if (not conn.broken and not conn.closed) or attempt == 2:
                        raise DatabaseError(f"search failed: {first_line(exc)}") from exc
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

    def beside_the_application(self, work: Callable[[Connection], T], what: str) -> T:
        """Run ``work``, which locks an application's table, in a transaction of its own that waits
        for a lock at most LOCK_TIMEOUT_S: while imgdb waits, the application's own statements on
        the table queue behind it, so it lets go, pauses (doubling) and tries again, LOCK_TRIES
        times, then says why it gave up. The application never waits on imgdb longer than that."""
        pause, waited = LOCK_TIMEOUT_S, 0.0
        for attempt in range(1, LOCK_TRIES + 1):
            try:
                with self.engine.begin() as conn, bounded_lock_waits(conn):
                    return work(conn)
            except sa.exc.OperationalError as exc:
                if not kept_waiting(exc):
                    raise
                waited += LOCK_TIMEOUT_S
                if attempt == LOCK_TRIES:
                    raise ImgdbError(f"{what}: the application holds its table (a transaction left open?); imgdb "
                                     f"tried {LOCK_TRIES} times over {waited:.0f} s, never making it wait more than "
                                     f"{LOCK_TIMEOUT_S} s: try again once that transaction ends") from None
                time.sleep(pause)
                waited, pause = waited + pause, pause * 2
        raise AssertionError("unreachable")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session that commits on success and rolls back on error."""
        with self.sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.search_pool.close()
        self.primary_pool.close()
        if self._engine is not None:
            self._engine.dispose()
