"""Ingest through a local Ray cluster against the local path: same machine, same images, same extractor.

    python benchmarks/ray_ingest.py [--copies 6] [--rounds 2] [--out benchmarks/results]

Images: the museum gallery (287 paintings), and a larger set made of ``--copies`` variants of each
painting (one row of pixels changed, re-encoded as JPEG at quality 92, so that every content hash
differs), written to a temporary folder. Every run ingests one set into a fresh database of a private
embedded PostgreSQL with the default extractor, as a user runs it: ``imgdb ingest FOLDER --json`` in
a new process, locally or with ``--ray ADDRESS`` (the default pool, one actor with this machine's
cores, on a Ray started once by this script with ``ray.init(num_cpus=<cores>)``), in turns,
``--rounds`` times. Each run's time is the report's ``seconds``: from the start of the ingest, the
model's load included (in the actor, for Ray; the network's ONNX graph is exported once before the
runs, by an ingest of the gallery into a database of its own); the steady rate leaves the start out (images committed from a
quarter of the load to the last, as a connection of its own sees them every 0.1 s). Peak memory: the
sum of the resident sets of this process and all its children (the command, Ray's GCS, raylet,
workers and actors), sampled every 0.1 s; shared pages count once per process, so it is an upper
bound. The vectors both paths wrote are compared
image by image.

For the scaling model: decoding and preparing alone, per core (what a GPU node's CPUs must feed its
GPU), and PostgreSQL's side of a load, measured here: binary COPY of 1280-dimensional vectors
(``add_vectors`` into an index without a first stage, 50,000 rows) and the HNSW build over them.
Writes ``ray_ingest.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import museum_or_exit, private_imgdb  # noqa: E402

RESULTS = HERE / "results"
#: Vectors of the COPY and HNSW measurement (1280 dimensions, the default extractor's).
COPY_ROWS, COPY_DIM = 50_000, 1280


def variants(gallery: list[Path], copies: int, root: Path) -> Path:
    """``copies`` variants of every painting, each with one row of pixels set to its copy number."""
    folder = root / "variants"
    folder.mkdir()
    for path in gallery:
        image = Image.open(path).convert("RGB")
        pixels = np.asarray(image).copy()
        for copy in range(1, copies + 1):
            pixels[0, :, :] = copy
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=92)
            (folder / f"{path.stem}_{copy}.jpg").write_bytes(buffer.getvalue())
    return folder


@contextmanager
def peak_memory() -> Iterator[Callable[[], float]]:
    """The largest sum of resident sets of this process and its descendants while the block runs (GiB)."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield lambda: peak[0] / 2**30
    finally:
        done.set()
        sampler.join()


