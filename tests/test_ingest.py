"""Ingest on real images: metadata, duplicates, bad files among good ones, URLs, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgdb.client import Imgdb
from imgdb.db import indexes, pgvector, vectors
from tests.conftest import SAMPLE_SIZE, copy_image
from tests.images import encoded, png_bomb, write


def count(client, index: str) -> int:  # noqa: ANN001
    with client.database.connect() as conn:
        return vectors.count(conn, indexes.require(conn, index))


def test_sample_is_ingested_with_metadata_and_facts(client, sample_index: str, museum_sample: Path) -> None:  # noqa: ANN001
    metadata = json.loads((museum_sample / "metadata.json").read_text())
    with client.database.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT uri, width, height, format, file_size, metadata FROM images_default ORDER BY id"
        ).all()
    by_name = {Path(uri).name: row for uri, *row in rows}
    for key, meta in metadata.items():
        width, height, fmt, size, stored = by_name[Path(key).name]
        assert stored == meta
        assert fmt == "JPEG" and width > 0 and height > 0
        assert size == (museum_sample / key).stat().st_size


def test_second_ingest_adds_nothing(client, sample_index: str, museum_sample: Path) -> None:  # noqa: ANN001
    before = count(client, sample_index)
    report = client.ingest([museum_sample / "images"])
    assert (report.added, len(report.failed)) == (0, 0)
    assert report.duplicates == SAMPLE_SIZE
    assert count(client, sample_index) == before


def test_bad_files_are_reported_and_the_rest_go_in(client, tmp_path: Path, museum: Path) -> None:  # noqa: ANN001
    """1000 files of which 10 are bad: each bad one gets a reason, the 990 good ones go in."""
    client.create_index("robust", "color:hsv/bins=4x4x4")
    rng = np.random.default_rng(3)
    for i in range(990):
        pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        write(tmp_path / f"sub{i % 7}" / f"ok_{i:04d}.png", encoded(Image.fromarray(pixels), "PNG"))
    photo = (museum / "images" / "bbdd_00003.jpg").read_bytes()
    bad = {
        "empty.jpg": b"",
        "text.jpg": b"just some text\n" * 10,
        "truncated.jpg": photo[: len(photo) // 3],
        "corrupt.jpg": photo[:2000] + bytes(range(256)) * 50,
        "bomb.png": png_bomb(),
        "header.png": b"\x89PNG\r\n\x1a\n",
        "html.gif": b"<html><body>not a gif</body></html>",
        "zeros.webp": bytes(1024),
        "riff.webp": b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8),
        "half.bmp": b"BM" + bytes(40),
    }
    for name, data in bad.items():
        write(tmp_path / "bad" / name, data)
    progress: list[tuple[int, int]] = []
    report = client.ingest([tmp_path], index="robust", on_progress=lambda d, t: progress.append((d, t)))
    assert report.added == 990
    assert sorted(Path(f.path).name for f in report.failed) == sorted(bad)
    assert all(f.error and "\n" not in f.error for f in report.failed)
    assert progress[-1] == (1000, 1000)
    assert count(client, "robust") == 990


def test_duplicate_content_within_one_run_is_stored_once(client, tmp_path: Path, museum: Path) -> None:  # noqa: ANN001
    client.create_index("dups", "color:hsv")
    source = museum / "images" / "bbdd_00010.jpg"
    copy_image(source, tmp_path / "a.jpg")
    copy_image(source, tmp_path / "b" / "same.jpg")
    report = client.ingest([tmp_path], index="dups")
    assert (report.added, report.duplicates) == (1, 1)


def test_missing_path_is_a_failure_not_an_abort(client, tmp_path: Path, museum: Path) -> None:  # noqa: ANN001
    client.create_index("missing", "color:hsv")
    report = client.ingest([tmp_path / "nope.jpg", museum / "images" / "bbdd_00011.jpg"], index="missing")
    assert report.added == 1
    assert [f.error for f in report.failed] == ["No such file or directory"]


def test_interrupted_ingest_keeps_what_was_committed_and_resumes(client, museum: Path) -> None:  # noqa: ANN001
    client.create_index("resume", "color:hsv")
    gallery = sorted((museum / "images").glob("*.jpg"))[:200]

    def interrupt(done: int, total: int) -> None:
        if done == 150:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.ingest(gallery, index="resume", on_progress=interrupt)
    committed = count(client, "resume")
    assert 0 < committed < 200
    with client.database.connect() as conn:  # the ANN index is back even after the interruption
        assert pgvector.has_ann(conn, indexes.require(conn, "resume"))
    report = client.ingest(gallery, index="resume")
    assert report.added == 200 - committed and report.duplicates == committed
    assert count(client, "resume") == 200


def test_ingest_from_url_and_meta_for_every_image(client, http_root, museum: Path) -> None:  # noqa: ANN001
    base, folder = http_root
    # Re-encoded, so that its content is new to the database whatever other tests ingested.
    write(folder / "painting.png", encoded(Image.open(museum / "images" / "bbdd_00200.jpg"), "PNG"))
    client.create_index("web", "color:hsv")
    url = f"{base}/painting.png"
    refused = client.ingest([url], index="web")
    assert refused.added == 0 and "loopback" in refused.failed[0].error
    trusting = Imgdb(client.database, replace(client.settings, fetch=replace(client.settings.fetch,
                                                                              allow_private=True)))
    report = trusting.ingest([url], index="web", meta={"source": "web"})
    assert report.added == 1
    hit = client.search(folder / "painting.png", index="web", k=1)[0]
    assert hit.uri == url and hit.metadata == {"source": "web"} and hit.distance < 1e-6


def fresh(museum: Path, number: int) -> bytes:
    """A museum painting as content no other test ingests (cropped by a pixel, PNG)."""
    with Image.open(museum / "images" / f"bbdd_{number:05d}.jpg") as image:
        return encoded(image.crop((1, 1, image.width, image.height)), "PNG")


def test_objects_in_s3_go_in_like_files_from_a_prefix_or_a_list(client, object_store, museum: Path,  # noqa: ANN001
                                                                 tmp_path: Path) -> None:
    client.create_index("objects", "color:hsv")
    first = object_store.put("museum/first.png", fresh(museum, 251))
    second = object_store.put("museum/room/second.png", fresh(museum, 252))
    object_store.put("museum/.trash/hidden.png", fresh(museum, 253))
    object_store.put("museum/notes.md", b"# not an image")
    broken = object_store.put("museum/broken.png", b"not an image\n" * 20)
    report = client.ingest(["s3://gallery/museum/"], index="objects")  # a prefix is walked like a folder
    assert report.added == 2 and [(f.path, f.error) for f in report.failed] == [
        (broken, "not an image in a supported format (JPEG, PNG, WebP, TIFF, BMP, GIF)")]
    with client.database.connect() as conn:
        rows = dict(conn.exec_driver_sql("SELECT uri, format FROM images_objects").all())
    assert rows == {first: "PNG", second: "PNG"}
    # A list file: one entry per line, local paths relative to the list; what cannot be read, or
    # names credentials or options of its own, fails alone, with its reason.
    write(tmp_path / "local.png", fresh(museum, 254))
    (tmp_path / "todo.txt").write_text("\n".join([
        "# gallery, second batch", "", first, "local.png", "s3://gallery/museum/gone.png",
        "s3://key:secret@gallery/museum/first.png", "s3://gallery/museum/first.png?endpoint_override=127.0.0.1:9"]))
    listed = client.ingest([tmp_path / "todo.txt"], index="objects")
    assert (listed.added, listed.duplicates) == (1, 1)
    assert sorted(f.error for f in listed.failed) == [
        "no such object", "s3:// URIs carry no credentials: imgdb takes them from the environment",
        "s3:// URIs take no options (?...): the endpoint and credentials come from the environment"]
    hit = client.search(fresh(museum, 252), index="objects", k=1)[0]
    assert hit.uri == second and hit.distance < 1e-6


def test_delete_removes_images_and_vectors_from_every_index(client, tmp_path: Path, museum: Path) -> None:  # noqa: ANN001
    client.create_index("deletes", "color:hsv")
    path = copy_image(museum / "images" / "bbdd_00030.jpg", tmp_path / "x.jpg")
    client.ingest([path], index="deletes")
    image_id = client.search(path, index="deletes", k=1)[0].id
    assert client.delete([image_id, 10**9]) == 1
    assert count(client, "deletes") == 0
    assert client.delete([image_id]) == 0


def test_killed_ingest_process_loses_nothing_committed(client, imgdb_home: Path, museum: Path) -> None:  # noqa: ANN001
    """SIGKILL an `imgdb ingest` mid-way: the database stays consistent and a rerun completes it."""
    client.create_index("killed", "color:hsv")
    gallery = sorted((museum / "images").glob("*.jpg"))
    command = [str(Path(sys.executable).parent / "imgdb"), "ingest", *map(str, gallery), "--index", "killed"]
    process = subprocess.Popen(command, env={**os.environ, "IMGDB_HOME": str(imgdb_home)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while count(client, "killed") == 0 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = count(client, "killed")
    assert 0 < committed < len(gallery)
    report = client.ingest(gallery, index="killed")
    assert report.added + report.duplicates == len(gallery) and not report.failed
    assert report.duplicates == committed
    assert count(client, "killed") == len(gallery)


def test_reingest_with_new_metadata_merges_it(client, tmp_path: Path, museum: Path) -> None:  # noqa: ANN001
    client.create_index("relabel", "color:hsv")
    path = write(tmp_path / "p.png", encoded(Image.open(museum / "images" / "bbdd_00212.jpg"), "PNG"))
    client.ingest([path], index="relabel", meta={"author": "A", "room": "1"})
    report = client.ingest([path], index="relabel", meta={"room": "7"})
    assert (report.added, report.duplicates) == (0, 1)
    assert client.search(path, index="relabel", k=1)[0].metadata == {"author": "A", "room": "7"}
