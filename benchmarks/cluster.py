"""imgdb on one PostgreSQL server and on Citus clusters (a coordinator and two workers), same machine.

    python benchmarks/cluster.py [--skip-sift] [--skip-museum] [--shards 2 8] [--out benchmarks/results]

Every system is made of servers of tests/servers.py with the same settings; a cluster's carry Citus,
built from ../shared/vendor by tests/citus.py, and imgdb's tables are distributed over ``--shards``
shards (``Imgdb.distribute``; one cluster per count) before anything is loaded. On one machine a
cluster can only show what it costs, not a speed-up: its shards share the same two cores.

(a) the ~1M SIFT descriptors of the index benchmark (benchmarks/ann_data.py): vectors loaded through
``Imgdb.add_vectors`` into an index without a first stage (rows/s), then ``rebuild_index`` to HNSW
m=16, ef_construction=64 (the build, every shard's graph on a cluster); then 1,000 held-out
queries one at a time, recall@10 against exact search and p50/p99 latency, at ef_search 40, 80 and
120. The systems take turns by blocks of 100 queries, so that whatever else the machine does falls
on all alike. (b) the museum through the default extractor: ingest (images/s), then ``evaluate``
with exact re-ranking on each, which must agree to the fourth decimal. Writes ``cluster.md``; the
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
from contextlib import ExitStack, contextmanager
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
SINGLE = "one node"


def cluster_name(shards: int) -> str:
    return f"cluster, {shards} shards"


@contextmanager
def systems(root: Path, shard_counts: list[int]) -> Iterator[dict[str, object]]:
    """imgdb on a plain server and on one coordinator with two workers per shard count, all fresh."""
    import imgdb
    from imgdb.config import Settings

    settings = Settings(home=root / "home")
    with ExitStack() as stack:
        single = servers.start(root / "single")
        stack.callback(single.stop)
        with psycopg.connect(single.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE imgdb")
        dbs = {SINGLE: stack.enter_context(imgdb.connect(single.url("imgdb"), settings=settings))}
        for shards in shard_counts:
            cluster = citus.start(root / f"cluster{shards}")
            stack.callback(cluster.stop)
            db = dbs[cluster_name(shards)] = stack.enter_context(imgdb.connect(cluster.url, settings=settings))
            layout = db.distribute(shards=shards)
            STDERR.print(f"cluster: {layout['shards']} shards over {len(cluster.workers)} workers")
        yield dbs


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
    """Load, build and query every system; the table's lines and the figures the model needs."""
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
    figures: dict[str, float] = {"bytes_per_vector": built[SINGLE][2], "vectors": len(data.base)}
    for ef in EF_SEARCH:
        searches = {name: (lambda q, db=db, rows=row_of[name]: [
            rows[h.id] for h in db.search(q[0], k=10, index="sift", rerank="none", candidates=ef)])
            for name, db in dbs.items()}
        with single_thread():
            results = interleaved(searches, data.queries)
        for name in dbs:
            found, latencies = results[name]
            recall = recall_at_10(found, data.truth)
            p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
            figures[f"{name} p50 {ef}"], figures[f"{name} recall {ef}"] = float(p50), recall
            rate, build_s, nbytes = built[name]
            lines.append(f"| {name} | {rate:,.0f} | {build_s:.1f} | {nbytes:.0f} | {ef} | {recall:.3f} | "
                         f"{p50:.2f} | {p99:.2f} |")
            STDERR.print(lines[-1])
    lines.append("")
    for name in list(dbs)[1:]:
        for ef in EF_SEARCH:
            lines.append(f"- {name}, ef_search {ef}: p50 {figures[f'{name} p50 {ef}'] / figures[f'{SINGLE} p50 {ef}']:.2f}× "
                         f"the single node's, recall@10 {figures[f'{name} recall {ef}']:.3f} vs "
                         f"{figures[f'{SINGLE} recall {ef}']:.3f}")
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
    same = all(round(report[k], 4) == round(reports[SINGLE][k], 4) for report in reports.values() for k in keys)
    lines += ["", f"Same figures on every system, to the fourth decimal: {'yes' if same else 'NO'}."]
    return lines


#: Sizes of the scaling model: (label, vectors, dimensions, bytes per stored component).
MODEL = [("10M × 1280 halfvec", 10**7, 1280, 2), ("100M × 1280 halfvec", 10**8, 1280, 2),
         ("1B × 1280 halfvec", 10**9, 1280, 2), ("10M × 128", 10**7, 128, 4), ("100M × 128", 10**8, 128, 4),
         ("1B × 128", 10**9, 128, 4)]
