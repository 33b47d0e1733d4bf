"""Retrieval quality and cost of every extractor on the museum set and on a held-out copy set: the
README's feature table.

Usage: python benchmarks/features.py [SPEC ...]   (default: every family's default spec, plus the
multi-scale deep settings)

For each spec, in one private embedded PostgreSQL: create an index (exact search above pgvector's
2000 indexable dimensions), learn its codebook/whitening if it has one (timed apart), ingest the
gallery (timed), then run the 60 query photos through ``Imgdb.evaluate`` (mAP over full rankings,
recall@1, recall@10), then the held-out copy set of :mod:`copies` (120 hard edited copies of gallery
paintings: mAP and recall@1), then a second copy set drawn with another seed (other paintings, edits
and qualities), built in this run: earlier choices looked at the first set's figures, none at this
one's. Bytes per image is what PostgreSQL stores
for the vector (``pg_column_size``). For CNN specs, the model-only forward rate on the same images is printed next
to the ingest rate, and *runtime* says what ran the network (``IMGDB_RUNTIME``: ONNX Runtime by
default, PyTorch where a network does not export).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import copies  # noqa: E402
from common import model_only_rate, museum_or_exit, private_imgdb  # noqa: E402

#: The second copy set's seed (the first is copies.SEED).
NEW_SEED = 11
EXTRA = [
    "cnn:tf_efficientnet_lite2/gem/scales=1,0.707,0.5",
    "cnn:tf_efficientnet_lite2/rmac/scales=1,0.707,0.5",
]


def main() -> None:
    from imgdb.db import vectors
    from imgdb.features.registry import canonical_spec, list_extractors

    museum = museum_or_exit()
    specs = sys.argv[1:] or list(dict.fromkeys([spec for _, spec, _ in list_extractors()] + EXTRA))
    gallery = sorted((museum / "images").glob("*.jpg"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgdb-copies-") as held, private_imgdb() as db:
        copy_set = copies.build(Path(held) / "copies")
        new_set = copies.build(Path(held) / "new", seed=NEW_SEED)
        for n, spec in enumerate(specs):
            name = f"f{n}"
            canonical = canonical_spec(spec)
            info = db.create_index(name, canonical, ann="none")
            index = db.index(name)
            extractor = db.catalog.extractor(index)
            started = time.perf_counter()
            if extractor.trainable:
                db.train(name, gallery)
            trained = time.perf_counter() - started
            report = db.ingest(gallery, index=name, metadata_file=museum / "metadata.json")
            rate = report.added / report.seconds
            result = db.evaluate(museum, index=name)
            held_out = db.evaluate(copy_set, index=name)
            new = db.evaluate(new_set, index=name)
            with db.database.connect() as conn:
                size = conn.exec_driver_sql(
                    f'SELECT avg(pg_column_size(embedding))::int FROM "{index.vectors_table}"').scalar_one()
                assert vectors.count(conn, index) == len(gallery)
            model = f"{model_only_rate(extractor, gallery):.1f}" if canonical.startswith("cnn:") else ""
            network = getattr(extractor, "cnn", extractor)  # (MOP runs a CNN extractor inside)
            runtime = getattr(network, "runtime", "-")
            rows.append((canonical, result.mAP, result.recall_at_1, result.recall_at_10, held_out.mAP,
                         held_out.recall_at_1, new.mAP, rate, model, runtime, trained, info.dim, size))
            print(f"{canonical}: mAP {result.mAP:.3f} r@1 {result.recall_at_1:.3f} copies mAP {held_out.mAP:.3f} "
                  f"new copies mAP {new.mAP:.3f} "
                  f"{rate:.1f} img/s (model {model or '-'}) train {trained:.1f}s", file=sys.stderr, flush=True)
    print("| extractor | mAP | recall@1 | recall@10 | copies mAP (held out) | copies recall@1 (held out) "
          "| new copies mAP (held out) | ingest img/s | model-only img/s | runtime | training s | dim | bytes/image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec, m, r1, r10, held_map, held_r1, new_map, rate, model, runtime, trained, dim, size in rows:
        print(f"| `{spec}` | {m:.3f} | {r1:.3f} | {r10:.3f} | {held_map:.3f} | {held_r1:.3f} | {new_map:.3f} | {rate:.1f} | "
              f"{model or '-'} | {runtime} | "
              f"{trained:.1f} | {dim} | {size} |")


if __name__ == "__main__":
    main()
