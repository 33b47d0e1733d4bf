"""How many query forward passes should run at once (``IMGDB_INFERENCE_THREADS``)?

Usage: python benchmarks/inference_gate.py [--gates 1,2,4,32] [--clients 1,8,32] [--rounds 3]

Concurrent searches with new photos, in one process, through ``Imgdb.search`` (the path the web
app's worker threads take), with the gate set to each value in turn. Rounds interleave the
settings, since this VM's speed drifts between minutes: compare within a round.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import museum_or_exit, private_imgdb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    parser.add_argument("--gates", type=ints, default=[1, 2, 4, 32])
    parser.add_argument("--clients", type=ints, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gallery", type=int, default=50, help="gallery images to ingest (search cost is the model)")
    args = parser.parse_args()
    museum = museum_or_exit()
    photos = [p.read_bytes() for p in sorted((museum / "queries").glob("*.jpg"))]

    with private_imgdb() as db:
        db.ingest(sorted((museum / "images").glob("*.jpg"))[: args.gallery])
        db.search(photos[0])  # model loaded, connections open
        rates: dict[tuple[int, int], list[float]] = {}
        for round_ in range(args.rounds):
            for gate in args.gates:
                db._model_gate = threading.BoundedSemaphore(gate)  # noqa: SLF001 - the setting under test
                for clients in args.clients:
                    started = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        list(pool.map(lambda photo: db.search(photo, k=10), photos))
                    rate = len(photos) / (time.perf_counter() - started)
                    rates.setdefault((gate, clients), []).append(rate)
                    print(f"round {round_}: gate {gate}, {clients} clients: {rate:.1f} searches/s", file=sys.stderr)

    print(f"\nSearches/s with new photos ({len(photos)} per cell), min–max over {args.rounds} interleaved rounds.\n")
    print("| passes at once | " + " | ".join(f"{c} clients" for c in args.clients) + " |")
    print("| --- |" + " --- |" * len(args.clients))
    for gate in args.gates:
        cells = [f"{min(rates[gate, c]):.1f}–{max(rates[gate, c]):.1f}" for c in args.clients]
        print(f"| {gate} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
