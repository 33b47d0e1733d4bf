"""Ingest throughput against the model-only forward rate, and search latency.

Usage: python benchmarks/ingest.py [--images DIR] [--queries DIR] [--spec SPEC] [--repeat N]

Runs in a private IMGDB_HOME (a fresh embedded PostgreSQL), on ../shared/datasets/museum by default:
1. model only: images decoded and prepared beforehand (untimed), then only the extractor's
   ``describe`` timed over the same batches ingest uses: the ceiling for ingest;
2. ingest: ``imgdb.connect().ingest(folder)`` end to end (read, hash, decode, prepare, infer, write);
3. search: ``search("id:N")`` (stored vector, SQL only) and ``search(photo)`` (decode + infer + SQL),
   latency p50/p99 over many queries.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MUSEUM, model_only_rate, percentile, private_imgdb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=MUSEUM / "images")
    parser.add_argument("--queries", type=Path, default=MUSEUM / "queries")
    parser.add_argument("--spec", default="cnn:tf_efficientnet_lite2/gem")
    parser.add_argument("--id-queries", type=int, default=300)
    args = parser.parse_args()
    if not args.images.is_dir():
        sys.exit(f"no images at {args.images}: the museum data set lives in ../shared/datasets/museum")

    import torch

    from imgdb.features.registry import create_extractor
    from imgdb.io.sources import expand

    paths = [Path(p) for p in expand([args.images])]
    extractor = create_extractor(args.spec)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"extractor: {extractor.spec} ({extractor.dim} dims); images: {len(paths)} from {args.images}")
    model_rate = model_only_rate(extractor, paths)

    with private_imgdb() as db:
        db.create_index("bench", args.spec)
        report = db.ingest(paths, index="bench")
        assert report.added == len(paths), report.to_json()
        ingest_rate = report.added / report.seconds

        with db.database.connect() as conn:
            ids = [row[0] for row in conn.exec_driver_sql(f"SELECT image_id FROM {db.index('bench').vectors_table}")]
        rng = random.Random(0)
        db.search(f"id:{ids[0]}", index="bench")  # warm-up
        by_id = []
        for _ in range(args.id_queries):
            started = time.perf_counter()
            db.search(f"id:{rng.choice(ids)}", k=10, index="bench")
            by_id.append((time.perf_counter() - started) * 1000)
        photos = sorted(p for p in args.queries.glob("*") if p.is_file())
        by_photo = []
        for photo in photos:
            started = time.perf_counter()
            db.search(photo, k=10, index="bench")
            by_photo.append((time.perf_counter() - started) * 1000)

    print()
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| model-only forward rate | {model_rate:.1f} images/s |")
    print(f"| ingest rate (read, hash, decode, infer, COPY, HNSW build) | {ingest_rate:.1f} images/s "
          f"({100 * ingest_rate / model_rate:.0f}% of model-only) |")
    print(f"| search `id:N`, k=10 ({len(by_id)} queries) | p50 {percentile(by_id, 50):.2f} ms, "
          f"p99 {percentile(by_id, 99):.2f} ms |")
    if by_photo:
        print(f"| search new photo, k=10 ({len(by_photo)} queries) | p50 {percentile(by_photo, 50):.1f} ms, "
              f"p99 {percentile(by_photo, 99):.1f} ms (mean {statistics.mean(by_photo):.1f}) |")


if __name__ == "__main__":
    main()
