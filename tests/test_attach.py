"""Application tables indexed where they stand: attach, sync, refs in hits and SQL, updates,
deletes, detach, failures with back-off, several workers, killed workers, --watch, and plans.

Every table here is a real table in the session's embedded PostgreSQL, holding real museum
images (as paths, bytes or URLs); imgdb only reads it and gives it triggers.
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from PIL import Image

from imgdb.client import Imgdb
from imgdb.db import images, vectors
from imgdb.errors import ImgdbError
from imgdb.features.registry import DEFAULT_SPEC
from tests.conftest import copy_image, tool_env

COLOR = "color:hsv/bins=4x4x4"


@pytest.fixture(scope="module")
def app_sql(client) -> Iterator[psycopg.Connection]:  # noqa: ANN001
    """The application's own connection to the session database: default search path, autocommit."""
    with psycopg.connect(client.database.url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def gallery(museum: Path) -> list[Path]:
    return sorted((museum / "images").glob("*.jpg"))


def make_table(app_sql: psycopg.Connection, name: str, columns: str) -> str:
    app_sql.execute(f"DROP TABLE IF EXISTS public.{name}")
    app_sql.execute(f"CREATE TABLE public.{name} ({columns})")
    return name


def ids_of(hits: list) -> list[int]:  # noqa: ANN001 - Hit objects
    return [h.id for h in hits]


def test_attach_sync_search_update_delete_detach(client, app_sql, gallery: list[Path], tmp_path: Path) -> None:  # noqa: ANN001
    """The whole life of a table of paths, on the default CNN extractor: each step as a user sees it."""
    client.create_index("shop", DEFAULT_SPEC)
    make_table(app_sql, "products", "id bigint PRIMARY KEY, photo text, owner text NOT NULL")
    # Bytes after the JPEG's end change the content hash, not the pixels: images only this test holds,
    # whatever other tests put in the shared database, so that deleting their rows deletes them.
    paths = [copy_image(gallery[i], tmp_path / f"p{i}.jpg") for i in range(8)]
    for path in paths:
        path.write_bytes(path.read_bytes() + b"test_attach")
    app_sql.execute("INSERT INTO products VALUES (1, %s, 'alice'), (2, %s, 'bob')", (str(paths[0]), str(paths[1])))
    attach = client.attach("products", "photo", index="shop")
    assert (attach.table, attach.index, attach.queued) == ("products", "shop", 2)
    with client.database.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.products'::regclass"
                                    " AND NOT tgisinternal")).scalar() == 4

    # Inserted rows are queued by the triggers and embedded by sync; hits carry the rows' keys.
    app_sql.execute("INSERT INTO products SELECT g, %s || g || '.jpg', 'carol' FROM generate_series(3, 6) g",
                    (str(tmp_path / "p"),))
    app_sql.execute("UPDATE products SET photo = %s WHERE id = 3", (str(paths[2]),))
    for i in (4, 5, 6):
        app_sql.execute("UPDATE products SET photo = %s WHERE id = %s", (str(paths[i - 1]), i))
    report = client.sync("shop")
    assert (report.embedded, report.removed, report.failed, report.queued) == (6, 0, [], 0)
    hit = client.search(paths[1], index="shop", k=1)[0]
    assert (hit.refs, hit.distance < 1e-5) == ((("products", 2),), True)
    assert hit.to_json()["table"] == "products" and hit.to_json()["ref"] == 2
    assert client.sync("shop").embedded == 0  # nothing queued: nothing done

    # An update of other columns queues nothing; an update of the image re-embeds the row.
    app_sql.execute("UPDATE products SET owner = 'dave' WHERE id = 1")
    assert client.sync_status("shop")[0]["queued"] == 0
    app_sql.execute("UPDATE products SET photo = %s WHERE id = 1", (str(paths[7]),))
    assert client.sync("shop").embedded == 1
    assert client.search(paths[7], index="shop", k=1)[0].refs == (("products", 1),)
    old = client.search(paths[0], index="shop", k=1)[0]
    assert old.uri != str(paths[0]) and old.distance > 1e-3  # the old image left the index

    # A deleted row never comes back, and the image only it held is gone from the database.
    app_sql.execute("DELETE FROM products WHERE id = 2")
    report = client.sync("shop")
    assert (report.removed, report.embedded) == (1, 0)
    assert all(("products", 2) not in h.refs for h in client.search(paths[1], index="shop", k=10))
    with client.database.connect() as conn:
        assert images.ids_by_hash(conn, [store_sha(paths[1])]) == {}

    # Detach: triggers, queue, refs, failures and the images only the table held all go; the table stays.
    app_sql.execute("INSERT INTO products VALUES (99, '/no/such/file.jpg', 'eve')")
    detached = client.detach("products")
    assert (detached.index, detached.removed, detached.queued) == ("shop", 5, 1)
    with client.database.connect() as conn:
        left = conn.execute(sa.text(
            "SELECT (SELECT count(*) FROM sources) + (SELECT count(*) FROM refs) + (SELECT count(*) FROM queue)"
            " + (SELECT count(*) FROM failures WHERE source_id NOT IN (SELECT id FROM sources))"
            " + (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.products'::regclass AND NOT tgisinternal)"
            " + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'enqueue%')")).scalar()
        assert left == 0
        assert vectors.count(conn, client.index("shop")) == 0
        assert images.ids_by_hash(conn, [store_sha(p) for p in paths]) == {}
    assert app_sql.execute("SELECT count(*) FROM products").fetchone()[0] == 6
    with pytest.raises(ImgdbError, match="not attached"):
        client.detach("products")


