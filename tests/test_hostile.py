"""Hostile input never costs other items, never gets a 500, never reaches PostgreSQL unescaped.

Each test drives one class of fault (issue 13) through the Python API, the CLI and HTTP, with
cases made by code in :mod:`tests.hostile`, and asserts the exact outcome: the bad item refused
with its reason, every other item committed.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from imgdb.client import Imgdb
from imgdb.web.app import create_app
from imgdb_cli.main import app
from tests.hostile import UNSTORABLE_METADATA, jpeg_with_exif, png
from tests.images import write

COLOR = "color:hsv/bins=4x4x4"
TOKEN = "hostile-token"


def test_text_postgres_cannot_hold_costs_only_its_own_item(client, tmp_path: Path) -> None:  # noqa: ANN001
    """NUL in EXIF is cleaned (the camera is informative); a file name that is not valid UTF-8 and
    metadata JSON cannot hold are refused per image, with the reason; the other images commit."""
    client.create_index("texts", COLOR)
    good = [write(tmp_path / "batch" / f"good_{i}.png", png(i)) for i in range(10)]
    exif = write(tmp_path / "batch" / "exif.jpg", jpeg_with_exif(100, make="Can\x00on", model="EOS\x00 5D"))
    raw_dir = os.fsencode(tmp_path / "batch")
    with open(raw_dir + b"/\xff\xfe.png", "wb") as handle:  # a name with bytes that are not UTF-8
        handle.write(png(101))
    entries = ['"good_0.png": {"ok": true}']
    for i, (text, _) in enumerate(UNSTORABLE_METADATA.values()):
        write(tmp_path / "batch" / f"meta_{i}.png", png(200 + i))
        entries.append(f'"meta_{i}.png": {text}')
    metadata_file = tmp_path / "batch" / "metadata.json"
    metadata_file.write_text("{" + ", ".join(entries) + "}", encoding="utf-8")

    report = client.ingest([tmp_path / "batch"], index="texts", metadata_file=metadata_file)
    failed = {Path(f.path).name: f.error for f in report.failed}
    assert report.added == 11, report.to_json()  # ten good ones and the cleaned EXIF
    assert "not valid UTF-8" in failed.pop("\\xff\\xfe.png")
    for i, (case, (_, words)) in enumerate(UNSTORABLE_METADATA.items()):
        assert words in failed.pop(f"meta_{i}.png"), case
    assert failed == {}
    json.dumps(report.to_json(), ensure_ascii=False).encode("utf-8")  # the report itself prints
    hit = client.search(exif, index="texts", k=1)[0]
    assert hit.distance < 1e-6
    with client.database.connect() as conn:
        camera = conn.exec_driver_sql("SELECT camera FROM images WHERE id = %s", (hit.id,)).scalar()
    assert camera == "Canon EOS 5D"
    assert client.search(good[0], index="texts", k=1)[0].metadata == {"ok": True}


def test_unstorable_meta_for_every_image_is_refused_up_front(client, tmp_path: Path) -> None:  # noqa: ANN001
    runner = CliRunner()
    write(tmp_path / "one.png", png(300))
    client.create_index("refused_meta", COLOR)
    result = runner.invoke(app, ["ingest", str(tmp_path / "one.png"), "--index", "refused_meta", "--meta", "k=a\x00b"])
    assert result.exit_code == 1 and "NUL" in result.stderr and "internal error" not in result.stderr


def test_uploads_with_unstorable_metadata_are_refused_and_leave_no_file(client, tmp_path: Path) -> None:  # noqa: ANN001
    db = Imgdb(client.database, replace(client.settings, api_token=TOKEN))
    client.create_index("uploaded", COLOR)
    uploads = client.settings.home / "uploads"
    before = set(uploads.rglob("*")) if uploads.exists() else set()
    with TestClient(create_app(db)) as http:
        for i, (case, (text, words)) in enumerate(UNSTORABLE_METADATA.items()):
            answer = http.post("/images", headers={"Authorization": f"Bearer {TOKEN}"}, params={"index": "uploaded"},
                               files={"file": ("x.png", png(400 + i), "image/png")}, data={"meta": text})
            assert answer.status_code == 400 and words in answer.json()["error"], (case, answer.text)
        answer = http.post("/images", headers={"Authorization": f"Bearer {TOKEN}"}, params={"index": "uploaded"},
                           files={"file": ("y.jpg", jpeg_with_exif(450, make="Ni\x00kon"), "image/jpeg")})
        assert answer.status_code == 201, answer.text
    after = set(uploads.rglob("*"))
    assert {p.name for p in after - before if p.is_file()} == {Path(answer.json()["uri"]).name}


@pytest.mark.parametrize("query", ["a\x00b", "caf\udce9.jpg"])
def test_search_and_ingest_of_unstorable_names_are_one_line_refusals(client, query: str) -> None:  # noqa: ANN001
    with pytest.raises(Exception) as caught:
        client.search(query, index="default", k=1)
    assert type(caught.value).__name__ in ("ImageReadError", "ImgdbError"), caught.value


def test_a_replaced_file_is_never_served_as_the_image(client, tmp_path: Path) -> None:  # noqa: ANN001
    """Ingest swap/s.jpg, then replace it by a symlink to a secret, or by another picture: the
    original and the thumbnail are refused with the reason, the secret never leaves."""
    client.create_index("swaps", COLOR)
    secret = write(tmp_path / "secret.txt", b"root:x:0:0:the secret\n")
    first = write(tmp_path / "swap" / "s.jpg", jpeg_with_exif(500))
    second = write(tmp_path / "swap" / "t.png", png(501))
    client.ingest([first, second], index="swaps")
    ids = {Path(h.uri).name: h.id for p in (first, second) for h in client.search(p, index="swaps", k=1)}
    with TestClient(create_app(client)) as http:
        assert http.get(f"/images/{ids['s.jpg']}").content == first.read_bytes()
        first.unlink()
        first.symlink_to(secret)
        second.write_bytes(png(502))  # another picture under the same name
        for image_id in ids.values():
            for path in (f"/images/{image_id}", f"/images/{image_id}/thumbnail"):
                answer = http.get(path)
                assert answer.status_code == 404 and b"secret" not in answer.content, (path, answer.content)
                assert "changed since it was ingested" in answer.json()["error"]


def test_a_search_never_builds_an_index(client, museum: Path) -> None:  # noqa: ANN001
    """While a bulk load has the HNSW index dropped, searches answer by exact scan and run no DDL;
    the writer builds it again."""
    from imgdb.db import pgvector

    client.create_index("nobuild", COLOR)
    gallery = sorted((museum / "images").glob("*.jpg"))[:30]
    client.ingest(gallery[:29], index="nobuild")
    with client.database.engine.begin() as conn:
        pgvector.drop_ann(conn, client.index("nobuild"))  # as a bulk load does
    client.catalog.layer.forget()
    hits = client.search(gallery[3], index="nobuild", k=3)
    assert hits[0].distance < 1e-6 and len(hits) == 3
    with client.database.connect() as conn:
        assert not pgvector.has_ann(conn, client.index("nobuild"))
    client.ingest(gallery[29:], index="nobuild")  # a writer: builds it
    with client.database.connect() as conn:
        assert pgvector.has_ann(conn, client.index("nobuild"))


def test_commands_racing_on_a_new_home_all_succeed(tmp_path: Path) -> None:
    """Three imgdb commands at once on a fresh IMGDB_HOME: one makes the server, the others wait
    for it (a file lock), and every one succeeds."""
    import subprocess
    import sys

    from imgdb.db.embedded import EmbeddedServer
    from tests.conftest import tool_env

    home = tmp_path / "fresh"
    env = tool_env(IMGDB_HOME=str(home))
    env.pop("IMGDB_DATABASE_URL", None)
    command = str(Path(sys.executable).parent / "imgdb")
    runs = [subprocess.Popen([command, *args, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for args in (["db", "url"], ["db", "start"], ["index", "list"])]
    try:
        outcomes = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    finally:
        EmbeddedServer(home).stop()
    assert [rc for rc, _, _ in outcomes] == [0, 0, 0], outcomes
    urls = {json.loads(out)["url"] for _, out, _ in outcomes[:2]}
    assert len(urls) == 1 and json.loads(outcomes[2][1]) == []


def test_concurrent_adds_of_the_same_new_image_all_succeed_with_one_row(client) -> None:  # noqa: ANN001
    from concurrent.futures import ThreadPoolExecutor

    db = Imgdb(client.database, replace(client.settings, api_token=TOKEN))
    client.create_index("raced", COLOR)
    data = png(600)
    with TestClient(create_app(db)) as http:
        def add(_: int):  # noqa: ANN202
            return http.post("/images", headers={"Authorization": f"Bearer {TOKEN}"}, params={"index": "raced"},
                             files={"file": ("same.png", data, "image/png")})

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(add, range(20)))
    assert [a.status_code for a in answers] == [201] * 20, [a.text for a in answers if a.status_code != 201]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.json()["added"] for a in answers) == 1
    uploads = client.settings.home / "uploads"
    assert not list(uploads.rglob("*.part"))


def test_a_small_ingest_reads_only_its_own_hashes(client, museum: Path, monkeypatch) -> None:  # noqa: ANN001
    """An upload or a one-file ingest asks PostgreSQL about its own images' hashes, not for every
    hash of the collection."""
    from imgdb.db import images

    client.create_index("lookups", COLOR)
    gallery = sorted((museum / "images").glob("*.jpg"))
    assert client.ingest(gallery[:40], index="lookups").added == 40
    read_all = []
    monkeypatch.setattr(images, "hashes_in_index", lambda *args: read_all.append(args) or set())
    report = client.ingest([gallery[0], gallery[40]], index="lookups")
    assert (report.added, report.duplicates, read_all) == (1, 1, [])


def test_only_a_lost_connection_is_retried(client) -> None:  # noqa: ANN001
    """A search cancelled by statement_timeout fails once, with its reason, on a connection that
    stays usable; it is not run a second time."""
    import psycopg

    from imgdb.errors import DatabaseError

    calls = []

    def slow(conn: psycopg.Connection) -> None:
        calls.append(conn)
        conn.execute("SET statement_timeout = '50ms'")
        try:
            conn.execute("SELECT pg_sleep(2)")
        finally:
            conn.execute("RESET statement_timeout")

    with pytest.raises(DatabaseError, match="statement timeout"):
        client.database.searching(slow)
    assert len(calls) == 1 and not calls[0].broken
    assert client.database.searching(lambda conn: conn.execute("SELECT 1").fetchone()[0]) == 1


def truncated_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


HUGE = "99999999999999999999"
#: (method, path, request options, status, words of the reason): every input a client controls.
REQUESTS = [
    ("post", "/search", {"json": {"id": int(HUGE)}}, 422, "positive integer"),
    ("post", "/search", {"json": {"id": 2**40}}, 404, "not in index"),
    # A JSON field is its declared type, never a file name (`id:-5` in the working directory).
    ("post", "/search", {"json": {"id": -5}}, 422, "id must be a positive integer image id, not -5"),
    ("post", "/search", {"json": {"id": True}}, 422, "not true"),
    ("post", "/search", {"json": {"id": "7"}}, 422, "positive integer"),
    ("post", "/search", {"json": {"id": 1.5}}, 422, "positive integer"),
    ("post", "/search", {"json": {"url": ["http://example.com/a.jpg"]}}, 422, "http(s) URL"),
    ("post", "/search", {"json": {"url": "http://example.com/a.jpg", "id": 1}}, 400, "or"),
    ("post", "/search", {"json": {"id": 1}, "params": {"filter": ["width>1"] * 65}}, 400, "at most 64"),
    ("post", "/search", {"json": {"id": 1}, "params": {"filter": ["meta.k=" + "v" * 9000] * 2}}, 400, "16,384"),
    ("get", f"/images/{HUGE}", {}, 422, "less than or equal"),
    ("get", f"/images/{HUGE}/thumbnail", {}, 422, "less than or equal"),
    ("get", "/images/0", {}, 422, "greater than or equal"),
    ("post", "/search", {"json": {"id": 1}, "params": {"candidates": HUGE}}, 422, "less than or equal"),
    ("post", "/search", {"json": {"id": 1}, "params": {"k": HUGE}}, 422, "less than or equal"),
    ("post", "/search", {"json": {"id": 1}, "params": {"filter": f"width={HUGE}"}}, 400, "out of range"),
    ("post", "/search", {"json": {"id": 1}, "params": {"filter": f"id>{HUGE}"}}, 400, "out of range"),
    ("post", "/search", {"json": {"id": 1}, "params": {"filter": "file_size<" + "9" * 5000}}, 400, "not a valid int"),
    ("post", "/search", {"json": {"id": 1}, "params": {"index": "a\x00b"}}, 400, "bad index name"),
    ("post", "/search", {"json": {"id": 1}, "params": {"index": "a" * 500}}, 400, "bad index name"),
    ("post", "/search", {"json": {"id": 1}, "params": {"filter": "meta.a=b\x00"}}, 400, "NUL"),
    ("post", "/search", {"json": {"id": 1}, "params": {"filter": "meta.\x00=b"}}, 400, "NUL"),
    ("post", "/search", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
     400, "nested deeper"),
    ("post", "/search", {"content": b'{"id": 1', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("post", "/search", {"files": {"file": ("t.png", truncated_png(), "image/png")}}, 400, "truncated"),
    ("post", "/search", {"json": {"url": "http://[::1"}}, 422, ""),
    ("delete", f"/images/{HUGE}", {"headers": {"Authorization": f"Bearer {TOKEN}"}}, 422, "less than or equal"),
]


@pytest.mark.parametrize("method, path, options, status, words", REQUESTS,
                         ids=[f"{m} {p[:30]} {sorted(o.get('params', {}).items())!s:.40}" for m, p, o, *_ in REQUESTS])
def test_every_bad_request_is_a_4xx_with_a_one_line_reason(client, sample_index: str, method: str, path: str,  # noqa: ANN001
                                                          options: dict, status: int, words: str) -> None:
    db = Imgdb(client.database, replace(client.settings, api_token=TOKEN))
    with TestClient(create_app(db), raise_server_exceptions=False) as http:
        answer = getattr(http, method)(path, **options)
    assert answer.status_code == status, answer.text
    reason = answer.json()["error"]
    assert words in reason and "\n" not in reason and "Traceback" not in reason


@pytest.mark.parametrize("args, words", [
    (["search", f"id:{HUGE}"], "not in index"),
    (["search", "id:-5"], "positive integer"),
    (["search", "id:1", *["--filter=width>1"] * 65], "at most 64"),
    (["search", "id:1", "--filter", f"height<{HUGE}"], "out of range"),
    (["search", "id:1", "--index", "Bad\x00"], "bad index name"),
    (["search", "id:1", "--filter", "sha256=\x00"], "NUL"),
    (["delete", HUGE], ""),
])
def test_the_cli_gives_the_same_inputs_one_line_reasons(sample_index: str, args: list[str], words: str) -> None:
    result = CliRunner().invoke(app, args)
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    if words:
        assert result.exit_code == 1 and words in result.stderr and result.stderr.count("\n") == 1, result.stderr
    else:
        assert result.exit_code == 0 and "deleted 0" in result.stdout


def test_a_stopped_database_is_a_503_and_healthz_says_so(tmp_path: Path, museum: Path) -> None:
    """With its PostgreSQL stopped, the server answers 503 with a reason (never a 500), and
    /healthz stops saying ok."""
    import imgdb
    from imgdb.db.embedded import EmbeddedServer

    server = EmbeddedServer(tmp_path / "home")
    url = server.start()
    try:
        with imgdb.connect(url, settings=replace(imgdb.connect(url).settings, api_token=TOKEN)) as db:
            db.create_index("colors", COLOR)
            db.ingest([museum / "images" / "bbdd_00004.jpg"], index="colors")
            with TestClient(create_app(db), raise_server_exceptions=False) as http:
                assert http.get("/healthz").status_code == 200
                server.stop()
                answers = [http.get("/healthz"), http.post("/search", json={"id": 1}, params={"index": "colors"}),
                           http.delete("/images/1", headers={"Authorization": f"Bearer {TOKEN}"}),
                           http.get("/images/1"), http.get("/indexes")]
    finally:
        server.stop()
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert "\n" not in answer.json()["error"]


def test_every_documented_field_filters_in_any_case(client, sample_ids: list[int], museum_sample: Path) -> None:  # noqa: ANN001
    """`sha256` (a name with digits) filters, and `META.` and `Width` are the same fields as
    `meta.` and `width`."""
    from imgdb.io.reader import sha256_hex

    path = museum_sample / "images" / "bbdd_00007.jpg"
    sha = sha256_hex(path.read_bytes())
    [hit] = client.search(path, k=5, filters=[f"sha256={sha}"])
    assert hit.distance < 1e-5
    author = hit.metadata.get("author")
    assert author, "the sample's bbdd_00007 has an author"
    for expr in (f"META.author={author}", f"Meta.author={author}", "WIDTH>=1", "File_Size>0"):
        assert hit.id in {h.id for h in client.search(path, k=50, filters=[expr])}, expr


def test_output_is_safe_and_shows_file_names(client, tmp_path: Path) -> None:  # noqa: ANN001
    """Rich markup in a path or in metadata prints as it is; a long path keeps its file name; a
    named path that does not exist fails the command (the rest still goes in); progress is
    logged where stderr is not a terminal."""
    import imgdb_cli.output as output

    client.create_index("printing", COLOR)
    deep = tmp_path / ("very-long-folder-name-" * 6) / "x[/bogus]y [bold]z.png"
    write(deep, png(700))
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(deep), "--index", "printing", "--meta", "note=[red]hi[/red]"])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["search", str(deep), "--index", "printing", "-k", "1"])
    assert result.exit_code == 0, result.stderr
    assert "x[/bogus]y [bold]z.png" in result.stdout and "[red]hi[/red]" in result.stdout
    assert output.shorten("/a/" + "b" * 100 + "/name.jpg", 30).endswith("/name.jpg")

    other = write(tmp_path / "other.png", png(701))
    result = runner.invoke(app, ["ingest", str(tmp_path / "missing"), str(other), "--index", "printing", "--json"])
    assert result.exit_code == 1 and "no such file or folder" in result.stderr
    assert json.loads(result.stdout)["added"] == 1  # the named file that is there went in

    saved = output.LOG_EVERY_S
    output.LOG_EVERY_S = 0.0
    try:
        pngs = [write(tmp_path / "many" / f"{i}.png", png(800 + i)) for i in range(5)]
        result = runner.invoke(app, ["ingest", str(tmp_path / "many"), "--index", "printing"])
    finally:
        output.LOG_EVERY_S = saved
    lines = [line for line in result.stderr.splitlines() if line.startswith("ingesting: ")]
    assert lines and lines[-1].startswith(f"ingesting: {len(pngs)}/{len(pngs)} (100%)"), result.stderr


def test_time_left_is_the_average_rate_since_the_start() -> None:
    """127 of 287 done in 163 s: about 205 s left, whatever the last seconds' burst."""
    from imgdb_cli.output import seconds_left

    assert round(seconds_left(163.0, 127, 287)) == 205
    assert seconds_left(10.0, 0, 287) is None and seconds_left(10.0, 287, 287) is None


