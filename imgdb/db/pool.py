"""The search path's connections: autocommit psycopg connections, kept open between queries.

A query borrows one, runs its statements (:mod:`imgdb.db.search`) and gives it back; nothing in
between but a lock and a list. Plain psycopg, not SQLAlchemy's pool, so that a process that only
searches never imports SQLAlchemy (:mod:`imgdb.lazy`); and not ``psycopg_pool``, whose connections
are opened by a background worker that keeps retrying an unreachable server until the caller's
timeout, where a search should fail at once with the server's reason.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg.pq import TransactionStatus

from imgdb.errors import DatabaseError, first_line


class ConnectionPool:
    """At most ``most`` connections open at once (callers beyond that wait up to ``timeout``
    seconds), of which up to ``keep`` idle ones are kept for the next query, newest first."""

    def __init__(self, connect: Callable[[], psycopg.Connection], *, keep: int = 8, most: int = 32,
                 timeout: float = 30.0) -> None:
        self._connect = connect
        self._keep = keep
        self._most = most
        self._timeout = timeout
        self._slots = threading.BoundedSemaphore(most)
        self._idle: list[psycopg.Connection] = []
        #: Which :meth:`close` each open connection was made after: older ones are not kept.
        self._generation = 0
        self._born: weakref.WeakKeyDictionary[psycopg.Connection, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A connection for one query's statements; one the statements broke (or left inside a
        transaction) is closed rather than given to the next query."""
        if not self._slots.acquire(timeout=self._timeout):
            raise DatabaseError(f"all {self._most} search connections stayed busy for {self._timeout:.0f} s")
        try:
            conn = self._take()
        except BaseException:
            self._slots.release()
            raise
        try:
            yield conn
        finally:
            self._give_back(conn)
            self._slots.release()

    def _take(self) -> psycopg.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            generation = self._generation
        try:
            conn = self._connect()
        except psycopg.OperationalError as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {first_line(exc)}") from exc
        self._born[conn] = generation
        return conn

    def _give_back(self, conn: psycopg.Connection) -> None:
        usable = not conn.closed and not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE
        with self._lock:
            if usable and len(self._idle) < self._keep and self._born.get(conn) == self._generation:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close every connection: the idle ones now, those in use when they are given back."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for conn in idle:
            conn.close()