def store_sha(path: Path) -> str:
    from imgdb.io.reader import sha256_hex

    return sha256_hex(path.read_bytes())


def test_bytes_uuid_keys_urls_and_failures_with_back_off(client, app_sql, gallery: list[Path], http_root,
                                                          tmp_path: Path) -> None:  # noqa: ANN001
    """Images as bytea under uuid keys, and as URLs; rows that cannot be embedded are kept with
    their reasons, retried with back-off, never holding up the rest."""
    client.create_index("blobs", COLOR)
    make_table(app_sql, "scans", "id uuid PRIMARY KEY, image bytea")
    keys = [uuid.UUID(int=i + 1) for i in range(5)]
    rows = [(keys[i], gallery[50 + i].read_bytes() + b"test_attach") for i in range(3)]  # (this test's own content)
    rows += [(keys[3], b"not an image at all"), (keys[4], None)]
    for key, data in rows:
        app_sql.execute("INSERT INTO scans VALUES (%s, %s)", (key, data))
    assert client.attach("scans", "image", index="blobs").queued == 5
    report = client.sync("blobs")
    assert report.embedded == 3 and report.removed == 0
    assert [(f.ref, "not an image" in f.error) for f in report.failed] == [(str(keys[3]), True)]
    hit = client.search(gallery[51], index="blobs", k=1)[0]
    assert hit.refs == (("scans", str(keys[1])),) and hit.uri == f"table:scans/{keys[1]}"

    # The web page's thumbnails and originals come from the table, while it still holds that image.
    from fastapi.testclient import TestClient

    from imgdb.web.app import create_app

    with TestClient(create_app(client)) as http:
        assert http.get(f"/images/{hit.id}/thumbnail").headers["content-type"] == "image/jpeg"
        original = http.get(f"/images/{hit.id}")
        assert original.status_code == 200 and original.content == rows[1][1]
        app_sql.execute("UPDATE scans SET image = %s WHERE id = %s", (gallery[59].read_bytes(), keys[1]))
        assert http.get(f"/images/{hit.id}").status_code == 404  # changed, not synced yet: not served
    client.sync("blobs")

    # The failure is listed with its reason, and waits out its back-off.
    [failure] = client.sync_failures("blobs")
    assert failure["ref"] == str(keys[3]) and failure["attempts"] == 1 and failure["retry_at"]
    assert client.sync("blobs").embedded == 0
    app_sql.execute("UPDATE scans SET image = %s WHERE id = %s", (gallery[60].read_bytes(), keys[3]))
    assert client.sync("blobs").embedded == 1 and client.sync_failures("blobs") == []
    # A row whose new image cannot be read leaves the index, rather than showing its old image.
    app_sql.execute("UPDATE scans SET image = 'broken'::bytea WHERE id = %s", (keys[0],))
    assert [f.ref for f in client.sync("blobs").failed] == [str(keys[0])]
    assert all(("scans", str(keys[0])) not in h.refs for h in client.search(gallery[50], index="blobs", k=5))

    # URLs go through the guarded fetcher: loopback is refused, per row, unless allowed.
    client.create_index("linked", COLOR)
    base, folder = http_root
    copy_image(gallery[70], folder / "linked.jpg")
    make_table(app_sql, "links", "id serial PRIMARY KEY, url text")
    app_sql.execute("INSERT INTO links (url) VALUES (%s), (%s), (%s)",
                    (f"{base}/linked.jpg", "file:///etc/passwd", "relative/path.jpg"))
    client.attach("links", "url", index="linked")
    report = client.sync("linked")
    errors = {f.ref: f.error for f in report.failed}
    assert report.embedded == 0 and "loopback" in errors[1] and "not an http(s) URL" in errors[2]
    assert "--root" in errors[3]
    trusting = Imgdb(client.database, replace(client.settings, fetch=replace(client.settings.fetch,
                                                                             allow_private=True)))
    assert trusting.sync("linked").embedded == 0  # back-off: not due yet
    retried = trusting.sync("linked", retry_failed=True)
    assert retried.embedded == 1 and len(retried.failed) == 2
    assert [f["attempts"] for f in trusting.sync_failures("linked")] == [2, 2]
    client.detach("scans")
    client.detach("links")