def test_thumbnail_urls_ignore_the_host_header_and_imgdb_keys_are_its_own(client, sample_ids: list[int]) -> None:  # noqa: ANN001
    db = Imgdb(client.database, replace(client.settings, api_token=TOKEN))
    with TestClient(create_app(db)) as http:
        hits = http.post("/search", json={"id": sample_ids[0]}, headers={"Host": "evil.example"}).json()
        assert all(h["thumbnail"].startswith("/images/") for h in hits)
        answer = http.post("/images", headers={"Authorization": f"Bearer {TOKEN}"},
                           files={"file": ("z.png", png(900), "image/png")},
                           data={"meta": json.dumps({"source_url": "https://example.org/forged.jpg"})})
        assert answer.status_code == 400 and "set by imgdb" in answer.json()["error"]
    public = Imgdb(client.database, replace(client.settings, public_url="https://images.example.org/"))
    with TestClient(create_app(public)) as http:
        hits = http.post("/search", json={"id": sample_ids[0]}).json()
        assert hits[0]["thumbnail"] == f"https://images.example.org/images/{hits[0]['id']}/thumbnail"


def test_train_keeps_images_it_cannot_read_again(client, museum: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """`imgdb index train` re-encodes into a new table and swaps it in whole: images whose files
    moved or changed keep their old vectors and are reported; the others get new ones."""
    from PIL import Image

    from imgdb.db import images, pgvector, vectors
    from tests.images import encoded

    gallery = sorted((museum / "images").glob("*.jpg"))[260:272]
    # Re-encoded, so that the content is new to the database whatever other tests ingested.
    copies = [write(tmp_path / "train" / f"{p.stem}.png", encoded(Image.open(p), "PNG")) for p in gallery]
    client.create_index("retrained", "bow:orb/k=16/side=320/max=300")
    assert client.ingest(copies, index="retrained").added == len(copies)
    with client.database.connect() as conn:
        index = client.index("retrained")
        before = dict(zip(*vectors.read(conn, index)))
        ids = {Path(s.uri).name: s.image_id for s in images.of_index(conn, index)}
    copies[0].unlink()                                        # moved away
    copies[1].rename(tmp_path / "elsewhere.png")              # moved away
    copies[2].write_bytes(png(1000))                          # another picture under its name
    report = client.train("retrained", [tmp_path / "train"])
    assert report.added == len(copies) - 3
    assert sorted(Path(f.path).name for f in report.failed) == sorted(c.name for c in copies[:3])
    assert all("old vector is kept" in f.error for f in report.failed)
    assert "changed since it was ingested" in next(f.error for f in report.failed if copies[2].name in f.path)
    with client.database.connect() as conn:
        index = client.index("retrained")
        after = dict(zip(*vectors.read(conn, index)))
        leftovers = conn.exec_driver_sql("SELECT count(*) FROM pg_class WHERE relname LIKE '%%\\_next'").scalar()
        assert pgvector.has_ann(conn, index) and leftovers == 0
    assert set(after) == set(before)  # no image vanished
    for path in copies[:3]:
        np.testing.assert_array_equal(after[ids[path.name]], before[ids[path.name]])
    assert any(not np.allclose(after[ids[p.name]], before[ids[p.name]]) for p in copies[3:])


@pytest.fixture(scope="module")
def memory_bombs() -> dict[str, bytes]:
    from tests.hostile import lying_webp, png16

    return {"webp": lying_webp(), "png16": png16(4000, 3000)}


def test_decoding_has_a_memory_budget(memory_bombs: dict[str, bytes]) -> None:
    """What a decode takes is estimated from the header (mode, bit depth, the format's buffers) and
    refused past the per-image budget, before any pixel is decoded; within it, the process's
    decodes share a budget of bytes in flight."""
    import threading
    import time

    from imgdb.errors import ImageReadError
    from imgdb.io.reader import DecodeLimits, _Budget, decode

    started = time.perf_counter()
    with pytest.raises(ImageReadError, match="would take about 1,144 MiB, more than the 512 MiB"):
        decode(memory_bombs["webp"], limits=DecodeLimits())  # 38 bytes-ish declaring 10000x10000
    small = DecodeLimits(max_bytes=64 * 2**20, in_flight=100 * 2**20)
    with pytest.raises(ImageReadError, match=r"4000x3000 PNG \(I;16\) would take about 172 MiB"):
        decode(memory_bombs["png16"], limits=small)
    assert time.perf_counter() - started < 1.0  # refused from the header, not after decoding
    assert decode(png(1), limits=small).pixels.size == (8, 8)

    budget, order = _Budget(100), []

    def second() -> None:
        with budget.reserve(60):
            order.append("second")

    with budget.reserve(60):
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.3)
        order.append("first released")
    waiter.join(5)
    assert order == ["first released", "second"] and budget.free == 100  # the second waited for the bytes


