"""``imgdb index export/import``: an index moves between databases with everything that encodes
its queries; a file that is not what it claims is refused whole, and leaves nothing behind."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from imgdb.db import images, indexes, networks, state, vectors
from imgdb.errors import ImgdbError


@pytest.fixture(scope="session")
def exported(client, tuned_index, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("export") / "tuned.zip"
    manifest = client.export_index("tuned", path)
    assert manifest["networks"] == [tuned_index[0].network]
    return path


@pytest.fixture(scope="session")
def elsewhere(new_database):  # noqa: ANN001, ANN201
    """imgdb in another database of the same server: the machine an index moves to."""
    import imgdb

    with imgdb.connect(new_database("transfer_target")) as db:
        yield db


def _by_hash(db, name: str) -> dict[str, np.ndarray]:  # noqa: ANN001
    with db.database.connect() as conn:
        index = indexes.require(conn, name)
        rows = images.rows_of_index(conn, index)
        ids, stored = vectors.read(conn, index)
    assert [r["id"] for r in rows] == ids.tolist()
    return {r["sha256"]: v for r, v in zip(rows, stored)}


def test_export_then_import_gives_the_same_vectors_and_query_encoding(client, elsewhere, exported: Path,  # noqa: ANN001
                                                                      museum: Path, tuned_index) -> None:
    elsewhere.import_index(exported)
    here, there = _by_hash(client, "tuned"), _by_hash(elsewhere, "tuned")
    assert here.keys() == there.keys() and all(np.array_equal(here[k], there[k]) for k in here)
    assert elsewhere.index("tuned").extractor == client.index("tuned").extractor
    with elsewhere.database.connect() as conn:
        record = networks.record(conn, tuned_index[0].network)
    assert record.method == "triplet" and record.loss == tuned_index[0].losses
    query = museum / "queries" / "qsd1_w1_00003.jpg"
    assert np.array_equal(elsewhere.embed(query, index="tuned"), client.embed(query, index="tuned"))
    with pytest.raises(ImgdbError, match="exists already"):
        elsewhere.import_index(exported)


@pytest.fixture(scope="module")
def whitened(client, museum_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """An export of an index with learned state (a PCA whitening)."""
    client.create_index("whitened", "cnn:tf_efficientnet_lite0/gem/size=128/whiten=on", ann="none")
    client.ingest([museum_sample / "images"], index="whitened")
    path = tmp_path_factory.mktemp("whitened") / "w.zip"
    client.export_index("whitened", path)
    return path


def test_an_index_with_learned_state_moves_with_it(client, elsewhere, museum_sample: Path, whitened: Path) -> None:  # noqa: ANN001
    elsewhere.import_index(whitened, name="moved")
    with client.database.connect() as conn:
        learned = state.load(conn, client.index("whitened"))
    with elsewhere.database.connect() as conn:
        moved = state.load(conn, elsewhere.index("moved"))
    assert learned.keys() == moved.keys() and all(np.array_equal(learned[k], moved[k]) for k in learned)
    query = museum_sample / "images" / "bbdd_00002.jpg"
    assert np.array_equal(elsewhere.embed(query, index="moved"), client.embed(query, index="whitened"))


def _rewrite(src: Path, dst: Path, members: dict[str, bytes | None]) -> Path:
    """A copy of an export with members replaced (bytes) or left out (None)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            if info.filename not in members:
                new.writestr(info, old.read(info))
        for name, data in members.items():
            if data is not None:
                new.writestr(name, data)
    return dst


def _member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


def _tampered_network(exported: Path) -> dict[str, bytes]:
    sha = json.loads(_member(exported, "manifest.json"))["networks"][0]
    blob = bytearray(_member(exported, f"networks/{sha}.safetensors"))
    blob[-1] ^= 1
    return {f"networks/{sha}.safetensors": bytes(blob)}


def _images(exported: Path, change) -> bytes:  # noqa: ANN001
    images = json.loads(_member(exported, "images.json"))
    change(images)
    return json.dumps(images).encode()


def _manifest(exported: Path, change) -> bytes:  # noqa: ANN001
    manifest = json.loads(_member(exported, "manifest.json"))
    change(manifest)
    return json.dumps(manifest).encode()


def _vectors_with_nan(exported: Path) -> bytes:
    import io

    vectors = np.load(io.BytesIO(_member(exported, "vectors.npy")))
    vectors[3, 5] = np.nan
    out = io.BytesIO()
    np.save(out, vectors)
    return out.getvalue()


