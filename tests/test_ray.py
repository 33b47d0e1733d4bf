"""Ingest on a Ray cluster (``imgdb ingest --ray``): a local Ray of two CPUs, real images, the session's
embedded PostgreSQL. What goes in through Ray's actors is what a local ingest writes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import psycopg
import pytest

from tests.conftest import copy_image, tool_env
from tests.images import write

#: Gallery images of the test folder, besides a duplicate and two bad files.
GOOD = 12
IMGDB = str(Path(sys.executable).parent / "imgdb")


@pytest.fixture(scope="module")
def ray_address(object_store) -> Iterator[str]:  # noqa: ANN001
    """A local Ray cluster of two CPUs for this module: its GCS address, which other processes join.
    Its workers have the environment of this process, the object store's endpoint and credentials."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(museum: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GOOD paintings with metadata for two, a copy of one under another name, a truncated JPEG and
    a text file named like a JPEG."""
    root = tmp_path_factory.mktemp("ray-folder")
    gallery = sorted((museum / "images").glob("*.jpg"))[:GOOD]
    for path in gallery:
        copy_image(path, root / "images" / path.name)
    copy_image(gallery[3], root / "images" / "again" / "copy.jpg")
    photo = gallery[0].read_bytes()
    write(root / "images" / "truncated.jpg", photo[: len(photo) // 3])
    write(root / "images" / "text.jpg", b"not an image\n" * 20)
    (root / "metadata.json").write_text(json.dumps({f"images/{gallery[0].name}": {"author": "A"},
                                                    f"images/{gallery[1].name}": {"author": "B", "year": 1900}}))
    return root


def stored(db) -> dict[str, tuple]:  # noqa: ANN001
    """Every image of the default index by uri: its facts, metadata and vector."""
    index = db.index("default")
    with db.database.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT i.uri, i.sha256, i.width, i.height, i.format, i.file_size, i.taken_at, i.camera, i.metadata,"
            f' v.embedding::text FROM images i JOIN "{index.vectors_table}" v ON v.image_id = i.id').all()
    return {row[0]: (*row[1:-1], np.array(json.loads(row[-1]), dtype=np.float32)) for row in rows}


def failures(report) -> list[tuple[str, str]]:  # noqa: ANN001
    return sorted((f.path, f.error) for f in report.failed)


def test_an_ingest_through_ray_writes_what_a_local_one_does(new_database, folder: Path, ray_address: str) -> None:  # noqa: ANN001
    import imgdb

    paths, metadata = [folder / "images"], folder / "metadata.json"
    with imgdb.connect(new_database("ray_local")) as local, imgdb.connect(new_database("ray_actors")) as on_ray:
        expected = local.ingest(paths, metadata_file=metadata)
        seen: list[tuple[int, int]] = []
        report = on_ray.ingest(paths, metadata_file=metadata, ray=imgdb.RayOptions(actors=2),
                               on_progress=lambda done, total: seen.append((done, total)))
        assert (report.added, report.duplicates) == (expected.added, expected.duplicates) == (GOOD, 1)
        assert failures(report) == failures(expected) and len(report.failed) == 2
        assert seen[-1] == (GOOD + 3, GOOD + 3)
        mine, theirs = stored(on_ray), stored(local)
        assert sorted(mine) == sorted(theirs)
        for uri, (*facts, vector) in mine.items():
            assert facts == list(theirs[uri][:-1]), uri
            np.testing.assert_allclose(vector, theirs[uri][-1], rtol=0, atol=1e-6, err_msg=uri)
        assert on_ray.search(folder / "images" / "again" / "copy.jpg", k=1)[0].uri in mine

        again = on_ray.ingest(paths, metadata_file=metadata, ray=imgdb.RayOptions(actors=2))
        assert (again.added, again.duplicates, failures(again)) == (0, GOOD + 1, failures(expected))
        assert stored(on_ray).keys() == mine.keys()


def test_objects_in_s3_go_in_through_ray_as_they_do_locally(new_database, folder: Path, object_store,  # noqa: ANN001
                                                             ray_address: str) -> None:
    """The driver lists the prefix; the actors read the objects with the credentials of their own
    environment."""
    import imgdb

    for path in sorted((folder / "images").rglob("*.jpg")):
        object_store.put(f"ray/{path.relative_to(folder / 'images')}", path.read_bytes())
    prefix = [f"s3://{object_store.bucket}/ray"]
    with imgdb.connect(new_database("ray_s3_local")) as local, imgdb.connect(new_database("ray_s3")) as on_ray:
        expected = local.ingest(prefix)
        report = on_ray.ingest(prefix, ray=imgdb.RayOptions(actors=2))
        assert (report.added, report.duplicates, failures(report)) == (GOOD, 1, failures(expected))
        mine, theirs = stored(on_ray), stored(local)
        assert sorted(mine) == sorted(theirs) and all(uri.startswith("s3://") for uri in mine)
        for uri, (*facts, vector) in mine.items():
            assert facts == list(theirs[uri][:-1]), uri
            np.testing.assert_allclose(vector, theirs[uri][-1], rtol=0, atol=1e-6, err_msg=uri)


def test_the_command_ingests_on_a_running_cluster(new_database, folder: Path, ray_address: str) -> None:  # noqa: ANN001
    url = new_database("ray_cli")
    env = tool_env(IMGDB_DATABASE_URL=url)
    done = subprocess.run([IMGDB, "ingest", str(folder / "images"), "--ray", ray_address, "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["added"], report["duplicates"], len(report["failed"])) == (GOOD, 1, 2)
    assert all(f["error"] and "\n" not in f["error"] for f in report["failed"])

    again = subprocess.run([IMGDB, "ingest", str(folder / "images"), f"--ray={ray_address}", "--ray-actors", "1",
                            "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["added"], json.loads(again.stdout)["duplicates"]) == (0, GOOD + 1)

    refused = subprocess.run([IMGDB, "ingest", str(folder / "images"),
                              "--ray-actors", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "go with --ray" in refused.stderr


def test_a_sync_through_ray_embeds_what_a_local_one_does(new_database, folder: Path, ray_address: str) -> None:  # noqa: ANN001
    """An attached table's first fill: ``imgdb sync --ray`` (Ray tasks draining the queue) against
    a local sync of the same table in another database."""
    import imgdb

    paths = sorted((folder / "images").rglob("*.jpg")) + [folder / "images" / "gone.jpg"]
    reports = {}
    for name in ("sync_local", "sync_ray"):
        url = new_database(name)
        with psycopg.connect(url, autocommit=True) as app:
            app.execute("CREATE TABLE public.photos (id int PRIMARY KEY, path text)")
            for i, path in enumerate(paths):
                app.execute("INSERT INTO public.photos VALUES (%s, %s)", (i, str(path)))
        with imgdb.connect(url) as db:
            assert db.attach("photos", "path").queued == len(paths)
            if name == "sync_local":
                reports[name] = db.sync().to_json()
            else:
                done = subprocess.run([IMGDB, "sync", "--ray", ray_address, "--ray-actors", "2", "--json"],
                                      env=tool_env(IMGDB_DATABASE_URL=url), capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, done.stderr
                reports[name] = json.loads(done.stdout)
            reports[name]["stored"] = stored(db)
            assert db.sync_status()[0]["done"] == GOOD + 1  # the copy is a row of its own
    local, on_ray = reports["sync_local"], reports["sync_ray"]
    assert (on_ray["embedded"], on_ray["queued"]) == (local["embedded"], 0) == (GOOD + 1, 0)
    assert sorted((f["ref"], f["error"]) for f in on_ray["failed"]) == sorted((f["ref"], f["error"]) for f in local["failed"])
    assert len(on_ray["failed"]) == 3
    assert sorted(on_ray["stored"]) == sorted(local["stored"])
    for uri, (*facts, vector) in on_ray["stored"].items():
        assert facts == list(local["stored"][uri][:-1]), uri
        np.testing.assert_allclose(vector, local["stored"][uri][-1], rtol=0, atol=1e-6, err_msg=uri)


def test_a_worker_killed_mid_share_loses_nothing(new_database, museum: Path, ray_address: str) -> None:  # noqa: ANN001
    """The actor's process is killed once its first batch is committed: Ray starts another and hands
    it the share again, whose committed part then counts as duplicates. Every image is in the index
    once, none failed, and a rerun adds nothing."""
    import imgdb

    gallery = sorted((museum / "images").glob("*.jpg"))[20:120]
    with imgdb.connect(new_database("ray_killed")) as db:
        index = db.index("default")
        killed: list[int] = []

        def kill_after_the_first_commit() -> None:
            deadline = time.monotonic() + 300
            while not killed and time.monotonic() < deadline:
                if 0 < count(db, index.vectors_table) < len(gallery):
                    for process in psutil.process_iter(["pid", "cmdline"]):
                        if any("MapWorker(MapBatches(_Actor))" in part for part in process.info["cmdline"] or ()):
                            process.send_signal(signal.SIGKILL)
                            killed.append(process.info["pid"])
                time.sleep(0.05)

        killer = threading.Thread(target=kill_after_the_first_commit)
        killer.start()
        report = db.ingest(gallery, ray=imgdb.RayOptions(actors=1))
        killer.join()
        assert killed, "no actor process was found to kill"
        assert not report.failed
        assert report.added + report.duplicates == len(gallery) and report.duplicates > 0
        assert count(db, index.vectors_table) == len(gallery)
        again = db.ingest(gallery, ray=imgdb.RayOptions(actors=1))
        assert (again.added, again.duplicates) == (0, len(gallery))


def count(db, table: str) -> int:  # noqa: ANN001
    with db.database.connect() as conn:
        return int(conn.exec_driver_sql(f'SELECT count(*) FROM "{table}"').scalar_one())


def test_a_write_every_worker_fails_stops_the_load_and_the_sync_with_its_reason(new_database, folder: Path,  # noqa: ANN001
                                                                                  ray_address: str) -> None:
    """An error no retry cures (here every vector refused by a constraint) ends the load with one
    line saying why, instead of failing share after share; nothing half-written stays."""
    import imgdb

    with imgdb.connect(new_database("ray_refused")) as db:
        table = db.index("default").vectors_table
        with db.database.engine.begin() as conn:
            conn.exec_driver_sql(f'ALTER TABLE "{table}" ADD CONSTRAINT no_vectors CHECK (false) NOT VALID')
        with pytest.raises(imgdb.ImgdbError, match="the ingest on Ray stopped: .*no_vectors") as stopped:
            db.ingest([folder / "images"], ray=imgdb.RayOptions(actors=1))
        assert "\n" not in str(stopped.value)
        assert count(db, table) == 0
        # The same for a sync: its Ray tasks stop, the claim rolls back, the rows stay queued.
        url = db.database.url
        with psycopg.connect(url, autocommit=True) as app:
            app.execute("CREATE TABLE public.refused (id int PRIMARY KEY, path text)")
            app.execute("INSERT INTO public.refused VALUES (1, %s)", (str(folder / "images" / "again" / "copy.jpg"),))
        db.attach("refused", "path")
        with pytest.raises(imgdb.ImgdbError, match="the sync on Ray stopped: .*no_vectors"):
            db.sync(ray=imgdb.RayOptions(actors=1))
        assert count(db, table) == 0 and db.sync_status()[0]["queued"] == 1


def test_near_duplicates_are_screened_on_ray_as_they_are_locally(new_database, folder: Path, museum: Path,  # noqa: ANN001
                                                                 ray_address: str, tmp_path: Path) -> None:
    """``imgdb ingest --ray --near-duplicates skip``: each actor judges its batches against the index
    before writing them, as a local ingest does; the copy of a painting the index holds is left out
    and reported with its match, a new painting goes in."""
    import imgdb
    from PIL import Image

    paintings = sorted((museum / "images").glob("*.jpg"))
    held, new = paintings[100:140], paintings[60]  # (enough others for its scores to know near from far)
    source = Image.open(held[2])
    crop = tmp_path / "crop.png"
    source.crop((20, 10, source.width - 30, source.height - 20)).save(crop)
    again = copy_image(held[5], tmp_path / "again.jpg")
    with imgdb.connect(new_database("ray_near")) as db:
        assert db.ingest(held).added == len(held)
        db.calibrate("default", sample=20)
        with pytest.raises(imgdb.ImgdbError, match="keeps no local features.*imgdb index verify default"):
            db.ingest([crop], ray=imgdb.RayOptions(actors=2), near_duplicates="skip")
        db.verify_index("default")
        db.calibrate("default", sample=20)
        ids = {Path(hit.uri).name: hit.id for hit in db.search(held[2], k=1)}
        report = db.ingest([crop, new, again], ray=imgdb.RayOptions(actors=2), near_duplicates="skip")
        assert (report.added, report.duplicates) == (1, 1), json.dumps(report.to_json())  # (again: the same bytes)
        [found] = report.near_duplicates
        assert (Path(found.path).name, found.match, found.action) == ("crop.png", ids[held[2].name], "skipped")
        assert found.score >= 0.5
        assert count(db, db.index("default").vectors_table) == len(held) + 1
        assert db.search(new, k=1)[0].uri == str(new)
