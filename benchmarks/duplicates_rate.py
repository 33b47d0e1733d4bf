"""The duplicates job's rate and memory at scale: ``imgdb duplicates`` over 100k vectors.

    python benchmarks/duplicates_rate.py [--vectors 100000] [--dim 256] [--k 20] [--out benchmarks/results]

No 100k-image collection fits this machine's time, so the vectors are synthetic, in an ``external``
index with an HNSW first stage: unit vectors around 2,000 centres (images alike but not the same),
a tenth of them near copies of another (a small perturbation: the duplicates to find). An external
index has no images to calibrate on, so its score model is set by hand (a distance of 0.15 scores
0.5); everything else is the job as it runs on any index without local features: each image's
``--k`` nearest through the index, judged, kept chunk by chunk, grouped. Verification's own cost is
benchmarks/duplicates.py's (the verified index's job rate there).

Prints and writes ``duplicates_rate.md``: the first run (every image compared), a second run with
nothing new (the groups made again), the peak memory of the process, and the extrapolation to 1M.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ann import placeholder_images  # noqa: E402
from common import private_imgdb  # noqa: E402

RESULTS = HERE / "results"


def vectors(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``n`` unit vectors around 2,000 centres, a tenth of them near copies of another; and how many."""
    centres = rng.normal(size=(2000, dim)).astype(np.float32)
    base = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.6, size=(n, dim)).astype(np.float32)
    copies = rng.choice(n, n // 10, replace=False)
    originals = rng.integers(0, n, len(copies))
    base[copies] = base[originals] + rng.normal(scale=0.02, size=(len(copies), dim)).astype(np.float32)
    return base / np.linalg.norm(base, axis=1, keepdims=True), len(copies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from imgdb.db import state
    from imgdb.query import scores

    base, copies = vectors(args.vectors, args.dim, np.random.default_rng(0))
    with private_imgdb() as db:
        db.create_index("rate", f"external/dim={args.dim}", ann="hnsw")
        ids = placeholder_images(db, len(base), "dups")
        started = time.perf_counter()
        db.add_vectors(ids, base, index="rate")
        load = time.perf_counter() - started
        with db.database.engine.begin() as conn:  # (a distance of 0.15 scores 0.5; 0.05 scores 0.98)
            state.save(conn, db.index("rate"), {scores.DISTANCE: np.array([6.0, -40.0])}, scores.STATE_OWNER)
        db.catalog.layer.forget()
        started = time.perf_counter()
        first = db.duplicates("rate", k=args.k)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        again = db.duplicates("rate", k=args.k)
        again_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    groups = sum(1 for g in first.groups if g["level"] == "near")
    rate = first.checked / first_s
    lines = [f"{args.vectors:,} synthetic vectors of {args.dim} dimensions (HNSW; {copies:,} near copies), "
             f"k = {args.k}, this machine (2 cores); the vectors loaded and indexed in {load:.0f} s.", "",
             "| run | images compared | seconds | images/s | near groups | pairs kept |", "|---|---|---|---|---|---|",
             f"| first | {first.checked:,} | {first_s:.1f} | {rate:.0f} | {groups:,} | {first.pairs:,} |",
             f"| again, nothing new | {again.checked:,} | {again_s:.1f} | - | "
             f"{sum(1 for g in again.groups if g['level'] == 'near'):,} | {again.pairs:,} |", "",
             f"Peak memory of the process: {peak:.2f} GiB. At this rate 1M images take about "
             f"{1_000_000 / rate / 3600:.1f} h (HNSW's cost per query grows slowly with the collection: "
             "a lower bound), on one machine, resumable at every chunk of 256 images."]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "duplicates_rate.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