CASES = {
    "no manifest": (lambda e: {"manifest.json": None}, "no manifest.json"),
    "other format": (lambda e: {"manifest.json": b'{"format": "zip", "version": 1}'}, "format version"),
    "bad json": (lambda e: {"images.json": b"[{"}, "images.json"),
    "NaN vector": (lambda e: {"vectors.npy": _vectors_with_nan(e)}, "finite float32"),
    "rows past the declared": (lambda e: {"vectors.npy": _member(e, "vectors.npy") + bytes(64 * 2**20)}, "more than"),
    "a local file's weights": (lambda e: {"manifest.json": _manifest(e, lambda m: m["index"].update(
        extractor=m["index"]["extractor"].split("/net=")[0] + "/weights=/etc/hostname"))}, "weights=PATH"),
    "svg format": (lambda e: {"images.json": _images(e, lambda i: i[0].update(format="svg+xml\r\nX: y"))},
                   "not one imgdb reads"),
    "pickled vectors": (lambda e: {"vectors.npy": b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, "
                                   b"'shape': (1,), }" + b" " * 50 + b"\n" + b"\x80\x04N."}, "plain .npy"),
    "one image fewer": (lambda e: {"images.json": _images(e, lambda i: i.pop())}, "manifest's"),
    "bad hash": (lambda e: {"images.json": _images(e, lambda i: i[0].update(sha256="x" * 64))}, "64 hex"),
    "NUL in uri": (lambda e: {"images.json": _images(e, lambda i: i[1].update(uri="a\x00b"))}, "NUL"),
    "huge width": (lambda e: {"images.json": _images(e, lambda i: i[2].update(width=2**40))}, "out of range"),
    "same image twice": (lambda e: {"images.json": _images(e, lambda i: i.__setitem__(1, i[0]))}, "twice"),
    "tampered network": (_tampered_network, "do not match their sha256"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_export_is_refused_whole(elsewhere, exported: Path, tmp_path: Path, case: str) -> None:  # noqa: ANN001
    members, reason = CASES[case]
    bad = _rewrite(exported, tmp_path / "bad.zip", members(exported))
    with pytest.raises(ImgdbError, match=reason):
        elsewhere.import_index(bad, name="refused")
    assert "refused" not in {i.name for i in elsewhere.indexes()}


def test_a_file_that_is_not_an_export_is_refused(elsewhere, tmp_path: Path) -> None:  # noqa: ANN001
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(ImgdbError, match="not an imgdb index export"):
        elsewhere.import_index(tmp_path / "x.zip")


def test_an_index_that_verifies_moves_with_its_local_features(client, elsewhere, museum_sample: Path,  # noqa: ANN001
                                                              museum: Path, tmp_path: Path) -> None:
    client.create_index("checked", "color:hsv", ann="none")
    client.verify_index("checked", "rootsift/keypoints=100")
    client.ingest(sorted((museum_sample / "images").glob("*.jpg"))[:6], index="checked")
    path = tmp_path / "checked.zip"
    assert client.export_index("checked", path)["local"] == "rootsift/side=640/keypoints=100"
    elsewhere.import_index(path, originals=museum)
    assert elsewhere.index("checked").local == "rootsift/side=640/keypoints=100"
    photo = sorted((museum_sample / "images").glob("*.jpg"))[2]
    here = client.search(photo, k=2, index="checked", rerank="verify")
    there = elsewhere.search(photo, k=2, index="checked", rerank="verify")
    # (by name: images this database held already, from an earlier import, keep their own uri)
    assert [Path(h.uri).name for h in here] == [Path(h.uri).name for h in there]
    assert [h.notes for h in here] == [h.notes for h in there]
    assert there[0].notes["verified"]
    # Counts that do not add up to the stored keypoints are refused, and nothing is left behind.
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bad, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "local/counts.npy":
                data = state.npy_bytes(np.full(6, 100, np.int32))
            target.writestr(item, data)
    with pytest.raises(ImgdbError, match="local/xy.npy must hold"):
        elsewhere.import_index(bad, name="checked_bad")
    assert "checked_bad" not in {i.name for i in elsewhere.indexes()}


def _state_member(export: Path, key: str, change) -> dict[str, bytes]:  # noqa: ANN001
    import io

    array = np.load(io.BytesIO(_member(export, f"state/{key}.npy")))
    return {f"state/{key}.npy": state.npy_bytes(change(array))}


@pytest.mark.parametrize("change, reason", [
    (lambda a: a[:-1], "does not fit extractor"),
    (lambda a: np.where(np.arange(a.size) == 3, np.nan, a).astype(a.dtype), "not finite"),
], ids=["wrong shape", "NaN"])
def test_learned_state_that_does_not_fit_its_extractor_is_refused(elsewhere, whitened: Path, tmp_path: Path,  # noqa: ANN001
                                                                  change, reason: str) -> None:
    bad = _rewrite(whitened, tmp_path / "bad.zip", _state_member(whitened, "pca_mean", change))
    with pytest.raises(ImgdbError, match=reason):
        elsewhere.import_index(bad, name="misfit")
    assert "misfit" not in {i.name for i in elsewhere.indexes()}


def test_an_import_reads_and_serves_only_what_the_user_named(client, new_database, whitened: Path, museum: Path,  # noqa: ANN001
                                                             tmp_path: Path) -> None:
    """An archive's path outside the folder the user vouched for is kept as archive://, never read
    or served; a path inside it is served with the content type read from the bytes; an image the
    database holds already keeps its own record, in every index."""
    import hashlib

    import imgdb
    from fastapi.testclient import TestClient

    from imgdb.web.app import create_app

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for the archive's author\n")
    known_photo, new_photo = sorted((museum / "images").glob("*.jpg"))[:2]
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (secret, known_photo, new_photo)}
    at = {e["sha256"]: n for n, e in enumerate(json.loads(_member(whitened, "images.json")))}
    other = next(n for n in range(len(at)) if n not in (at[digest[known_photo]], at[digest[new_photo]]))

    def lying(entries: list) -> None:
        entries[other].update(uri=str(secret), sha256=digest[secret], format="PNG")
        entries[at[digest[new_photo]]].update(uri=str(new_photo), format="PNG")

    bad = _rewrite(whitened, tmp_path / "lying.zip", {"images.json": _images(whitened, lying)})
    with imgdb.connect(new_database("import_guest")) as db:
        known = db.add_image(known_photo.read_bytes(), meta={"owner": "the application"})["id"]
        db.import_index(bad, name="guest", originals=museum)
        with db.database.connect() as conn:
            stored = {r["sha256"]: r for r in images.rows_of_index(conn, db.index("guest"))}
        assert stored[digest[secret]]["uri"] == f"archive://{secret}"
        assert stored[digest[new_photo]]["uri"] == str(new_photo)
        assert stored[digest[known_photo]]["id"] == known
        assert stored[digest[known_photo]]["metadata"] == {"owner": "the application"}
        with TestClient(create_app(db)) as http:
            assert http.get(f"/images/{stored[digest[secret]]['id']}").status_code == 404
            served = http.get(f"/images/{stored[digest[new_photo]]['id']}")
            assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
        db.drop_index("guest")
        with db.database.connect() as conn:
            assert images.get(conn, known)["metadata"] == {"owner": "the application"}


def test_a_failed_or_killed_import_leaves_nothing_behind(client, new_database, exported: Path,  # noqa: ANN001
                                                         tmp_path: Path) -> None:
    """The index, its network and its images land together or not at all: refused on its last
    vector, or killed (SIGKILL) while it writes, an import leaves nothing, and the rerun succeeds."""
    import os
    import signal
    import subprocess
    import time

    import imgdb
    from tests.conftest import tool_env

    url = new_database("import_atomic")
    sha = json.loads(_member(exported, "manifest.json"))["networks"][0]
    vectors_npy = bytearray(_member(exported, "vectors.npy"))
    vectors_npy[-4:] = np.array([np.nan], "<f4").tobytes()
    bad = _rewrite(exported, tmp_path / "bad.zip", {"vectors.npy": bytes(vectors_npy)})
    with imgdb.connect(url) as db:
        with pytest.raises(ImgdbError, match="finite"):
            db.import_index(bad)

        def left() -> tuple:
            with db.database.connect() as conn:
                return ({i.name for i in db.indexes()}, networks.record(conn, sha) is not None,
                        conn.exec_driver_sql("SELECT count(*) FROM images").scalar())

        assert left() == (set(), False, 0)
        # Killed while it writes: the import waits for a lock on `images` that this test holds.
        holder = db.database.engine.connect()
        holder.exec_driver_sql("LOCK TABLE images IN EXCLUSIVE MODE")
        process = subprocess.Popen(["imgdb", "index", "import", str(exported)], env=tool_env(IMGDB_DATABASE_URL=url),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not holder.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE relation = 'images'::regclass"
                                         " AND NOT granted").scalar():
            assert time.monotonic() < deadline and process.poll() is None, "the import never reached the images"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        holder.rollback()
        holder.close()
        deadline = time.monotonic() + 30
        while left() != (set(), False, 0):  # (the server ends the dead client's transaction when it notices)
            assert time.monotonic() < deadline, left()
            time.sleep(0.2)
        db.import_index(exported)
        assert {i.name for i in db.indexes()} == {"tuned"}