def test_relative_paths_resolve_under_the_root_and_never_outside(client, app_sql, gallery: list[Path],
                                                                 tmp_path: Path) -> None:  # noqa: ANN001
    root = tmp_path / "media"
    copy_image(gallery[80], root / "a" / "x.jpg")
    copy_image(gallery[81], tmp_path / "outside.jpg")
    (root / "sneaky.jpg").symlink_to(tmp_path / "outside.jpg")
    client.create_index("rooted", COLOR)
    make_table(app_sql, "media", "name text PRIMARY KEY, path text")
    app_sql.execute("INSERT INTO media VALUES ('ok', 'a/x.jpg'), ('up', '../outside.jpg'), ('link', 'sneaky.jpg'),"
                    " ('abs', %s)", (str(tmp_path / "outside.jpg"),))
    client.attach("media", "path", index="rooted", root=root)
    report = client.sync("rooted")
    assert report.embedded == 1
    assert sorted(f.ref for f in report.failed) == ["abs", "link", "up"]
    assert all("outside the attached root" in f.error for f in report.failed)
    assert client.search(gallery[80], index="rooted", k=1)[0].refs == (("media", "ok"),)
    client.detach("media")


def test_attach_refuses_what_it_cannot_follow(client, app_sql) -> None:  # noqa: ANN001
    make_table(app_sql, "nokey", "path text")
    make_table(app_sql, "pairs", "a int, b int, path text, PRIMARY KEY (a, b)")
    make_table(app_sql, "numbers", "id int PRIMARY KEY, path int, label text")
    app_sql.execute("CREATE OR REPLACE VIEW public.a_view AS SELECT * FROM numbers")
    client.create_index("refusals", COLOR)
    cases = [("nokey", "path", None, "no primary key"), ("pairs", "path", None, "composite primary key (a, b)"),
             ("numbers", "path", None, "must hold a file path"), ("numbers", "missing", None, "no column 'missing'"),
             ("numbers", "label", "label", "not unique"), ("a_view", "label", "id", "not a table"),
             ("nowhere", "path", None, "no table 'nowhere'"), ("imgdb.images", "uri", None, "imgdb's own"),
             ("a.b.c", "x", None, "SCHEMA.TABLE")]
    for table, column, key, reason in cases:
        with pytest.raises(ImgdbError, match=re.escape(reason)):
            client.attach(table, column, key=key, index="refusals")
    make_table(app_sql, "twice", "id int PRIMARY KEY, path text, other text")
    assert client.attach("twice", "path", index="refusals").queued == 0
    assert client.attach("twice", "path", index="refusals").queued == 0  # the same again: nothing changes
    with pytest.raises(ImgdbError, match="attached to index 'refusals' already"):
        client.attach("twice", "other", index="refusals")
    client.detach("twice")


