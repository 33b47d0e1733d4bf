"""imgdb's PQ first stage against faiss's IndexPQ on the same 1M SIFT vectors, queries interleaved.

    python benchmarks/pq_vs_faiss.py

PQ scans are memory-bound, and on this virtual machine their speed drifts by 2x between runs (the
faiss row of benchmarks/ann.py has measured 6.8 to 21 ms for the same search). Alternating the two
systems query by query puts them under the same conditions, so their ratio means something.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import placeholder_images  # noqa: E402
from ann_data import load_sift, recall_at_10, single_thread  # noqa: E402
from common import private_imgdb  # noqa: E402

QUERIES = 300


def main() -> None:
    sift = load_sift()
    base, queries, truth = sift.base, sift.queries[:QUERIES], sift.truth[:QUERIES]
    reference = faiss.IndexPQ(base.shape[1], 32, 8)
    reference.train(base[np.random.default_rng(0).choice(len(base), 262_144, replace=False)])
    reference.add(base)
    with private_imgdb() as db:
        ids = placeholder_images(db, len(base), "sift")
        row_of = {int(image_id): row for row, image_id in enumerate(ids)}
        db.create_index("pq", "external/dim=128", ann="pq")
        db.add_vectors(ids, base, index="pq")
        db.search(queries[0], k=10, index="pq", rerank="pq")  # loads the codes (not timed)
        found = {"imgdb": np.full((QUERIES, 10), -1), "faiss": np.full((QUERIES, 10), -1)}
        seconds = {"imgdb": np.empty(QUERIES), "faiss": np.empty(QUERIES)}
        with single_thread():
            for i, q in enumerate(queries):
                started = time.perf_counter()
                hits = db.search(q, k=10, index="pq", rerank="pq")
                seconds["imgdb"][i] = time.perf_counter() - started
                found["imgdb"][i, : len(hits)] = [row_of[h.id] for h in hits]
                started = time.perf_counter()
                found["faiss"][i] = reference.search(q[None], 10)[1][0]
                seconds["faiss"][i] = time.perf_counter() - started
    p50 = {name: float(np.median(s)) * 1e3 for name, s in seconds.items()}
    for name in ("imgdb", "faiss"):
        print(f"{name}: PQ32x8 over {len(base):,} vectors, recall@10 {recall_at_10(found[name], truth):.3f}, "
              f"p50 {p50[name]:.2f} ms, p99 {np.percentile(seconds[name], 99) * 1e3:.2f} ms")
    print(f"imgdb / faiss at p50: {p50['imgdb'] / p50['faiss']:.2f}x ({QUERIES} interleaved queries, one core)")


if __name__ == "__main__":
    main()