def test_uploads_that_decode_huge_are_refused_with_the_reason(client, memory_bombs: dict[str, bytes]) -> None:  # noqa: ANN001
    with TestClient(create_app(client)) as http:
        answer = http.post("/search", files={"file": ("bomb.webp", memory_bombs["webp"], "image/webp")})
    assert answer.status_code == 400 and "IMGDB_DECODE_MAX_BYTES" in answer.json()["error"]


def test_slow_url_fetches_never_starve_other_searches(client, sample_ids: list[int]) -> None:  # noqa: ANN001
    """40 searches by URL to a server that trickles its answer: a search by id meanwhile answers
    as fast as without them (the downloads have a pool of their own)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tests.routes import Server

    server = Server()

    def trickle(handler) -> None:  # noqa: ANN001
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", "1000000")
        handler.end_headers()
        while not server.stop.wait(0.5):
            handler.wfile.write(b"\xff")
            handler.wfile.flush()

    server.routes["/trickle.jpg"] = trickle
    trusting = Imgdb(client.database, replace(client.settings, fetch=replace(client.settings.fetch, allow_private=True)))
    try:
        with TestClient(create_app(trusting)) as http:
            baseline = _timed(lambda: http.post("/search", json={"id": sample_ids[0]}, params={"k": 3}))
            with ThreadPoolExecutor(40) as pool:
                slow = [pool.submit(http.post, "/search", json={"url": server.url("/trickle.jpg")}) for _ in range(40)]
                time.sleep(1.0)  # all of them downloading
                assert sum(f.done() for f in slow) == 0
                during = max(_timed(lambda: http.post("/search", json={"id": sample_ids[1]}, params={"k": 3}))
                             for _ in range(5))
                server.stop.set()  # the trickle ends; the downloads fail with a reason
                answers = [f.result(timeout=60) for f in slow]
    finally:
        server.close()
    assert during < max(1.0, 10 * baseline), (baseline, during)
    assert all(a.status_code in (400, 422) for a in answers), {a.status_code for a in answers}


def _timed(call) -> float:  # noqa: ANN001
    import time

    started = time.perf_counter()
    answer = call()
    assert answer.status_code == 200, answer.text
    return time.perf_counter() - started


def test_connections_that_never_send_a_request_head_are_closed(live_server) -> None:  # noqa: ANN001
    """Slowloris: a connection that sends nothing, or a head a byte at a time, is closed after the
    server's header deadline; a real request meanwhile is answered."""
    import socket
    import time
    import urllib.parse

    from tests.conftest import LIVE_HEADER_TIMEOUT

    address = urllib.parse.urlsplit(live_server.url)
    silent = socket.create_connection((address.hostname, address.port))
    trickling = socket.create_connection((address.hostname, address.port))
    started = time.monotonic()
    closed_after = {}
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    for sock in (silent, trickling):
        sock.settimeout(0.2)
    while len(closed_after) < 2 and time.monotonic() - started < 4 * LIVE_HEADER_TIMEOUT:
        for name, sock in (("silent", silent), ("trickling", trickling)):
            if name in closed_after:
                continue
            try:
                if name == "trickling":
                    sock.send(head[int((time.monotonic() - started) * 2) % len(head):][:1])
                if sock.recv(1) == b"":
                    closed_after[name] = time.monotonic() - started
            except (TimeoutError, socket.timeout):
                pass
            except OSError:
                closed_after[name] = time.monotonic() - started
    assert set(closed_after) == {"silent", "trickling"}, closed_after
    assert all(LIVE_HEADER_TIMEOUT * 0.8 < t < LIVE_HEADER_TIMEOUT * 3 for t in closed_after.values()), closed_after
    import httpx

    assert httpx.get(f"{live_server.url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"])
