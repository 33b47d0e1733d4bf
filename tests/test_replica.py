"""A read replica (``IMGDB_READ_DATABASE_URL``): a streaming hot standby of a primary, both servers of
:mod:`tests.servers`. Searches read the standby, so that what it has not replayed yet is not found;
writes and migrations go to the primary, which a standby would refuse."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

import imgdb
from imgdb_cli.main import app
from tests import servers


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[servers.Node, servers.Node]]:
    root = tmp_path_factory.mktemp("replica")
    primary = servers.start(root / "primary")
    with psycopg.connect(primary.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE imgdb")
    standby = servers.start_standby(primary, root / "standby")
    yield primary, standby
    standby.stop()
    primary.stop()


def replayed(primary: servers.Node, standby: servers.Node) -> None:
    """Wait until the standby has replayed everything the primary wrote so far."""
    with psycopg.connect(primary.url("imgdb"), autocommit=True) as conn:
        written = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    with psycopg.connect(standby.url("imgdb"), autocommit=True) as conn:
        for _ in range(300):
            if conn.execute("SELECT pg_last_wal_replay_lsn() >= %s", (written,)).fetchone()[0]:
                return
            time.sleep(0.1)
    raise TimeoutError("the standby did not catch up in 30 s")


def test_searches_read_the_replica_and_writes_go_to_the_primary(replicated, client, museum_sample: Path) -> None:  # noqa: ANN001
    primary, standby = replicated
    gallery = sorted((museum_sample / "images").glob("*.jpg"))[:11]
    settings = replace(client.settings, database_url=primary.url("imgdb"), read_database_url=standby.url("imgdb"))
    with imgdb.connect(settings=settings) as db:
        db.create_index("colors", "color:hsv")
        assert db.ingest(gallery[:10], index="colors").added == 10
        replayed(primary, standby)
        assert db.search(gallery[3], index="colors", k=1)[0].uri == str(gallery[3])
        with psycopg.connect(standby.url("imgdb"), autocommit=True) as paused:
            paused.execute("SELECT pg_wal_replay_pause()")
            assert db.ingest([gallery[10]], index="colors").added == 1  # (written to the primary)
            assert db.search(gallery[10], index="colors", k=1)[0].uri != str(gallery[10])  # not replayed yet
            paused.execute("SELECT pg_wal_replay_resume()")
        replayed(primary, standby)
        assert db.search(gallery[10], index="colors", k=1)[0].uri == str(gallery[10])
    result = CliRunner().invoke(app, ["db", "status", "--json"], env={
        "IMGDB_DATABASE_URL": primary.url("imgdb"), "IMGDB_READ_DATABASE_URL": standby.url("imgdb")})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["read_replica"]["standby"] is True
