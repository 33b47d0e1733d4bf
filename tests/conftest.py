"""Shared fixtures: one embedded PostgreSQL per test session, the museum data set, real images.

The session gets a private IMGDB_HOME, so tests never touch a developer's data; the server is
stopped when the session ends. The CNN model is built once per process (the extractor cache), so
every test that needs it shares one load.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

MUSEUM = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "museum"
#: A small, real slice of the museum gallery: enough to test retrieval without ingesting it all.
SAMPLE_SIZE = 40


def museum_or_skip() -> Path:
    if not (MUSEUM / "images").is_dir():
        pytest.skip(f"the museum data set is not at {MUSEUM} (it lives in ../shared/datasets/museum)")
    return MUSEUM


@pytest.fixture(scope="session")
def imgdb_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("imgdb-home")
    saved = {k: os.environ.get(k) for k in ("IMGDB_HOME", "IMGDB_DATABASE_URL")}
    os.environ["IMGDB_HOME"] = str(home)
    os.environ.pop("IMGDB_DATABASE_URL", None)
    yield home
    from imgdb.db.embedded import EmbeddedServer

    EmbeddedServer(home).stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def client(imgdb_home: Path):  # noqa: ANN201
    import imgdb

    with imgdb.connect() as db:
        yield db


@pytest.fixture(scope="session")
def museum() -> Path:
    return museum_or_skip()


@pytest.fixture(scope="session")
def museum_sample(museum: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data set folder of the first SAMPLE_SIZE gallery images (symlinked, not copied), their
    metadata, and the queries whose painting is among them."""
    root = tmp_path_factory.mktemp("museum-sample")
    (root / "images").mkdir()
    gallery = sorted((museum / "images").glob("*.jpg"))[:SAMPLE_SIZE]
    for path in gallery:
        (root / "images" / path.name).symlink_to(path)
    (root / "queries").symlink_to(museum / "queries")
    names = {f"images/{p.name}" for p in gallery}
    metadata = json.loads((museum / "metadata.json").read_text())
    (root / "metadata.json").write_text(json.dumps({k: v for k, v in metadata.items() if k in names}))
    queries = [q for q in json.loads((museum / "queries.json").read_text()) if set(q["relevant"]) <= names]
    (root / "queries.json").write_text(json.dumps(queries))
    return root


@pytest.fixture(scope="session")
def sample_index(client, museum_sample: Path) -> str:  # noqa: ANN001
    """The default (CNN) index holding the museum sample, with its metadata."""
    report = client.ingest([museum_sample / "images"], metadata_file=museum_sample / "metadata.json")
    assert not report.failed
    return "default"


@pytest.fixture(scope="session")
def sample_ids(client, sample_index: str) -> list[int]:  # noqa: ANN001
    """Ids of the sample index's images, in order (other tests may have added images before)."""
    from imgdb.db import store

    with client.database.connect() as conn:
        ids, _ = store.read_vectors(conn, client.index(sample_index))
    return ids.tolist()


@pytest.fixture(scope="session")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback serving a folder: (base URL, folder)."""
    folder = tmp_path_factory.mktemp("www")
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def copy_image(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