def test_broken_files_of_every_format_are_refused_and_cost_nothing_else(client, fmt: str, tmp_path: Path) -> None:  # noqa: ANN001
    """Each format's broken files (cut short, lying headers, garbage after the magic) and bombs
    just over the pixel limit are refused with a reason, through the API, ingest, the CLI and
    HTTP; one just at the limit decodes; the good files among them go in."""
    from imgdb.errors import ImageReadError
    from imgdb.io.reader import DecodeLimits, decode
    from tests.hostile import FORMATS, corpus, image_file

    suffix = FORMATS[fmt]
    broken = corpus(fmt)
    for case, (data, words) in broken.items():
        with pytest.raises(ImageReadError, match=words) as caught:
            decode(data, limits=DecodeLimits())
        assert "\n" not in str(caught.value), case
    at_limit = image_file(fmt, 200, 150, seed=3)
    assert decode(at_limit, max_pixels=200 * 150).facts.width == 200
    with pytest.raises(ImageReadError, match="decompression bomb"):
        decode(at_limit, max_pixels=200 * 150 - 1)

    folder = tmp_path / fmt
    for case, (data, _) in broken.items():
        write(folder / f"{case}{suffix}", data)
    good = write(folder / f"good{suffix}", image_file(fmt, seed=4))
    client.create_index(f"corpus_{fmt.lower()}", COLOR)
    report = client.ingest([folder], index=f"corpus_{fmt.lower()}")
    assert report.added == 1 and sorted(Path(f.path).stem for f in report.failed) == sorted(broken)
    result = CliRunner().invoke(app, ["ingest", str(folder), "--index", f"corpus_{fmt.lower()}", "--json"])
    summary = json.loads(result.stdout)
    assert result.exit_code == 0 and summary["duplicates"] == 1 and len(summary["failed"]) == len(broken)
    assert {f["error"] for f in summary["failed"]} == {f.error for f in report.failed}
    with TestClient(create_app(client), raise_server_exceptions=False) as http:
        for case, (data, _) in broken.items():
            answer = http.post("/search", params={"index": f"corpus_{fmt.lower()}"},
                               files={"file": (f"{case}{suffix}", data, "application/octet-stream")})
            assert answer.status_code == 400 and "\n" not in answer.json()["error"], (case, answer.text)
        assert client.search(good, index=f"corpus_{fmt.lower()}", k=1)[0].distance < 1e-6


