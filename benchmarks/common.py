"""Helpers shared by the benchmark scripts: a private imgdb, the museum data set, model-only rates."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUSEUM = ROOT.parent / "shared" / "datasets" / "museum"


def museum_or_exit() -> Path:
    if not (MUSEUM / "images").is_dir():
        sys.exit(f"no data set at {MUSEUM}: the museum set lives in ../shared/datasets/museum")
    return MUSEUM


@contextmanager
def private_imgdb() -> Iterator[object]:
    """An imgdb client on a fresh embedded PostgreSQL in a temporary IMGDB_HOME, stopped afterwards."""
    home = tempfile.mkdtemp(prefix="imgdb-bench-")
    os.environ["IMGDB_HOME"] = home
    os.environ.pop("IMGDB_DATABASE_URL", None)
    import imgdb
    from imgdb.db.embedded import EmbeddedServer

    try:
        with imgdb.connect() as db:
            yield db
    finally:
        EmbeddedServer(Path(home)).stop()


def model_only_rate(extractor, paths: list[Path]) -> float:  # noqa: ANN001
    """Images/second of ``describe`` alone, on images decoded and prepared beforehand (untimed):
    the ceiling an ingest of the same images can reach."""
    from imgdb.io.reader import decode

    prepared = [extractor.prepare(decode(p.read_bytes(), max_pixels=10**9, scale_hint=extractor.scale_hint).pixels)
                for p in paths]
    extractor.describe(prepared[: extractor.batch_size])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(prepared), extractor.batch_size):
        extractor.describe(prepared[i : i + extractor.batch_size])
    return len(prepared) / (time.perf_counter() - started)


def percentile(samples: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(samples), q))


def serve(**environment: str) -> tuple[subprocess.Popen, str]:
    """``docker/start.sh`` on a free loopback port, in the current (private) IMGDB_HOME, with
    ``environment`` added to the server's; returns the process and its URL once /healthz answers."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "IMGDB_HOST": "127.0.0.1", "IMGDB_PORT": str(port), **environment,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(Path(os.environ["IMGDB_HOME"]) / "server.log", "wb")  # noqa: SIM115 - kept open for the child
    process = subprocess.Popen(["bash", str(ROOT / "docker" / "start.sh")], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit(f"the server did not come up; see {log.name}")
