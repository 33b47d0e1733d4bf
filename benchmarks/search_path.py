"""What imgdb's query path adds to the SQL it runs: ``Imgdb.search`` with a vector on an HNSW index
against the bare pgvector statement on the same index, queries interleaved in one process.

    python benchmarks/search_path.py [--base 200000] [--queries 3000]

The base is real SIFT descriptors of the museum images (benchmarks/ann_data.py). Three ways of
asking for the same 10 neighbours, each query asked all three ways in turn, in a rotating order (so
that the machine's drift between minutes, and whatever the first of a round pays, falls on all
alike), one at a time:
* ``SELECT image_id … ORDER BY embedding <-> %s LIMIT 10``: the bare statement;
* the same joined with ``images`` for the columns a hit carries (id, uri, metadata): the bare
  statement that returns what ``Imgdb.search`` returns;
* ``Imgdb.search(vector, k=10, rerank="none")``: the first stage's own order, as the statements.
All three on the one pooled connection ``Imgdb.search`` uses, so with the same settings
(``hnsw.ef_search`` 40, the iterative scan imgdb sets) and the same server backend.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import placeholder_images  # noqa: E402
from ann_data import load_sift  # noqa: E402
from common import private_imgdb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--profile", type=Path, help="also write a cProfile of Imgdb.search alone here")
    args = parser.parse_args()
    sift = load_sift()
    base = sift.base[: args.base]
    queries = np.concatenate([sift.queries] * (args.queries // len(sift.queries) + 1))[: args.queries]
    with private_imgdb() as db:
        ids = placeholder_images(db, len(base), "sift")
        db.create_index("sift", "external/dim=128", ann="hnsw")
        started = time.perf_counter()
        db.add_vectors(ids, base, index="sift")
        print(f"{len(base):,} vectors in an HNSW index in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        table = f'{db.database.schema}.{db.index("sift").vectors_table}'
        bare = f"SELECT image_id FROM {table} ORDER BY embedding <-> %s LIMIT 10"
        joined = (f"SELECT i.id, i.uri, i.metadata FROM (SELECT image_id, embedding <-> %s AS d FROM {table}"
                  f" ORDER BY d LIMIT 10) c JOIN {db.database.schema}.images i ON i.id = c.image_id ORDER BY c.d")
        pool = db.database.search_pool
        db.search(queries[0], k=10, index="sift", rerank="none")  # (its connection now has ef_search 40)

        def statement(sql: str):  # noqa: ANN202
            """The bare statement on the connection Imgdb.search uses (one backend for all three ways:
            alternating backends would cost the way that runs alone on its own), timed without the
            pool's check-out."""
            def run(q: np.ndarray) -> tuple[list[int], float]:
                with pool.connection() as conn:
                    started = time.perf_counter()
                    ids = [r[0] for r in conn.execute(sql, (q,), binary=True).fetchall()]
                    return ids, time.perf_counter() - started
            return run

        def imgdb_search(q: np.ndarray) -> tuple[list[int], float]:
            started = time.perf_counter()
            ids = [h.id for h in db.search(q, k=10, index="sift", rerank="none")]
            return ids, time.perf_counter() - started

        ways = {"bare statement (ids)": statement(bare), "bare statement (id, uri, metadata)": statement(joined),
                "Imgdb.search": imgdb_search}
        for q in queries[: args.warmup]:
            for way in ways.values():
                way(q)
        latencies = {name: np.empty(len(queries)) for name in ways}
        agree = 0
        names = list(ways)
        for i, q in enumerate(queries):
            answers = {}
            for name in names[i % 3:] + names[: i % 3]:  # (each way first in a third of the rounds)
                answers[name], latencies[name][i] = ways[name](q)
            agree += len({tuple(a) for a in answers.values()}) == 1
        if args.profile:
            import cProfile

            cProfile.runctx("for q in queries: imgdb_search(q)", globals(), locals(), str(args.profile))
    p50 = {name: float(np.median(v)) * 1e3 for name, v in latencies.items()}
    p99 = {name: float(np.percentile(v, 99)) * 1e3 for name, v in latencies.items()}
    print("| way | p50 ms | p99 ms | Imgdb.search / this, p50 | Imgdb.search / this, p99 |\n| --- | --- | --- | --- | --- |")
    for name in latencies:
        print(f"| {name} | {p50[name]:.3f} | {p99[name]:.3f} | {p50['Imgdb.search'] / p50[name]:.2f}x | "
              f"{p99['Imgdb.search'] / p99[name]:.2f}x |")
    print(f"\n{len(queries)} queries on {len(base):,} SIFT descriptors; the three gave the same ids for {agree}.")


if __name__ == "__main__":
    main()