def test_no_json_field_is_ever_a_file_name(client, sample_index: str, museum: Path, tmp_path: Path,  # noqa: ANN001
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Files named as a JSON id of the wrong type would be in the server's working directory: they are
    never read, the request is a 422."""
    monkeypatch.chdir(tmp_path)
    photo = next((museum / "images").glob("*.jpg")).read_bytes()
    for name in ("id:-5", "id:True", "x.jpg"):
        (tmp_path / name).write_bytes(photo)
    with TestClient(create_app(Imgdb(client.database, client.settings)), raise_server_exceptions=False) as http:
        for body in ({"id": -5}, {"id": True}, {"url": "x.jpg"}):
            answer = http.post("/search", json=body)
            assert answer.status_code == 422 and "\n" not in answer.json()["error"], answer.text


def test_a_search_while_its_index_is_dropped_is_a_404_or_409(client, museum: Path) -> None:  # noqa: ANN001
    """Searches racing drops and re-creations of their index: each answers 200, 404 (no such index,
    or the image not in it yet) or 409 (dropped while searched), never a 500."""
    import threading
    from collections import Counter

    paths = sorted((museum / "images").glob("*.jpg"))[:4]
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    stop = threading.Event()
    db = Imgdb(client.database, client.settings)
    with TestClient(create_app(db), raise_server_exceptions=False) as http:
        def searching() -> None:
            while not stop.is_set():
                answer = http.post("/search", params={"index": "dropping"}, files={
                    "file": ("q.jpg", paths[0].read_bytes(), "image/jpeg")})
                statuses[answer.status_code] += 1
                if answer.status_code >= 500:
                    errors.append(answer.text)

        workers = [threading.Thread(target=searching) for _ in range(3)]
        for worker in workers:
            worker.start()
        try:
            client.create_index("dropping", "color:hsv")
            client.ingest(paths, index="dropping")
            for _ in range(40):
                client.drop_index("dropping")
                client.create_index("dropping", "color:hsv")
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        client.ingest(paths, index="dropping")
        settled = http.post("/search", params={"index": "dropping"}, files={
            "file": ("q.jpg", paths[0].read_bytes(), "image/jpeg")})
        client.drop_index("dropping")
    assert settled.status_code == 200 and settled.json(), settled.text  # (nothing stale is kept)
    assert statuses and set(statuses) <= {200, 404, 409}, (statuses, errors[:3])


@pytest.mark.parametrize("pieces", [1, 20])
def test_an_oversized_request_head_is_a_431_with_a_json_reason(live_server, pieces: int) -> None:  # noqa: ANN001
    """Whole in one read, or trickled in pieces past the HTTP parser's limit."""
    import socket
    import time
    import urllib.parse

    from imgdb.web.app import MAX_HEAD_BYTES

    address = urllib.parse.urlsplit(live_server.url)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * (MAX_HEAD_BYTES + 100) + b"\r\n\r\n"
    answer = b""
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        try:
            for start in range(0, len(head), -(-len(head) // pieces)):
                sock.sendall(head[start:start - (-len(head) // pieces)])
                time.sleep(0.01 if pieces > 1 else 0)
            while chunk := sock.recv(65536):
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):  # (refused before the rest was sent)
            answer += sock.recv(65536) if not answer else b""
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 431"), status
    assert b"content-type: application/json" in status.lower()
    assert "request head" in json.loads(body)["error"]