def fresh_database(admin_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urllib.parse.urlsplit(admin_url)._replace(path=f"/{name}").geturl()


def vectors_by_uri(db) -> dict[str, np.ndarray]:  # noqa: ANN001
    import json

    table = db.index("default").vectors_table
    with db.database.connect() as conn:
        rows = conn.exec_driver_sql(f'SELECT i.uri, v.embedding::text FROM images i JOIN "{table}" v ON v.image_id = i.id')
        return {uri: np.asarray(json.loads(vector), dtype=np.float32) for uri, vector in rows}


def ingest_command(url: str, folder: Path, ray_address: str | None) -> dict[str, object]:
    """``imgdb ingest FOLDER [--ray ADDRESS] --json`` in a process of its own, as a user runs it: its
    report (whose ``seconds`` start when the ingest does, model load included)."""
    command = [str(Path(sys.executable).parent / "imgdb"), "ingest", str(folder), "--json"]
    done = subprocess.run(command + (["--ray", ray_address] if ray_address else []), capture_output=True, text=True,
                          env={**os.environ, "IMGDB_DATABASE_URL": url}, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def ingest_runs(admin_url: str, sets: dict[str, Path], rounds: int,
                ray_address: str) -> tuple[list[str], dict[str, float]]:
    """Local and Ray in turn on each set; the table and the figures of the larger set."""
    import imgdb

    lines = ["| images | path | images/s (each round) | median images/s | steady images/s | peak memory GiB "
             "| Ray / local | steady Ray / local |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    figures: dict[str, float] = {}
    ingest_command(fresh_database(admin_url, "bench_warm"), next(iter(sets.values())), None)  # (the ONNX export)
    for label, folder in sets.items():
        rates: dict[str, list[float]] = {"local": [], "Ray": []}
        steady: dict[str, list[float]] = {"local": [], "Ray": []}
        memory: dict[str, float] = {"local": 0.0, "Ray": 0.0}
        written: dict[str, dict[str, np.ndarray]] = {}
        for round_ in range(rounds):
            for path in ("local", "Ray"):
                url = fresh_database(admin_url, f"bench_{path.lower()}_{round_}")
                with imgdb.connect(url) as db:
                    with peak_memory() as peak, committed(db) as counts:
                        report = ingest_command(url, folder, ray_address if path == "Ray" else None)
                        assert not report["failed"], report["failed"][:3]
                        rates[path].append(report["added"] / report["seconds"])
                        memory[path] = max(memory[path], peak())
                    steady[path].append(steady_rate(counts, report["added"]))
                    if round_ == 0:
                        written[path] = vectors_by_uri(db)
                print(f"{label}: {path} round {round_ + 1}: {rates[path][-1]:.1f} images/s", file=sys.stderr)
        assert written["local"].keys() == written["Ray"].keys()
        difference = max(float(np.abs(written["local"][uri] - written["Ray"][uri]).max()) for uri in written["local"])
        ratio = statistics.median(rates["Ray"]) / statistics.median(rates["local"])
        steady_ratio = statistics.median(steady["Ray"]) / statistics.median(steady["local"])
        for path in ("local", "Ray"):
            each = ", ".join(f"{rate:.1f}" for rate in rates[path])
            lines.append(f"| {label} | {path} | {each} | {statistics.median(rates[path]):.1f} | "
                         f"{statistics.median(steady[path]):.1f} | {memory[path]:.2f} | "
                         + (f"{ratio:.2f} | {steady_ratio:.2f} |" if path == "Ray" else "| |"))
        lines.append(f"| {label} | vectors | largest difference between the two paths' vectors: {difference:.2g} "
                     f"over {len(written['local'])} images | | | | | |")
        figures.update({"ray_rate": statistics.median(rates["Ray"]), "local_rate": statistics.median(rates["local"]),
                        "ratio": ratio, "steady_ray_rate": statistics.median(steady["Ray"])})
    return lines, figures


@contextmanager
def committed(db) -> Iterator[list[tuple[float, int]]]:  # noqa: ANN001
    """(time, images committed) every 0.1 s while the block runs, read from the database by a
    connection of its own: what both paths have written, whenever their reports reach the driver."""
    import psycopg

    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        with psycopg.connect(db.database.url, autocommit=True) as conn:
            while True:  # (once more after the block: its last commit may be under 0.1 s before its end)
                found = conn.execute(f'SELECT count(*) FROM "{db.database.schema}".images').fetchone()
                samples.append((time.perf_counter(), int(found[0])))
                if done.is_set():
                    break
                done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


def steady_rate(counts: list[tuple[float, int]], total: int) -> float:
    """Images/s committed from a quarter of the load to the last image: the rate once started (a Ray
    actor's process start and model load, the local path's model load and first batches come
    before), without the ANN build after the last image."""
    start = next(sample for sample in counts if sample[1] >= total / 4)
    end = next(sample for sample in counts if sample[1] >= total)
    return (end[1] - start[1]) / (end[0] - start[0])


def decode_rate(gallery: list[Path]) -> float:
    """Images/s of reading, decoding and preparing alone, on one core (what feeds a model)."""
    from imgdb.config import Settings
    from imgdb.features.registry import DEFAULT_SPEC, create_extractor
    from imgdb.io.reader import decode

    extractor, limits = create_extractor(DEFAULT_SPEC), Settings().decoding
    started = time.perf_counter()
    for path in gallery:
        extractor.prepare(decode(path.read_bytes(), limits=limits, scale_hint=extractor.scale_hint).pixels)
    return len(gallery) / (time.perf_counter() - started)


def postgres_side(db) -> dict[str, float]:  # noqa: ANN001
    """COPY rows/s of 1280-dim vectors and the HNSW build over them (vectors random on the unit sphere:
    a harder graph than real descriptors, so the build time is an upper bound)."""
    from ann import placeholder_images

    ids = placeholder_images(db, COPY_ROWS, "copy")
    found = np.random.default_rng(0).standard_normal((COPY_ROWS, COPY_DIM), dtype=np.float32)
    found /= np.linalg.norm(found, axis=1, keepdims=True)
    db.create_index("copy", f"external/dim={COPY_DIM}", ann="none")
    started = time.perf_counter()
    db.add_vectors(ids, found, index="copy")
    copy_rate = COPY_ROWS / (time.perf_counter() - started)
    started = time.perf_counter()
    db.rebuild_index("copy", "hnsw/m=16/ef_construction=64")
    build_rate = COPY_ROWS / (time.perf_counter() - started)
    return {"copy_rate": copy_rate, "build_rate": build_rate}


def scaling_model(figures: dict[str, float], cores: int) -> list[str]:
    """Wall time of 10M and 100M images on N nodes from this run's rates (arithmetic, not measured)."""
    per_core = figures["steady_ray_rate"] / cores
    lines = [f"**Scaling model** (arithmetic on the figures above). Extraction through Ray: "
             f"{per_core:.1f} images/s per CPU core (the default extractor's steady rate on {cores} cores; a "
             "load of millions spends seconds starting). A GPU node is fed "
             f"by its CPUs, which read, decode and prepare at {figures['decode_rate']:.0f} images/s per core "
             "(measured here); the GPU's own rate is not measured here (no GPU), so the GPU column assumes "
             "a node of 16 cores whose decoding, not its GPU, is the bound. PostgreSQL takes the vectors at "
             f"{figures['copy_rate']:,.0f} rows/s by binary COPY (1280 dimensions, one server, measured) and "
             f"builds HNSW at {figures['build_rate']:,.0f} vectors/s on {cores} cores (random unit vectors, "
             "an upper bound); past that rate, more extraction nodes do not help one server (a Citus "
             "cluster writes on each worker).", "",
             "| images | nodes | CPU nodes of 32 cores | GPU nodes (16 cores feeding each) |",
             "| --- | --- | --- | --- |"]
    gpu_node = 16 * figures["decode_rate"]
    for images in (10**7, 10**8):
        for nodes in (1, 10, 100):
            cells = []
            for node_rate in (32 * per_core, gpu_node):
                rate = min(nodes * node_rate, figures["copy_rate"])
                cells.append(hours(images / rate) + (" (COPY-bound)" if nodes * node_rate > figures["copy_rate"] else ""))
            lines.append(f"| {images // 10**6}M | {nodes} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Then one HNSW build over the whole collection: {hours(10**7 / figures['build_rate'])} for 10M and "
              f"{hours(10**8 / figures['build_rate'])} for 100M at this machine's rate, which grows with the "
              "server's cores (pgvector builds in parallel) and, on Citus, with the workers."]
    return lines


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.0f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    museum = museum_or_exit()
    gallery = sorted((museum / "images").glob("*.jpg"))
    cores = os.cpu_count() or 1

    import ray

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="imgdb-ray-") as root, private_imgdb() as db:
        sets = {f"{len(gallery)} paintings": museum / "images",
                f"{len(gallery) * args.copies} variants": variants(gallery, args.copies, Path(root))}
        admin = urllib.parse.urlsplit(db.database.url)._replace(path="/postgres").geturl()
        lines, figures = ingest_runs(admin, sets, args.rounds, ray.get_runtime_context().gcs_address)
        figures["decode_rate"] = decode_rate(gallery)
        figures.update(postgres_side(db))
    ray.shutdown()
    machine = f"{platform.machine()}, {cores} cores, Python {platform.python_version()}, Ray {ray.__version__}"
    text = "\n\n".join([
        f"Machine: {machine}. Default extractor; each run a fresh database; local and Ray in turn, "
        f"{args.rounds} rounds.", "\n".join(lines),
        f"Decoding and preparing alone: {figures['decode_rate']:.1f} images/s on one core. PostgreSQL: binary COPY "
        f"of {COPY_ROWS:,} vectors of {COPY_DIM} dimensions {figures['copy_rate']:,.0f} rows/s; HNSW build over them "
        f"(m=16, ef_construction=64) {figures['build_rate']:,.0f} vectors/s.",
        "\n".join(scaling_model(figures, cores))]) + "\n"
    (args.out / "ray_ingest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
