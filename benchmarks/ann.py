"""Every first stage of imgdb's index layer, measured through imgdb's own query path.

    python benchmarks/ann.py [--skip-sift] [--skip-museum] [--hnsw-only] [--out benchmarks/results]

(a) the CNN descriptors of the museum paintings (default extractor), queried with the 60 query photos;
(b) ~1M SIFT descriptors of the museum images (benchmarks/ann_data.py), queried with 1,000 descriptors
of held-out photos, next to the raw SQL statement on the same pgvector index and faiss in-process.
For each method: recall@10 against exact search, QPS and p50/p99 latency of one query at a time,
build time (vectors in through ``Imgdb.add_vectors`` to searchable), and bytes per vector of the first
stage. Writes ``ann.md`` (the README's tables) and the recall-vs-QPS and KD-tree plots to ``--out``.
``--hnsw-only`` runs the HNSW rows of (b) and the bare statement alone (a check, after a change to the
query path, that its latency holds) and writes them to ``ann-hnsw.md`` instead.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann_data import (  # noqa: E402
    STDERR, Row, faiss_reference, kdtree_curve, kdtree_table, load_sift, markdown_table, plot_kdtree,
    plot_recall_qps, recall_at_10, single_thread, summarize, time_queries,
)
from common import museum_or_exit, private_imgdb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Untimed queries before each timed run: latencies of a server whose buffers hold the index.
WARMUP = 300


def placeholder_images(db, n: int, tag: str) -> np.ndarray:  # noqa: ANN001
    """One ``images`` row per descriptor, for ``add_vectors`` to hang the vectors on (not timed)."""
    from imgdb.db import images
    from imgdb.io.reader import ImageFacts

    ids: list[int] = []
    for start in range(0, n, 50_000):
        rows = [(f"sift://{tag}/{i}", ImageFacts(hashlib.sha256(f"{tag}/{i}".encode()).hexdigest(), 1, 1, "SIFT",
                                                 0, None, None), {}) for i in range(start, min(n, start + 50_000))]
        with db.database.engine.begin() as conn:
            ids += images.upsert(conn, rows)
    return np.asarray(ids, dtype=np.int64)


def first_stage_bytes(db, name: str, rows: int) -> float | None:  # noqa: ANN001
    """Bytes per vector of what the first stage adds to the vectors: the pgvector index, or the codes."""
    from imgdb.ann.codes import CodesMethod
    from imgdb.ann.pgvector import PgvectorMethod
    from imgdb.ann.registry import method

    index = db.index(name)
    found = method(index.ann)
    if isinstance(found, PgvectorMethod):
        with db.database.connect() as conn:
            return conn.exec_driver_sql(f"SELECT pg_relation_size('{index.ann_index}')").scalar_one() / rows
    if isinstance(found, CodesMethod):
        code_index = db.catalog.layer.code_index(index)
        return float(code_index.code_size) if code_index is not None else 4.0 * index.dim
    return None


def measure_imgdb(db, name: str, ann: str, ids: np.ndarray, base: np.ndarray, queries: np.ndarray,  # noqa: ANN001
                  truth: np.ndarray, runs: list[dict], storage: str = "vector", system: str = "imgdb") -> list[Row]:
    """Create an index, load the vectors (timed: the build), then time each set of search options."""
    db.create_index(name, f"external/dim={base.shape[1]}", ann=ann, storage=storage)
    started = time.perf_counter()
    db.add_vectors(ids, base, index=name)
    build_s = time.perf_counter() - started
    nbytes = first_stage_bytes(db, name, len(ids))
    row_of = {int(image_id): row for row, image_id in enumerate(ids)}
    rows = []
    for options in runs:
        limit = options.pop("queries", len(queries))

        def search(q: np.ndarray, options: dict = options) -> list[int]:
            return [row_of[h.id] for h in db.search(q[0], k=10, index=name, **options)]

        db.search(queries[0], k=10, index=name, **options)  # loads a Python-side searcher (not timed)
        with single_thread():
            found, latencies = time_queries(search, queries[:limit], warmup=min(WARMUP, limit))
        label = ann + ("" if storage == "vector" else f" {storage}") + "".join(f" {k}={v}" for k, v in options.items())
        rows.append(Row(system, ann.split("/")[0], label, recall_at_10(found, truth[:limit]), *summarize(latencies),
                        build_s, nbytes))
        STDERR.print(" | ".join(rows[-1].cells()))
    db.drop_index(name)
    return rows


def raw_sql(db, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, table: str,  # noqa: ANN001
            row_of: dict[int, int]) -> tuple[list[Row], dict]:
    """The reference statement: psycopg, ``ORDER BY embedding <-> %s LIMIT 10`` on ``table``'s HNSW index
    (a qualified name: this connection has the database's default search path),
    and what building such an index by hand costs with tuned settings (issue 6's reference recipe)."""
    rows = []
    with psycopg.connect(db.database.url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("CREATE TABLE raw_sift (id bigint PRIMARY KEY, embedding vector(128))")
        started = time.perf_counter()
        with conn.cursor().copy("COPY raw_sift (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "vector"])
            for i, vector in enumerate(base):
                copy.write_row((i, vector))
        copy_s = time.perf_counter() - started
        conn.execute("SET maintenance_work_mem = '6GB'")
        conn.execute("SET max_parallel_maintenance_workers = 1")
        started = time.perf_counter()
        conn.execute("CREATE INDEX ON raw_sift USING hnsw (embedding vector_l2_ops) WITH (m = 16, ef_construction = 64)")
        build_s = time.perf_counter() - started
        STDERR.print(f"raw: COPY {copy_s:.1f} s, CREATE INDEX {build_s:.1f} s")
        conn.execute("DROP TABLE raw_sift")
        for ef in (40, 80):
            conn.execute(f"SET hnsw.ef_search = {ef}")
            statement = f'SELECT image_id FROM {table} ORDER BY embedding <-> %s LIMIT 10'

            def search(q: np.ndarray) -> list[int]:
                return [row_of[r[0]] for r in conn.execute(statement, (q[0],), binary=True).fetchall()]

            found, latencies = time_queries(search, queries, warmup=WARMUP)
            rows.append(Row("raw SQL", "hnsw", f"m=16 ef_construction=64 ef_search={ef}", recall_at_10(found, truth),
                            *summarize(latencies), None, None))
            STDERR.print(" | ".join(rows[-1].cells()))
    return rows, {"copy_s": copy_s, "build_s": build_s}


def overhead_line(rows: list[Row]) -> str:
    """imgdb's p50 over the bare statement's at ef_search 40, where both return the same ids."""
    by = {(r.system, r.params): r for r in rows}
    imgdb40 = by[("imgdb", "m=16 ef_construction=64 ef_search=40")]
    raw40 = by[("raw SQL", "m=16 ef_construction=64 ef_search=40")]
    return (f"imgdb's overhead over the bare statement on the same index at ef_search 40 (same recall by "
            f"construction): p50 {imgdb40.p50_ms:.3f} / {raw40.p50_ms:.3f} ms = {imgdb40.p50_ms / raw40.p50_ms:.2f}x.")


def sift_benchmark(out: Path, hnsw_only: bool = False) -> str:
    sift = load_sift()
    STDERR.print(sift.describe)
    base, queries, truth = sift.base, sift.queries, sift.truth
    lines = [f"**(b) {sift.describe}.** Ground truth by exact search; queries one at a time on one core."]
    with private_imgdb() as db:
        ids = placeholder_images(db, len(base), "sift")
        rows = []
        # HNSW first, then the same pgvector index queried by the bare statement: overhead at equal recall.
        db.create_index("sift_hnsw", "external/dim=128", ann="hnsw")
        started = time.perf_counter()
        db.add_vectors(ids, base, index="sift_hnsw")
        hnsw_build = time.perf_counter() - started
        nbytes = first_stage_bytes(db, "sift_hnsw", len(ids))
        row_of = {int(image_id): row for row, image_id in enumerate(ids)}
        for candidates in (None, 60, 80, 120):
            def search(q: np.ndarray, c: int | None = candidates) -> list[int]:
                return [row_of[h.id] for h in db.search(q[0], k=10, index="sift_hnsw", rerank="none", candidates=c)]

            found, latencies = time_queries(search, queries, warmup=WARMUP)
            ef = max(40, candidates or 0)
            rows.append(Row("imgdb", "hnsw", f"m=16 ef_construction=64 ef_search={ef}", recall_at_10(found, truth),
                            *summarize(latencies), hnsw_build, nbytes))
            STDERR.print(" | ".join(rows[-1].cells()))
        raw_rows, raw = raw_sql(db, base, queries, truth,
                                  f'{db.database.schema}.{db.index("sift_hnsw").vectors_table}', row_of)
        rows += raw_rows
        db.drop_index("sift_hnsw")
        if hnsw_only:
            return "\n".join(lines + ["", markdown_table(rows), "", overhead_line(rows)])
        rows += measure_imgdb(db, "sift_ivfflat", "ivfflat", ids, base, queries, truth,
                              [{"rerank": "none"}])
        rows += measure_imgdb(db, "sift_pq", "pq", ids, base, queries, truth,
                              [{"rerank": "pq", "queries": 300}, {"rerank": "exact", "candidates": 100, "queries": 300}])
        rows += measure_imgdb(db, "sift_ivfpq", "ivfpq", ids, base, queries, truth,
                              [{"rerank": "exact", "candidates": 100}, {"rerank": "exact", "candidates": 200}])
        rows += measure_imgdb(db, "sift_lsh", "lsh/bits=512", ids, base, queries, truth,
                              [{"rerank": "exact", "candidates": 100, "queries": 300}])
        rows += measure_imgdb(db, "sift_kdtree", "kdtree", ids, base, queries, truth,
                              [{"rerank": "none", "queries": 50}])
    rows += faiss_reference(base, queries, truth)
    plot_recall_qps(rows, out / "ann-sift1m.png", f"{len(base):,} SIFT descriptors of the museum images")
    lines += ["", markdown_table(rows), "",
              f"Raw pgvector recipe: binary COPY of {len(base):,} rows {raw['copy_s']:.1f} s, CREATE INDEX (m 16, "
              f"ef_construction 64, maintenance_work_mem 6 GB, 1 parallel worker) {raw['build_s']:.1f} s, "
              f"{raw['copy_s'] + raw['build_s']:.1f} s together; imgdb's add_vectors (COPY, then its own build "
              f"settings) {hnsw_build:.1f} s = {hnsw_build / (raw['copy_s'] + raw['build_s']):.2f}x.",
              overhead_line(rows)]
    return "\n".join(lines)


def museum_benchmark() -> str:
    museum = museum_or_exit()
    with private_imgdb() as db:
        db.create_index("cnn", ann="none")
        db.ingest([museum / "images"], index="cnn")
        from imgdb.db import vectors

        with db.database.connect() as conn:
            ids, base = vectors.read(conn, db.index("cnn"))
        queries = np.stack([db.embed(p, index="cnn") for p in sorted((museum / "queries").glob("*.jpg"))])
        exact = np.argsort(((queries[:, None, :] - base[None]) ** 2).sum(-1), axis=1)[:, :100]
        rows = []
        for name, ann, storage, runs in [
            ("m_none", "none", "vector", [{}]),
            ("m_hnsw", "hnsw", "vector", [{"rerank": "none"}]),
            ("m_half", "hnsw", "halfvec", [{"rerank": "none"}]),
            ("m_ivfflat", "ivfflat", "vector", [{"rerank": "none"}]),
            ("m_bq", "bq", "vector", [{"rerank": "exact", "candidates": 100}]),
            ("m_pq", "pq", "vector", [{"rerank": "pq"}, {"rerank": "exact"}]),
            ("m_opq", "pq/opq=1", "vector", [{"rerank": "pq"}]),
            ("m_ivfpq", "ivfpq", "vector", [{"rerank": "exact"}]),
            ("m_lsh", "lsh", "vector", [{"rerank": "exact"}]),
            ("m_kdtree", "kdtree", "vector", [{"rerank": "none"}]),
        ]:
            rows += measure_imgdb(db, name, ann, ids, base, queries, exact, runs, storage)
    return "\n".join([f"**(a) {len(base)} museum paintings, default CNN descriptor ({base.shape[1]} dims), "
                      f"{len(queries)} query photos.**", "", markdown_table(rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-museum", action="store_true")
    parser.add_argument("--skip-sift", action="store_true")
    parser.add_argument("--skip-kdtree", action="store_true")
    parser.add_argument("--hnsw-only", action="store_true", help="only the HNSW rows of (b), to ann-hnsw.md")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"
    parts = [f"Machine: {machine}."]
    if args.hnsw_only:
        text = "\n\n".join(parts + [sift_benchmark(args.out, hnsw_only=True)]) + "\n"
        (args.out / "ann-hnsw.md").write_text(text)
        print(text)
        return
    if not args.skip_museum:
        parts.append(museum_benchmark())
    if not args.skip_sift:
        parts.append(sift_benchmark(args.out))
    if not args.skip_kdtree:
        curve = kdtree_curve()
        plot_kdtree(curve, args.out / "kdtree.png")
        parts.append("**KD-tree against brute force, exact 10-NN, one core.**\n\n" + kdtree_table(curve))
    text = "\n\n".join(parts) + "\n"
    (args.out / "ann.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
