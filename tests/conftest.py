"""Shared fixtures: one embedded PostgreSQL per test session, the museum data set, real images.

The session gets a private IMGDB_HOME, so tests never touch a developer's data; the server is
stopped when the session ends. The CNN model is built once per process (the extractor cache), so
every test that needs it shares one load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MUSEUM = ROOT.parent / "shared" / "datasets" / "museum"
#: A small, real slice of the museum gallery: enough to test retrieval without ingesting it all.
SAMPLE_SIZE = 40

#: Fine-tuning, small and quick: one synthetic view per image, one trained stage, two epochs.
QUICK_TRAINING = {"epochs": 2, "views": 1, "train_stages": 1, "negatives": 3, "batch": 8}


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


def database_url(url: str, name: str, user: str | None = None) -> str:
    """``url`` pointed at another database of the same server (and optionally another role)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc if user is None else f"{user}@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}", netloc=netloc))


@pytest.fixture(scope="session")
def new_database(client) -> Callable[..., str]:  # noqa: ANN001
    """Make a fresh database on the session's embedded server (as its superuser) and return its URL:
    the stand-in for an application's own database. ``vector``: install pgvector first, as an
    administrator would."""
    import psycopg

    def make(name: str, *, vector: bool = True) -> str:
        admin = database_url(client.database.url, "postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        url = database_url(client.database.url, name)
        if vector:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION vector")
        return url

    return make


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - Iterator[tests.citus.Cluster]
    """A Citus coordinator and two workers on loopback, for the whole session (Citus built once, from
    its source release); skipped where it cannot be built, except under ``.ci/run``
    (``IMGDB_REQUIRE_CITUS``), where that fails."""
    from tests import citus

    try:
        citus.install()
    except citus.CitusUnavailable as exc:
        if os.environ.get("IMGDB_REQUIRE_CITUS"):
            raise
        pytest.skip(f"no Citus cluster here: {exc}")
    started = citus.start(tmp_path_factory.mktemp("citus"))
    yield started
    started.stop()


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
    from imgdb.db import vectors

    with client.database.connect() as conn:
        ids, _ = vectors.read(conn, client.index(sample_index))
    return ids.tolist()


@pytest.fixture(scope="session")
def tuned_index(client, sample_index: str):  # noqa: ANN001, ANN201
    """``sample_index`` fine-tuned (quickly) into ``tuned``: the training report, and the epochs
    and losses it reported as it went."""
    from imgdb.training.trainer import TrainOptions

    epochs: list[tuple[int, float]] = []
    report = client.train_network("tuned", sample_index, options=TrainOptions(**QUICK_TRAINING),
                                  on_epoch=lambda e, n, loss, left: epochs.append((e, loss)))
    return report, epochs


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


@dataclasses.dataclass
class ObjectStore:
    """An S3-compatible server on loopback and the environment that reaches it (credentials and
    endpoint as a user sets them); ``bucket`` exists, ``put`` writes an object."""

    env: dict[str, str]
    bucket: str

    def put(self, key: str, data: bytes) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name=self.env["AWS_REGION"],
                     aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"]).put_object(
            Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """moto's standalone S3 server (a separate process speaking the S3 protocol over HTTP) on a free
    loopback port, with one bucket; its credentials and endpoint are in this process's environment
    for the session, as a user's would be (a local Ray started afterwards hands them to its workers)."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "imgdb-test", "AWS_SECRET_ACCESS_KEY": "imgdb-test-secret",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1"}
    store = ObjectStore(env, "gallery")
    deadline = time.monotonic() + 30
    while True:
        try:
            boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                         aws_access_key_id="x", aws_secret_access_key="y").create_bucket(Bucket=store.bucket)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: {log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.2)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield store
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.terminate()
    server.wait(10)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def copy_image(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tool_env(**overrides: str) -> dict[str, str]:
    """The environment for running imgdb's scripts: the session's IMGDB_HOME, and the ``imgdb``
    command of the Python running the tests first on PATH (CI does not activate the venv)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **overrides}


#: The live server's deadline for request heads (short, so that its test is quick).
LIVE_HEADER_TIMEOUT = 3.0


@dataclasses.dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def live_server(client, sample_index: str, museum_sample: Path,  # noqa: ANN001
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real ``imgdb serve`` process, started the way the container starts (``docker/start.sh``:
    migrate, ingest what IMGDB_INGEST_ON_START names, serve), on loopback against the session's
    embedded database, which already holds the museum sample."""
    with started_like_the_container(tmp_path_factory.mktemp("live-server"),
                                    IMGDB_INGEST_ON_START=str(museum_sample / "images"),
                                    IMGDB_HEADER_TIMEOUT=str(LIVE_HEADER_TIMEOUT)) as server:
        yield server


@contextlib.contextmanager
def started_like_the_container(folder: Path, **env: str) -> Iterator[LiveServer]:
    """``docker/start.sh`` with ``env`` on a free loopback port, once ``/healthz`` answers; stopped
    as docker stops it (SIGTERM) on leaving."""
    port = free_port()
    log = folder / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(["bash", str(ROOT / "docker" / "start.sh")], stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL,
                                   env=tool_env(IMGDB_HOST="127.0.0.1", IMGDB_PORT=str(port), **env))
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            pytest.fail(f"docker/start.sh exited with {process.returncode}:\n{server.output()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"imgdb serve did not answer /healthz within 300 s:\n{server.output()[-3000:]}")
        time.sleep(0.5)
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
