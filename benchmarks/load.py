"""Load test of the HTTP API: throughput and latency of ``POST /search`` by id and by upload.

Usage: python benchmarks/load.py [--url http://127.0.0.1:PORT] [--clients 1,8,32]
                                 [--id-requests N] [--upload-requests N] [--seconds S]

Without ``--url`` it runs its own server the way the container does (``docker/start.sh``: a real
``imgdb serve`` process) in a private IMGDB_HOME holding the museum gallery, on loopback. Targets
other than loopback addresses are refused: this is a test of one's own server, never of a network.

Each cell of the table is C concurrent clients (httpx, one event loop, one connection each) sending
requests back to back until the cell has sent its request budget or its time is up, whichever
comes first; then the next cell. By id: ``{"id": N}`` for random gallery images (SQL only, no
model). By upload: the 60 real query photos as multipart uploads (decode, CNN forward pass, SQL).
The clients run on the same 2 cores as the server, so the figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import random
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_only_rate, museum_or_exit, percentile, private_imgdb, serve  # noqa: E402

@dataclass
class Cell:
    mode: str
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self) -> str:
        done = len(self.latencies_ms)
        rate = done / self.seconds if self.seconds else 0.0
        p50 = percentile(self.latencies_ms, 50) if done else float("nan")
        p99 = percentile(self.latencies_ms, 99) if done else float("nan")
        return (f"| {self.mode} | {self.clients} | {done + len(self.errors)} | {len(self.errors)} | {rate:.1f} "
                f"| {p50:.1f} | {p99:.1f} |")


def loopback_only(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        sys.exit(f"refusing {url}: the load test only targets loopback addresses (127.0.0.0/8, ::1)")
    return url.rstrip("/")


async def run_cell(url: str, mode: str, clients: int, budget: int, seconds: float,
                   requests: list[dict], rng: random.Random) -> Cell:
    cell = Cell(mode, clients)
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < budget and time.perf_counter() < deadline:
            sent += 1
            request = rng.choice(requests)
            started = time.perf_counter()
            try:
                answer = await http.post(f"{url}/search", params={"k": 10}, **request)
                if answer.status_code == 200 and len(answer.json()) == 10:
                    cell.latencies_ms.append((time.perf_counter() - started) * 1000)
                else:
                    cell.errors.append(f"{answer.status_code}: {answer.text[:200]}")
            except httpx.HTTPError as exc:
                cell.errors.append(f"{type(exc).__name__} after {time.perf_counter() - started:.3f} s, "
                                   f"request {sent}: {exc!r}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        cell.seconds = time.perf_counter() - started
    return cell


def gallery_ids(url: str, photo: Path) -> list[int]:
    """Ids of stored images, as the API shows them (the hits of a broad search)."""
    answer = httpx.post(f"{url}/search", params={"k": 1000}, timeout=120,
                        files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    answer.raise_for_status()
    return [hit["id"] for hit in answer.json()]


async def measure(url: str, args: argparse.Namespace, photos: list[Path]) -> list[Cell]:
    rng = random.Random(0)
    ids = gallery_ids(url, photos[0])
    by_id = [{"json": {"id": image_id}} for image_id in ids]
    uploads = [{"files": {"file": (p.name, p.read_bytes(), "image/jpeg")}} for p in photos]
    # Warm-up, not reported: connections opened, the first requests of both kinds served.
    await run_cell(url, "warm-up", 4, 40, 30, by_id + uploads[:4], rng)
    cells = []
    for mode, requests, budget in (("id", by_id, args.id_requests), ("upload", uploads, args.upload_requests)):
        for clients in args.clients:
            cell = await run_cell(url, mode, clients, budget, args.seconds, requests, rng)
            print(cell.row(), file=sys.stderr, flush=True)
            cells.append(cell)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running imgdb serve on loopback (default: start one)")
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--id-requests", type=int, default=1500, help="request budget per by-id cell")
    parser.add_argument("--upload-requests", type=int, default=180, help="request budget per upload cell")
    parser.add_argument("--seconds", type=float, default=60, help="time limit per cell")
    args = parser.parse_args()
    museum = museum_or_exit()
    photos = sorted((museum / "queries").glob("*.jpg"))

    model_rate = None
    if args.url:
        cells = asyncio.run(measure(loopback_only(args.url), args, photos))
    else:
        with private_imgdb() as db:
            report = db.ingest([museum / "images"], metadata_file=museum / "metadata.json")
            print(f"ingested {report.added} images in {report.seconds:.1f} s", file=sys.stderr)
            # The ceiling for uploads: the forward pass alone on the query photos, batched as ingest does.
            model_rate = model_only_rate(db.catalog.extractor(db.index()), photos)
            process, url = serve()
            try:
                cells = asyncio.run(measure(url, args, photos))
            finally:
                process.terminate()
                process.wait(timeout=60)

    import torch

    print(f"\nMachine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"server and clients on the same machine; k=10, default index (museum gallery).\n")
    if model_rate:
        print(f"Model-only forward rate on the query photos, this run: {model_rate:.1f} images/s.\n")
    print("| query | clients | requests | errors | req/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cell in cells:
        print(cell.row())
    failed = [e for cell in cells for e in cell.errors]
    if failed:
        print(f"\n{len(failed)} errors:", *failed[:20], sep="\n  ")


if __name__ == "__main__":
    main()