def tiny_pngs(n: int, seed: int = 0) -> list[bytes]:
    """Small, real, distinct PNGs (random colour blocks), for tables of thousands of rows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def catalog(client, app_sql) -> tuple[str, int]:  # noqa: ANN001
    """An application table of 3000 rows with images (bytea), attached and synced: (index, rows)."""
    rows = 3000
    client.create_index("catalog", COLOR)
    make_table(app_sql, "items", "id int PRIMARY KEY, owner text NOT NULL, picture bytea")
    with app_sql.cursor().copy("COPY items (id, owner, picture) FROM STDIN") as copy:
        for i, data in enumerate(tiny_pngs(rows), start=1):
            copy.write_row((i, "alice" if i % 10 == 0 else "bob", data))
    client.attach("items", "picture", index="catalog")
    report = client.sync("catalog")
    assert report.embedded == rows and not report.failed
    app_sql.execute("ANALYZE items")
    with client.database.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return "catalog", rows


def test_application_sql_joins_its_table_and_the_hnsw_index_serves_it(client, app_sql, catalog) -> None:  # noqa: ANN001
    name, _ = catalog
    view = client.index(name).relation
    query = "[" + ",".join(f"{x:.6g}" for x in client.embed("id:" + str(client.search(
        np.full(64, 0.125, np.float32), index=name, k=1)[0].id), index=name)) + "]"
    sql = (f"SELECT p.* FROM items p JOIN imgdb.{view} v ON v.ref = p.id WHERE p.owner = 'alice'"
           f" ORDER BY v.embedding <-> '{query}' LIMIT 10")
    app_sql.execute("SET hnsw.iterative_scan = strict_order")
    plan = "\n".join(row[0] for row in app_sql.execute("EXPLAIN " + sql))
    assert f"Index Scan using {client.index(name).ann_index}" in plan, plan
    rows = app_sql.execute(sql).fetchall()
    assert len(rows) == 10 and all(row[1] == "alice" for row in rows)
    # The view alone, as CONVENTIONS' SQL contract queries it, is served by the index too.
    plain = "\n".join(row[0] for row in app_sql.execute(
        f"EXPLAIN SELECT id, uri FROM imgdb.{view} ORDER BY embedding <-> '{query}' LIMIT 10"))
    assert f"Index Scan using {client.index(name).ann_index}" in plain, plain
    # Nearly the same ten as brute force in numpy over every alice row (HNSW is approximate).
    with client.database.connect() as conn:
        ids, stored = vectors.read(conn, client.index(name))
        refs = dict(conn.execute(sa.text("SELECT image_id, ref::int FROM refs r JOIN sources s ON s.id = r.source_id"
                                         " WHERE s.index_id = :i"), {"i": client.index(name).id}).all())
    q = np.asarray(json.loads(query), np.float32)
    order = [refs[i] for i in ids[np.argsort(np.linalg.norm(stored - q, axis=1), kind="stable")]
             if refs[i] % 10 == 0]
    assert len({row[0] for row in rows} & set(order[:10])) >= 8, ([row[0] for row in rows], order[:10])


def test_similar_gives_more_like_this_in_sql(client, app_sql, catalog) -> None:  # noqa: ANN001
    name, _ = catalog
    rows = app_sql.execute("SELECT ref, distance FROM imgdb.similar(%s, 7, 5)", (name,)).fetchall()
    assert len(rows) == 5 and 7 not in [r[0] for r in rows] and isinstance(rows[0][0], int)
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)
    hits = client.search(f"id:{client_image_of(client, name, 7)}", index=name, k=6)
    assert [h.refs[0][1] for h in hits[1:]] == [r[0] for r in rows]
    assert app_sql.execute("SELECT count(*) FROM imgdb.similar(%s, 123456, 5)", (name,)).fetchone()[0] == 0
    with pytest.raises(psycopg.errors.UndefinedObject):
        app_sql.execute("SELECT * FROM imgdb.similar('no_such_index', 1)")


def client_image_of(client, index: str, ref: int) -> int:  # noqa: ANN001
    with client.database.connect() as conn:
        return conn.execute(sa.text("SELECT r.image_id FROM refs r JOIN sources s ON s.id = r.source_id"
                                    " WHERE s.index_id = :i AND r.ref = :r"),
                            {"i": client.index(index).id, "r": str(ref)}).scalar_one()


def test_truncate_and_bulk_changes_are_followed(client, app_sql, catalog) -> None:  # noqa: ANN001
    """A batched UPDATE and DELETE of hundreds of rows queue each changed row once, in one statement."""
    name, rows = catalog
    app_sql.execute("UPDATE items SET picture = picture || ''::bytea WHERE id <= 100")  # same bytes: unchanged
    app_sql.execute("UPDATE items SET owner = 'carol' WHERE id <= 500")                 # not the image
    fresh = tiny_pngs(200, seed=1)
    with app_sql.transaction():
        for i, data in enumerate(fresh, start=1):
            app_sql.execute("UPDATE items SET picture = %s WHERE id = %s", (data, i))
    app_sql.execute("DELETE FROM items WHERE id > %s", (rows - 300,))
    report = client.sync(name)
    assert (report.embedded, report.removed) == (200, 300)
    assert client.sync_status(name)[0]["done"] == rows - 300


def test_two_workers_embed_each_row_once(client, app_sql, gallery: list[Path]) -> None:  # noqa: ANN001
    """Two `imgdb sync` processes on one queue of 192 rows (three claims of the CNN's 64): both work,
    and every row is embedded exactly once."""
    rows = 192
    client.create_index("pair", DEFAULT_SPEC)
    make_table(app_sql, "twin", "id int PRIMARY KEY, path text")
    for i, path in enumerate(gallery[:rows]):
        app_sql.execute("INSERT INTO twin VALUES (%s, %s)", (i, str(path)))
    client.attach("twin", "path", index="pair")
    command = [str(Path(sys.executable).parent / "imgdb"), "sync", "--index", "pair", "--json"]
    workers = [subprocess.Popen(command, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    reports = [json.loads(w.communicate(timeout=300)[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    assert sum(r["embedded"] for r in reports) == rows and all(r["embedded"] > 0 for r in reports), reports
    with client.database.connect() as conn:
        assert vectors.count(conn, client.index("pair")) == rows
    assert client.sync_status("pair")[0]["done"] == rows
    client.detach("twin")


def test_a_killed_worker_loses_nothing(client, app_sql, gallery: list[Path]) -> None:  # noqa: ANN001
    client.create_index("killed_sync", COLOR)
    make_table(app_sql, "fragile", "id int PRIMARY KEY, path text")
    for i, path in enumerate(gallery):
        app_sql.execute("INSERT INTO fragile VALUES (%s, %s)", (i, str(path)))
    client.attach("fragile", "path", index="killed_sync")
    worker = subprocess.Popen([str(Path(sys.executable).parent / "imgdb"), "sync", "--index", "killed_sync"],
                              env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while client.sync_status("killed_sync")[0]["done"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    status = client.sync_status("killed_sync")[0]
    assert 0 < status["done"] < len(gallery) and status["done"] + status["queued"] == len(gallery)
    report = client.sync("killed_sync")
    assert report.embedded == len(gallery) - status["done"] and not report.failed
    assert client.sync_status("killed_sync")[0]["done"] == len(gallery)
    client.detach("fragile")


def test_watch_follows_changes_as_they_come(client, app_sql, gallery: list[Path]) -> None:  # noqa: ANN001
    client.create_index("watched", COLOR)
    make_table(app_sql, "live", "id int PRIMARY KEY, path text")
    client.attach("live", "path", index="watched")
    watcher = subprocess.Popen([str(Path(sys.executable).parent / "imgdb"), "sync", "--watch", "--index", "watched",
                                "--json"], env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for i in range(3):
            app_sql.execute("INSERT INTO live VALUES (%s, %s)", (i, str(gallery[120 + i])))
            deadline = time.monotonic() + 60
            while client.sync_status("watched")[0]["done"] < i + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.sync_status("watched")[0]["done"] == i + 1
        app_sql.execute("DELETE FROM live WHERE id = 0")
        deadline = time.monotonic() + 60
        while client.sync_status("watched")[0]["done"] != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    assert json.loads(out) | {"seconds": 0} == {"embedded": 3, "removed": 1, "failed": [], "queued": 0, "seconds": 0}
    client.detach("live")


def test_direct_ingest_and_attached_rows_share_images_without_losing_them(client, app_sql, gallery: list[Path],
                                                                           tmp_path: Path) -> None:  # noqa: ANN001
    """An image both ingested and held by a row stays when the row goes (whichever came first);
    one only the row held goes."""
    client.create_index("shared", COLOR)
    both, later, only_row = gallery[140], gallery[142], gallery[141]
    client.ingest([both], index="shared")
    make_table(app_sql, "mixed", "id int PRIMARY KEY, path text")
    app_sql.execute("INSERT INTO mixed VALUES (1, %s), (2, %s), (3, %s)", (str(both), str(only_row), str(later)))
    client.attach("mixed", "path", index="shared")
    client.sync("shared")
    assert client.ingest([later], index="shared").duplicates == 1  # held by row 3 already; now ingested too
    app_sql.execute("DELETE FROM mixed")
    assert client.sync("shared").removed == 3
    assert client.search(both, index="shared", k=1)[0].distance < 1e-6
    assert client.search(later, index="shared", k=1)[0].distance < 1e-6
    assert client.search(only_row, index="shared", k=1)[0].distance > 1e-6
    client.detach("mixed")


def test_cli_attach_sync_status_and_hits(client, app_sql, gallery: list[Path]) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from imgdb_cli.main import app

    runner = CliRunner()

    def run(*args: str):  # noqa: ANN202
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.stderr or result.output
        return json.loads(result.stdout)

    client.create_index("cli_attach", COLOR)
    make_table(app_sql, "cli_photos", "id int PRIMARY KEY, path text")
    app_sql.execute("INSERT INTO cli_photos VALUES (10, %s), (11, '/gone.jpg')", (str(gallery[150]),))
    assert run("attach", "cli_photos", "--column", "path", "--index", "cli_attach") == {
        "table": "cli_photos", "index": "cli_attach", "queued": 2}
    report = run("sync", "--index", "cli_attach")
    assert report["embedded"] == 1 and report["failed"] == [
        {"table": "cli_photos", "ref": 11, "error": "/gone.jpg: No such file or directory"}]
    [status] = run("sync", "--status", "--index", "cli_attach")
    assert (status["table"], status["queued"], status["failed"], status["done"]) == ("cli_photos", 0, 1, 1)
    [hit] = run("search", str(gallery[150]), "--index", "cli_attach", "-k", "1")
    assert (hit["table"], hit["ref"], hit["refs"]) == ("cli_photos", 10, [{"table": "cli_photos", "ref": 10}])
    assert run("detach", "cli_photos") == {"table": "cli_photos", "index": "cli_attach", "queued": 0, "removed": 1}
    result = runner.invoke(app, ["attach", "cli_photos", "--column", "nope", "--index", "cli_attach"])
    assert result.exit_code == 1 and result.stderr.strip() == "error: public.cli_photos has no column 'nope'"


def test_a_broken_table_never_holds_up_the_others_nor_the_application(client, app_sql, gallery: list[Path]) -> None:  # noqa: ANN001
    """Columns renamed under imgdb: the application's writes still succeed (the trigger only warns
    where it cannot read the key), the other attached table still syncs, and sync says what is
    wrong; a dropped table is detached by the name it had."""
    client.create_index("sturdy", COLOR)
    make_table(app_sql, "fine", "id int PRIMARY KEY, path text")
    make_table(app_sql, "broken", "id int PRIMARY KEY, path text")
    client.attach("fine", "path", index="sturdy")
    client.attach("broken", "path", index="sturdy")
    app_sql.execute("INSERT INTO broken VALUES (1, %s)", (str(gallery[160]),))
    app_sql.execute("ALTER TABLE broken RENAME COLUMN path TO picture")
    app_sql.execute("INSERT INTO fine VALUES (1, %s)", (str(gallery[161]),))
    report = client.sync("sturdy")
    assert report.embedded == 1
    assert [(f.table, f.ref) for f in report.failed] == [("broken", None)]
    assert 'column a.path does not exist' in report.failed[0].error, report.failed[0].error
    app_sql.execute("ALTER TABLE broken RENAME COLUMN id TO key")
    notices: list[str] = []
    app_sql.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
    app_sql.execute("INSERT INTO broken VALUES (2, %s)", (str(gallery[162]),))  # still succeeds
    assert any("were not queued" in n for n in notices), notices
    app_sql.execute("DROP TABLE broken")
    with pytest.raises(ImgdbError, match="not attached"):
        client.detach("nowhere")
    assert client.detach("public.broken").index == "sturdy"
    assert client.sync("sturdy").failed == []
    client.detach("fine")


def test_rows_synced_into_an_index_that_verifies_get_their_local_features(client, app_sql, gallery: list[Path],  # noqa: ANN001
                                                                          tmp_path: Path) -> None:
    client.create_index("shop_checked", COLOR)
    client.verify_index("shop_checked", "rootsift/keypoints=100")
    make_table(app_sql, "checked_photos", "id int PRIMARY KEY, photo text")
    paths = [tmp_path / f"c{i}.png" for i in range(2)]
    for i, path in enumerate(paths):
        painting = Image.open(gallery[50 + i])  # cropped PNG copies: content no other test has
        painting.crop((0, 0, painting.width - 5, painting.height - 5)).save(path)
        app_sql.execute("INSERT INTO checked_photos VALUES (%s, %s)", (i, str(path)))
    client.attach("checked_photos", "photo", index="shop_checked")
    assert client.sync("shop_checked").embedded == 2
    hit = client.search(paths[1], index="shop_checked", k=1, rerank="verify")[0]
    assert hit.refs == (("checked_photos", 1),) and hit.notes["verified"]


def test_imgdb_never_makes_the_application_wait(client, app_sql, gallery: list[Path]) -> None:  # noqa: ANN001
    """With a transaction of the application open on its table, `detach` gives up after a bound with
    the reason, and meanwhile the application's SELECT and INSERT on the table never wait longer than
    imgdb's lock timeout; once that transaction ends, detach goes through."""
    import threading

    from imgdb.db.engine import LOCK_TIMEOUT_S

    if "polite" not in {i.name for i in client.indexes()}:
        client.create_index("polite", COLOR, ann="none")
    make_table(app_sql, "busy", "id int PRIMARY KEY, photo text")
    app_sql.execute("INSERT INTO busy VALUES (1, %s)", (str(gallery[0]),))
    client.attach("busy", "photo", index="polite")
    outcome: dict[str, object] = {}

    def detaching() -> None:
        started = time.perf_counter()
        try:
            client.detach("busy")
        except ImgdbError as exc:
            outcome["error"] = str(exc)
        outcome["seconds"] = time.perf_counter() - started

    waits = []
    with psycopg.connect(client.database.url) as holder, \
            psycopg.connect(client.database.url, autocommit=True) as application:
        holder.execute("SELECT count(*) FROM busy")  # (its lock is held until the transaction ends)
        application.execute("SET statement_timeout = '5s'")  # (what the application would bear)
        worker = threading.Thread(target=detaching)
        worker.start()
        n = 2
        while worker.is_alive():
            started = time.perf_counter()
            application.execute("SELECT count(*) FROM busy")
            application.execute("INSERT INTO busy VALUES (%s, NULL)", (n,))
            waits.append(time.perf_counter() - started)
            n += 1
            time.sleep(0.05)
        worker.join()
        holder.rollback()
    assert "holds its table" in str(outcome.get("error")) and "\n" not in str(outcome["error"]), outcome
    assert outcome["seconds"] < 60 and max(waits) < LOCK_TIMEOUT_S + 1.5, (outcome, max(waits))
    assert client.detach("busy").index == "polite"


