"""imgdb on one PostgreSQL server and on a Citus cluster (a coordinator and two workers), same machine.

    python benchmarks/cluster.py [--skip-sift] [--skip-museum] [--shards 8] [--out benchmarks/results]

Both are servers of tests/servers.py with the same settings; the cluster's carry Citus, built from
../shared/vendor by tests/citus.py, and imgdb's tables are distributed (``Imgdb.distribute``) before
anything is loaded. On one machine a cluster can only show what it costs, not a speed-up: its shards
share the same two cores.

(a) the ~1M SIFT descriptors of the index benchmark (benchmarks/ann_data.py): vectors loaded through
``Imgdb.add_vectors`` into an index without a first stage (rows/s), then ``rebuild_index`` to HNSW
m=16, ef_construction=64 (the build, every shard's graph on the cluster); then 1,000 held-out
queries one at a time, recall@10 against exact search and p50/p99 latency, at ef_search 40, 80 and
120. The systems take turns by blocks of 100 queries, so that whatever else the machine does falls
on both alike. (b) the museum through the default extractor: ingest (images/s), then ``evaluate``
with exact re-ranking on both, which must agree to the fourth decimal. Writes ``cluster.md``; the
scaling model at its end is arithmetic on the measured bytes per vector and latencies.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from ann import placeholder_images  # noqa: E402
from ann_data import STDERR, load_sift, recall_at_10, single_thread, time_queries  # noqa: E402
from common import museum_or_exit  # noqa: E402

from tests import citus, servers  # noqa: E402

RESULTS = HERE / "results"
BLOCK = 100
WARMUP = 200
EF_SEARCH = (40, 80, 120)
SYSTEMS = ("one node", "cluster")


@contextmanager
def two_systems(root: Path, shards: int) -> Iterator[dict[str, object]]:
    """imgdb on a plain server and on a coordinator with two workers, both fresh."""
    import imgdb
    from imgdb.config import Settings

    settings = Settings(home=root / "home")
    single = servers.start(root / "single")
    cluster = citus.start(root / "cluster")
    try:
        with psycopg.connect(single.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE imgdb")
        with imgdb.connect(single.url("imgdb"), settings=settings) as one, \
                imgdb.connect(cluster.url, settings=settings) as many:
            layout = many.distribute(shards=shards)
            STDERR.print(f"cluster: {layout['shards']} shards over {len(cluster.workers)} workers")
            yield {"one node": one, "cluster": many}
    finally:
        cluster.stop()
        single.stop()


def interleaved(searches: dict[str, Callable[[np.ndarray], list[int]]], queries: np.ndarray
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each system's (found ids, latencies) over all queries, the systems taking turns by BLOCK."""
    for search in searches.values():
        time_queries(search, queries[:WARMUP], warmup=0)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in searches}
    for start in range(0, len(queries), BLOCK):
        for name, search in searches.items():
            parts[name].append(time_queries(search, queries[start:start + BLOCK], warmup=0))
    return {name: (np.concatenate([f for f, _ in got]), np.concatenate([t for _, t in got]))
            for name, got in parts.items()}


