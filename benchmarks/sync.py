"""What following an application's table costs: sync against ingest, and the triggers' cost to the
application's own INSERTs.

Usage: python benchmarks/sync.py [--images DIR] [--spec SPEC] [--rounds N] [--rows N]

Runs in a private IMGDB_HOME (a fresh embedded PostgreSQL), on ../shared/datasets/museum by default:
1. embedding rate: the same images, into two fresh indexes of the same spec, by ``ingest`` (the
   folder) and by ``attach`` + ``sync`` (a table of their paths), interleaved over N rounds; images
   per second end to end (read, hash, decode, infer, write; for sync also claims and refs);
2. trigger cost: the application inserting ROWS rows into its own table, single-row (one INSERT
   and one commit each, as a web request does) and batched (1,000 rows per INSERT), without and
   with the table attached, interleaved over N rounds; median rows per second, with the server's
   default ``synchronous_commit = on`` and with it off (where the commit's flush no longer hides the
   trigger's own work).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MUSEUM, museum_or_exit, private_imgdb  # noqa: E402

BATCH = 1000


def embedding_rates(db, paths: list[Path], spec: str, rounds: int) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """Images/second of ingest and of sync over the same images, one fresh index each per round."""
    ingest, sync = [], []
    with psycopg.connect(db.database.url, autocommit=True) as app:
        for r in range(rounds):
            db.create_index(f"by_ingest_{r}", spec)
            report = db.ingest(paths, index=f"by_ingest_{r}")
            assert report.added == len(paths), report.to_json()
            ingest.append(report.added / report.seconds)

            app.execute(f"CREATE TABLE gallery_{r} (id int PRIMARY KEY, path text)")
            with app.cursor().copy(f"COPY gallery_{r} FROM STDIN") as copy:
                for i, path in enumerate(paths):
                    copy.write_row((i, str(path)))
            db.create_index(f"by_sync_{r}", spec)
            started = time.perf_counter()
            db.attach(f"gallery_{r}", "path", index=f"by_sync_{r}")
            report = db.sync(f"by_sync_{r}")
            assert report.embedded == len(paths) and not report.failed, report.to_json()
            sync.append(report.embedded / (time.perf_counter() - started))
            print(f"round {r + 1}: ingest {ingest[-1]:.1f} images/s, attach + sync {sync[-1]:.1f} images/s",
                  file=sys.stderr)
    return ingest, sync


def insert_rates(db, rows: int, rounds: int, synchronous: bool) -> dict[tuple[str, bool], list[float]]:  # noqa: ANN001
    """Rows/second the application inserts, single-row and batched, without and with the triggers."""
    rates: dict[tuple[str, bool], list[float]] = {}
    with psycopg.connect(db.database.url, autocommit=True) as app:
        app.execute(f"SET synchronous_commit = {'on' if synchronous else 'off'}")
        for attached in (False, True):
            app.execute(f"CREATE TABLE orders_{int(attached)} (id bigint PRIMARY KEY, path text, owner text NOT NULL)")
        db.create_index("orders", "color:hsv/bins=4x4x4")
        db.attach("orders_1", "path", index="orders")
        for _ in range(rounds):
            for mode in ("single-row", "batched"):
                for attached in (False, True):
                    table = f"orders_{int(attached)}"
                    app.execute(f"TRUNCATE {table}")
                    app.execute("DELETE FROM imgdb.queue")
                    started = time.perf_counter()
                    if mode == "single-row":
                        for i in range(rows):
                            app.execute(f"INSERT INTO {table} VALUES (%s, %s, 'alice')", (i, f"/srv/media/{i}.jpg"))
                    else:
                        for start in range(0, rows, BATCH):
                            app.execute(f"INSERT INTO {table} SELECT g, '/srv/media/' || g || '.jpg', 'alice'"
                                        f" FROM generate_series(%s::bigint, %s::bigint) g", (start, start + BATCH - 1))
                    rates.setdefault((mode, attached), []).append(rows / (time.perf_counter() - started))
        queued = app.execute("SELECT count(*) FROM imgdb.queue").fetchone()[0]
        assert queued == rows, f"the triggers queued {queued} rows, not {rows}"
        db.drop_index("orders")  # detaches orders_1
        app.execute("DROP TABLE orders_0, orders_1")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=MUSEUM / "images")
    parser.add_argument("--spec", default="cnn:tf_efficientnet_lite2/gem")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    if args.images == MUSEUM / "images":
        museum_or_exit()
    from imgdb.io.sources import expand

    paths = [Path(p) for p in expand([args.images])]
    with private_imgdb() as db:
        db.catalog.extractor(db.index("default"))  # load the model before anything is timed
        ingest, sync = embedding_rates(db, paths, args.spec, args.rounds)
        inserts = {sync_on: insert_rates(db, args.rows, args.rounds, sync_on) for sync_on in (True, False)}

    print(f"\n{len(paths)} images of {args.images}, extractor {args.spec}, {args.rounds} interleaved rounds\n")
    print("| path | images/s (median) | min–max |")
    print("| --- | --- | --- |")
    for name, rates in (("imgdb ingest", ingest), ("imgdb attach + sync", sync)):
        print(f"| {name} | {statistics.median(rates):.1f} | {min(rates):.1f}–{max(rates):.1f} |")
    print(f"\nsync / ingest: {statistics.median(sync) / statistics.median(ingest):.2f}\n")
    print(f"Application INSERTs of {args.rows} rows, median rows/s over {args.rounds} rounds:\n")
    print("| synchronous_commit | insert | without triggers | with triggers | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for sync_on, rates in inserts.items():
        for mode in ("single-row", "batched"):
            without, with_ = statistics.median(rates[(mode, False)]), statistics.median(rates[(mode, True)])
            print(f"| {'on' if sync_on else 'off'} | {mode} | {without:,.0f} | {with_:,.0f} | {with_ / without:.2f} |")


if __name__ == "__main__":
    main()