def test_a_dropped_table_is_detached_by_the_name_sync_status_shows(client, app_sql, gallery: list[Path]) -> None:  # noqa: ANN001
    if "polite" not in {i.name for i in client.indexes()}:
        client.create_index("polite", COLOR, ann="none")
    make_table(app_sql, "dropped", "id int PRIMARY KEY, photo text")
    app_sql.execute("INSERT INTO dropped VALUES (1, %s)", (str(gallery[1]),))
    client.attach("dropped", "photo", index="polite")
    assert client.sync("polite").embedded == 1
    app_sql.execute("INSERT INTO dropped VALUES (2, %s)", (str(gallery[3]),))
    app_sql.execute("DROP TABLE dropped")
    report = client.sync("polite")  # (its queued row: the table is reported, the sync goes on)
    assert [f.error for f in report.failed if "dropped" in f.error], report.failed
    shown = [row["table"] for row in client.sync_status("polite")]
    assert len(shown) == 1
    from typer.testing import CliRunner

    from imgdb_cli.main import app

    result = CliRunner().invoke(app, ["detach", shown[0]])
    assert result.exit_code == 0, result.output
    assert client.sync_status("polite") == []


def test_a_symlink_swapped_during_syncs_never_brings_a_file_from_outside(client, app_sql, gallery: list[Path],  # noqa: ANN001
                                                                        tmp_path: Path) -> None:
    """A row's file is a symlink that a thread keeps pointing inside the root and outside it, as
    fast as it can: over many syncs the row's image is only ever the inside file, or refused."""
    import hashlib
    import os
    import threading

    root = tmp_path / "media"
    inside = copy_image(gallery[90], root / "inside.jpg")
    outside = copy_image(gallery[91], tmp_path / "outside.jpg")
    outside.write_bytes(outside.read_bytes() + b"outside")  # (content no other test holds)
    secret = hashlib.sha256(outside.read_bytes()).hexdigest()
    link = root / "photo.jpg"
    link.symlink_to(inside)
    if "swapped" not in {i.name for i in client.indexes()}:
        client.create_index("swapped", COLOR, ann="none")
    make_table(app_sql, "swaps", "id int PRIMARY KEY, path text")
    app_sql.execute("INSERT INTO swaps VALUES (1, 'photo.jpg')")
    client.attach("swaps", "path", index="swapped", root=root)
    stop = threading.Event()

    def swapping() -> None:
        for n in range(10**9):
            if stop.is_set():
                return
            staged = root / f".next{n % 2}"
            staged.unlink(missing_ok=True)
            staged.symlink_to(outside if n % 2 else inside)
            os.replace(staged, link)  # (atomic: the link always names one of the two)

    worker = threading.Thread(target=swapping)
    worker.start()
    outcomes = []
    try:
        for n in range(40):
            app_sql.execute("UPDATE swaps SET path = %s WHERE id = 1", ("photo.jpg" if n % 2 else "./photo.jpg",))
            report = client.sync("swapped")
            outcomes.append("refused" if report.failed else "embedded")
            with client.database.connect() as conn:
                held = conn.execute(sa.text("SELECT i.sha256 FROM refs r JOIN images i ON i.id = r.image_id"
                                            " JOIN sources s ON s.id = r.source_id WHERE s.relid = 'swaps'::regclass"))
                assert secret not in set(held.scalars()), f"the file outside the root came in at sync {n}"
    finally:
        stop.set()
        worker.join()
    assert "embedded" in outcomes, outcomes
    client.detach("swaps")


def test_a_sync_never_waits_on_a_table_the_application_holds(client, app_sql, gallery: list[Path]) -> None:  # noqa: ANN001
    """An application's transaction holding its table (ALTER TABLE under way): sync says so at once
    and leaves the rows queued; once it commits, the next sync embeds them."""
    if "polite" not in {i.name for i in client.indexes()}:
        client.create_index("polite", COLOR, ann="none")
    make_table(app_sql, "altered", "id int PRIMARY KEY, photo text")
    app_sql.execute("INSERT INTO altered VALUES (1, %s)", (str(gallery[2]),))
    client.attach("altered", "photo", index="polite")
    with psycopg.connect(client.database.url) as holder:
        holder.execute("LOCK TABLE altered IN ACCESS EXCLUSIVE MODE")
        started = time.perf_counter()
        report = client.sync("polite")
        took = time.perf_counter() - started
        holder.rollback()
    assert report.embedded == 0 and [f.error for f in report.failed if "holds" in f.error], report.failed
    assert took < 10, took
    assert client.sync("polite").embedded == 1
    client.detach("altered")
