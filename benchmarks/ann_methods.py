"""Every ANN method in the ordinary flow, on the museum set: the figures of the README's index table.

    python benchmarks/ann_methods.py [--methods hnsw,bq,...]

For each method: create an index with the default extractor (empty), ingest the 287 museum
paintings into it (fewer than a bulk load, so nothing is rebuilt at the end: the flow in which
binary quantization once kept a centre learned from the empty table), then search with each of the
60 query photos. Reported: how often the top hit with the exact re-rank (the default) is an exact
scan's top hit (the `none` index), the first stage's own recall@10 against the exact scan
(``--rerank none``), and the median latency of a search by vector. Uses the public API only, so the
same script measures an older checkout (``PYTHONPATH=/path/to/checkout``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import museum_or_exit, private_imgdb  # noqa: E402

METHODS = ("hnsw", "ivfflat", "bq", "pq", "ivfpq", "lsh", "kdtree", "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    museum = museum_or_exit()
    photos = sorted((museum / "queries").glob("*.jpg"))
    rows = []
    with private_imgdb() as db:
        db.create_index("exact", ann="none")
        db.ingest([museum / "images"], index="exact")
        queries = [db.embed(photo, index="exact") for photo in photos]
        truth = [[h.id for h in db.search(q, k=10, index="exact")] for q in queries]
        for method in args.methods.split(","):
            name = f"m_{method}"
            db.create_index(name, ann=method)
            started = time.perf_counter()
            report = db.ingest([museum / "images"], index=name)
            ingest_s = time.perf_counter() - started
            assert not report.failed, report.to_json()
            top = [db.search(q, k=1, index=name)[0].id for q in queries]
            agree = sum(t == want[0] for t, want in zip(top, truth))
            first = [[h.id for h in db.search(q, k=10, index=name, rerank="none")] for q in queries]
            recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(first, truth)]))
            latencies = []
            for q in queries:
                started = time.perf_counter()
                db.search(q, k=10, index=name)
                latencies.append(time.perf_counter() - started)
            rows.append((method, agree, len(queries), recall, statistics.median(latencies) * 1e3, ingest_s))
            print(f"{method}: top-1 {agree}/{len(queries)}, first-stage recall@10 {recall:.3f}", file=sys.stderr)
            db.drop_index(name)
    print("| method | top-1 = exact scan's (exact re-rank) | first stage's recall@10 | p50 ms | ingest s |")
    print("| --- | --- | --- | --- | --- |")
    for method, agree, n, recall, p50, ingest_s in rows:
        print(f"| `{method}` | {agree}/{n} | {recall:.3f} | {p50:.2f} | {ingest_s:.1f} |")


if __name__ == "__main__":
    main()