def sift(dbs: dict[str, object]) -> tuple[list[str], dict[str, float]]:
    data = load_sift()
    STDERR.print(data.describe)
    lines = [f"**(a) {data.describe}.** Exact ground truth; one query at a time; the systems take turns by "
             f"blocks of {BLOCK} queries.", "",
             "| system | load rows/s | HNSW build s | index bytes/vector | ef_search | recall@10 | p50 ms | p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    built: dict[str, tuple[float, float, float]] = {}
    row_of: dict[str, dict[int, int]] = {}
    for name, db in dbs.items():
        ids = placeholder_images(db, len(data.base), "sift")
        row_of[name] = {int(i): r for r, i in enumerate(ids)}
        db.create_index("sift", "external/dim=128", ann="none")
        started = time.perf_counter()
        db.add_vectors(ids, data.base, index="sift")
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        db.rebuild_index("sift", "hnsw/m=16/ef_construction=64")
        build_s = time.perf_counter() - started
        built[name] = (len(ids) / load_s, build_s, index_bytes(db, "sift") / len(ids))
        STDERR.print(f"{name}: load {built[name][0]:,.0f} rows/s, HNSW build {build_s:.1f} s, "
                     f"{built[name][2]:.0f} index bytes/vector")
    figures: dict[str, float] = {"bytes_per_vector": built["one node"][2]}
    for ef in EF_SEARCH:
        searches = {name: (lambda q, db=db, rows=row_of[name]: [
            rows[h.id] for h in db.search(q[0], k=10, index="sift", rerank="none", candidates=ef)])
            for name, db in dbs.items()}
        with single_thread():
            results = interleaved(searches, data.queries)
        for name in SYSTEMS:
            found, latencies = results[name]
            recall = recall_at_10(found, data.truth)
            p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
            figures[f"{name} p50 {ef}"], figures[f"{name} recall {ef}"] = float(p50), recall
            rate, build_s, nbytes = built[name]
            lines.append(f"| {name} | {rate:,.0f} | {build_s:.1f} | {nbytes:.0f} | {ef} | {recall:.3f} | "
                         f"{p50:.2f} | {p99:.2f} |")
            STDERR.print(lines[-1])
    lines.append("")
    for ef in EF_SEARCH:
        lines.append(f"- ef_search {ef}: cluster/one node p50 {figures[f'cluster p50 {ef}'] / figures[f'one node p50 {ef}']:.2f}x, "
                     f"recall@10 {figures[f'cluster recall {ef}']:.3f} vs {figures[f'one node recall {ef}']:.3f}")
    for db in dbs.values():
        db.drop_index("sift")
    return lines, figures


def index_bytes(db, name: str) -> float:  # noqa: ANN001
    """Bytes of the index's HNSW index, over every shard on a cluster (a shard's copy is named
    after the index with the shard's number appended)."""
    import sqlalchemy as sa

    index = db.index(name)
    with db.database.connect() as conn:
        if not db.database.distributed:
            return float(conn.execute(sa.text("SELECT pg_relation_size(CAST(:i AS regclass))"),
                                      {"i": index.ann_index}).scalar_one())
        command = ("SELECT coalesce(sum(pg_relation_size(oid)), 0) FROM pg_class"
                   f" WHERE relkind = 'i' AND relname LIKE '{index.ann_index}\\_%'")
        return float(conn.execute(sa.text("SELECT sum(result::bigint) FROM run_command_on_workers(:c)"),
                                  {"c": command}).scalar_one())


def museum(dbs: dict[str, object]) -> list[str]:
    data = museum_or_exit()
    gallery = sorted((data / "images").glob("*.jpg"))
    lines = [f"**(b) the museum: {len(gallery)} paintings through the default extractor, its 60 query photos, "
             "exact re-ranking.**", "", "| system | ingest images/s | mAP | recall@1 | recall@10 | all@10 |",
             "| --- | --- | --- | --- | --- | --- |"]
    reports = {}
    for db in dbs.values():
        db.embed(gallery[0])  # (the model loaded, its graph built: not timed)
    for name, db in dbs.items():
        started = time.perf_counter()
        added = db.ingest([data / "images"], metadata_file=data / "metadata.json").added
        rate = added / (time.perf_counter() - started)
        reports[name] = report = db.evaluate(data).to_json()
        lines.append(f"| {name} | {rate:.1f} | {report['mAP']:.4f} | {report['recall@1']:.4f} | "
                     f"{report['recall@10']:.4f} | {report['all@10']:.4f} |")
        STDERR.print(lines[-1])
    keys = ("mAP", "recall@1", "recall@10", "all@1", "all@10")
    same = all(reports["one node"][k] == reports["cluster"][k] for k in keys)
    lines += ["", f"Same figures on both, to the fourth decimal: {'yes' if same else 'NO'}."]
    return lines


#: Sizes of the scaling model: (label, vectors, dimensions, bytes per stored component).
MODEL = [("10M × 1280 halfvec", 10**7, 1280, 2), ("100M × 1280 halfvec", 10**8, 1280, 2),
         ("1B × 1280 halfvec", 10**9, 1280, 2), ("10M × 128", 10**7, 128, 4), ("100M × 128", 10**8, 128, 4),
         ("1B × 128", 10**9, 128, 4)]
#: Assumptions of the model: memory a worker gives to HNSW graphs (of 256 GB), vectors per shard.
WORKER_GRAPH_GB, SHARD_VECTORS = 192, 5 * 10**6


def scaling_model(figures: dict[str, float]) -> list[str]:
    """Workers, shards and memory per worker for larger collections, from this run's figures: the
    graph's own bytes per vector (the 128-dim index's size less its vector copies) and the single
    node's latency at 1M; one shard's search grows with the log of its size."""
    graph = figures["bytes_per_vector"] - 128 * 4
    base_ms = figures["one node p50 40"]
    lines = ["**Scaling model** (arithmetic on the figures above, not a measurement): each worker holds its "
             f"shards' HNSW indexes in {WORKER_GRAPH_GB} GB of memory; shards of about {SHARD_VECTORS:,} vectors; "
             f"graph overhead {graph:.0f} bytes/vector (measured, m=16) besides the vector's own copy in the index; "
             f"one shard answers in the single node's {base_ms:.2f} ms at 1M × log(shard size)/log(1M); a worker "
             "runs one shard's scan per core (16 assumed), so a query takes ⌈shards per worker / 16⌉ rounds, "
             "plus a 1 ms merge and network round trip.", "",
             "| collection | index GB | shards | workers | index GB per worker | expected p50 ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, n, dim, component in MODEL:
        index_gb = n * (dim * component + graph) / 1e9
        shards = max(1, -(-n // SHARD_VECTORS))
        workers = max(1, int(np.ceil(index_gb / WORKER_GRAPH_GB)))
        rounds = int(np.ceil(shards / workers / 16))
        per_shard = base_ms * np.log(min(n, SHARD_VECTORS)) / np.log(10**6)
        lines.append(f"| {label} | {index_gb:,.0f} | {shards} | {workers} | {index_gb / workers:,.0f} | "
                     f"{per_shard * rounds + 1:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-sift", action="store_true")
    parser.add_argument("--skip-museum", action="store_true")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    parts = [f"Machine: {machine}. Cluster: a coordinator and two workers, {args.shards} shards."]
    with tempfile.TemporaryDirectory(prefix="imgdb-cluster-") as root, two_systems(Path(root), args.shards) as dbs:
        if not args.skip_sift:
            lines, figures = sift(dbs)
            parts += ["\n".join(lines), "\n".join(scaling_model(figures))]
        if not args.skip_museum:
            parts.append("\n".join(museum(dbs)))
    text = "\n\n".join(parts) + "\n"
    (args.out / "cluster.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
