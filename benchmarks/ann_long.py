"""How long IVF-PQ takes to learn from whole VLAD-length vectors, by the number of sub-quantizers:
the figures behind :data:`imgdb.ann.registry.LONG_SUBQUANTIZERS`.

    python benchmarks/ann_long.py [ROWS:ANN ...]     (default: 4096 rows at m=2048, 512 and 256,
                                                       then 16384 and 65536 rows at m=256)

Random unit vectors of 8,192 dimensions (the length of RootSIFT-VLAD at k=64): the time of k-means
depends on the sizes, not on what the vectors hold. Each pair is learned the way the index layer
learns (``AnnMethod.learn``), then 4,096 vectors are encoded.
"""

from __future__ import annotations

import sys
import time

import numpy as np

DIM = 8192
DEFAULT = ["4096:ivfpq/m=2048", "4096:ivfpq/m=512", "4096:ivfpq/m=256", "16384:ivfpq/m=256", "65536:ivfpq/m=256"]


def main() -> None:
    from imgdb.ann.registry import method, parse_ann

    print("| rows | first stage | learning s | encoding 4,096 s | code bytes |\n| --- | --- | --- | --- | --- |")
    for pair in sys.argv[1:] or DEFAULT:
        rows, _, text = pair.partition(":")
        vectors = np.random.default_rng(0).normal(size=(int(rows), DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ann = parse_ann(text)
        found = method(ann.method)
        started = time.perf_counter()
        learned = found.learn(ann, DIM, vectors)
        learning = time.perf_counter() - started
        started = time.perf_counter()
        codes = found.code_index(ann, DIM, learned).encode(vectors[:4096])
        print(f"| {rows} | `{text}` | {learning:.1f} | {time.perf_counter() - started:.2f} | {codes.shape[1]} |",
              flush=True)


if __name__ == "__main__":
    main()