#: The worker of the model: cores, and the memory it gives to HNSW indexes (of 256 GB).
WORKER_CORES, WORKER_INDEX_GB = 32, 192
#: Shards per worker: one task per two cores, so a query is one round and two run at once.
SHARDS_PER_WORKER = WORKER_CORES // 2


def shard_ms(base_ms: float, base_n: int, vectors: float, dim: int = 128) -> float:
    """One shard's HNSW search: the single node's measured time at ``base_n`` 128-dim vectors, growing
    with the log of the shard's size and (assumed, not measured here) linearly with the dimension."""
    return base_ms * dim / 128 * np.log(vectors) / np.log(base_n)


def scaling_model(figures: dict[str, float], shard_counts: list[int]) -> list[str]:
    """Workers, shards and memory per worker for larger collections, from this run's figures: the
    graph's own bytes per vector (the 128-dim index's size less its vector copies), the single
    node's latency, and the cluster's fixed cost per query, the smallest cluster's p50 less one
    shard's search (its shards run at once, one per core); the other clusters check the model."""
    n, base_ms = int(figures["vectors"]), figures[f"{SINGLE} p50 40"]
    graph = figures["bytes_per_vector"] - 128 * 4
    smallest = min(shard_counts)
    overhead = figures[f"{cluster_name(smallest)} p50 40"] - shard_ms(base_ms, n, n / smallest)
    checks = []
    for shards in shard_counts:
        rounds = int(np.ceil(shards / os.cpu_count()))
        predicted = rounds * shard_ms(base_ms, n, n / shards) + overhead
        checks.append(f"{shards} shards: model {predicted:.2f} ms, measured {figures[f'{cluster_name(shards)} p50 40']:.2f} ms")
    lines = ["**Scaling model** (arithmetic on the figures above at ef_search 40, not a measurement). From this run: "
             f"HNSW graph {graph:.0f} bytes/vector besides the index's copy of the vector (m=16); one search "
             f"of {n:,} 128-dim vectors {base_ms:.2f} ms; the cluster's own cost per query (planning, the "
             f"tasks' round trips, the merge) {overhead:.2f} ms, the {smallest}-shard cluster's p50 less one "
             f"shard's search. A query's shards run one per core, so on these {os.cpu_count()} cores the model "
             f"says {'; '.join(checks)}. For the table: workers of {WORKER_CORES} cores giving {WORKER_INDEX_GB} GB "
             f"to HNSW indexes; {SHARDS_PER_WORKER} shards per worker, so that a query is one round of tasks; "
             "a shard's search grows with the log of its size and (assumed) linearly with the dimension.", "",
             "| collection | HNSW GB | workers | shards | vectors per shard | expected p50 ms | CPU ms per query "
             "| queries/s, all cores |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, vectors, dim, component in MODEL:
        index_gb = vectors * (dim * component + graph) / 1e9
        workers = max(1, int(np.ceil(index_gb / WORKER_INDEX_GB)))
        shards = workers * SHARDS_PER_WORKER
        one = shard_ms(base_ms, n, vectors / shards, dim)
        cpu = shards * one
        lines.append(f"| {label} | {index_gb:,.0f} | {workers} | {shards} | {vectors / shards:,.0f} | "
                     f"{one + overhead:.1f} | {cpu:,.0f} | {workers * WORKER_CORES * 1e3 / cpu:,.0f} |")
    lines += ["", "Where it stops scaling: every query visits every shard, so each worker spends on each query the "
              "searches of all its shards, and the queries per second of the whole cluster stay what one worker "
              "serves (the last column is flat) however many workers hold the data: workers buy memory, and a latency "
              "that stays flat as the collection grows (by the log of a shard's size), not throughput. Throughput "
              "grows with copies of the data: read replicas (`IMGDB_READ_DATABASE_URL` for a whole cluster's "
              "standby). Fewer, bigger shards spend less CPU per query (the log again) but build longer and move "
              "slower when rebalanced. The one coordinator also plans and merges every query (the fixed cost above) "
              "and opens a connection per shard on the workers (bounded by `citus.max_shared_pool_size`)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-sift", action="store_true")
    parser.add_argument("--skip-museum", action="store_true")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 8], help="one cluster per shard count")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    parts = [f"Machine: {machine}. Each cluster: a coordinator and two workers on this machine; shard counts "
             f"{', '.join(map(str, args.shards))}."]
    with tempfile.TemporaryDirectory(prefix="imgdb-cluster-") as root, systems(Path(root), args.shards) as dbs:
        if not args.skip_sift:
            lines, figures = sift(dbs)
            parts += ["\n".join(lines), "\n".join(scaling_model(figures, args.shards))]
        if not args.skip_museum:
            parts.append("\n".join(museum(dbs)))
    text = "\n\n".join(parts) + "\n"
    (args.out / "cluster.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
