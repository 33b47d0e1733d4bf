"""The server under hostile load: memory while clients upload small files that decode huge, and
searches by id while slow URL downloads are in flight.

Usage: python benchmarks/hostile.py [--clients 32] [--uploads 96] [--slow 40] [--id-searches 200]

Runs its own server the way the container does (``docker/start.sh``: a real ``imgdb serve``) in a
private IMGDB_HOME holding the museum gallery, on loopback, with private URLs allowed (the slow
server is on loopback too):

1. memory: the server's resident memory (VmRSS, sampled every 20 ms) idle after four warm-up
   uploads of the same file (the model's first passes allocate for good), at its peak while
   CLIENTS clients upload UPLOADS flat 6000x6000 RGBA PNGs (about 400 KB each, about 430 MiB
   each to decode: under the per-image budget, so they are decoded, within the process's budget
   of bytes in flight), and idle again 5 s later;
2. starvation: the latency of sequential searches by id (k=10) alone, then while SLOW clients
   search by URL from a server that trickles its answer one byte every half second;
3. archives: ``imgdb index import`` (its own process, its VmRSS sampled) of an honest export of a
   small index, then of hostile variants of it: 700 MB of zeros after the declared vectors, a
   vectors header declaring far more rows than the manifest, a learned-state member of 2 GB of
   zeros, an images.json of 1 GB: each archive's size, what became of it, the time it took and
   the importer's peak memory.

``--parts`` picks some of the three (``memory,starvation,archives``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import museum_or_exit, percentile, private_imgdb, serve  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Sampler(threading.Thread):
    """The server's peak resident memory while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except (OSError, RuntimeError):  # (it has ended)
                return


def flat_png(side: int = 6000) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (40, 80, 120, 255)).save(buffer, "PNG")
    return buffer.getvalue()


def memory(url: str, pid: int, clients: int, uploads: int) -> dict[str, float]:
    data = flat_png()
    with httpx.Client(timeout=600) as http:  # warm-up: the model's first passes, not measured
        for _ in range(4):
            http.post(f"{url}/search", files={"file": ("flat.png", data, "image/png")}).raise_for_status()
    time.sleep(2)
    before = rss_mb(pid)
    sampler = Sampler(pid)
    sampler.start()
    statuses: list[int] = []
    with httpx.Client(timeout=600) as http, ThreadPoolExecutor(clients) as pool:
        def upload(_: int) -> int:
            return http.post(f"{url}/search", files={"file": ("flat.png", data, "image/png")}).status_code

        started = time.perf_counter()
        statuses = list(pool.map(upload, range(uploads)))
        seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    time.sleep(5)
    return {"file_kb": len(data) / 1024, "before": before, "peak": sampler.peak, "after": rss_mb(pid),
            "seconds": seconds, "ok": statuses.count(200), "refused": len(statuses) - statuses.count(200)}


class Trickle(BaseHTTPRequestHandler):
    stop = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        while not self.stop.wait(0.5):
            try:
                self.wfile.write(b"\xff")
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, *args: object) -> None:
        pass


def id_latencies(http: httpx.Client, url: str, ids: list[int], n: int, rng: random.Random) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        answer = http.post(f"{url}/search", params={"k": 10}, json={"id": rng.choice(ids)})
        answer.raise_for_status()
        out.append((time.perf_counter() - started) * 1000)
    return out


def starvation(url: str, slow: int, searches: int) -> dict[str, list[float]]:
    rng = random.Random(0)
    trickler = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=trickler.serve_forever, daemon=True).start()
    slow_url = f"http://127.0.0.1:{trickler.server_address[1]}/slow.jpg"
    with httpx.Client(timeout=120) as http:
        photo = next((museum_or_exit() / "queries").glob("*.jpg"))
        ids = [h["id"] for h in http.post(f"{url}/search", params={"k": 200},
                                          files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).json()]
        id_latencies(http, url, ids, 20, rng)  # warm-up
        alone = id_latencies(http, url, ids, searches, rng)
        with ThreadPoolExecutor(slow) as pool, httpx.Client(timeout=120) as slow_http:
            pending = [pool.submit(slow_http.post, f"{url}/search", json={"url": slow_url}) for _ in range(slow)]
            time.sleep(2)  # every slow download under way
            busy = sum(not f.done() for f in pending)
            during = id_latencies(http, url, ids, searches, rng)
            Trickle.stop.set()
            for future in pending:
                future.result()
    trickler.shutdown()
    return {"alone": alone, "during": during, "busy": [busy]}


def _rewritten(src: Path, dst: Path, members: dict[str, bytes]) -> Path:
    """A copy of an export with some members replaced (written deflated: zeros compress 1000:1)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            if info.filename not in members:
                new.writestr(info.filename, old.read(info))
        for name, data in members.items():
            new.writestr(name, data)
    return dst


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def archives(db, museum: Path) -> list[dict]:  # noqa: ANN001
    """Imports of an honest export and of hostile variants, each in a process of its own."""
    db.create_index("honest", "color:hsv", ann="none")
    db.ingest(sorted((museum / "images").glob("*.jpg"))[:50], index="honest")
    folder = Path(tempfile.mkdtemp(prefix="imgdb-archives-"))
    honest = folder / "honest.zip"
    db.export_index("honest", honest)
    with zipfile.ZipFile(honest) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        vectors = archive.read("vectors.npy")
    dim = manifest["index"]["dim"]
    zeros = bytes(700 * 2**20)
    cases = {
        "honest export": honest,
        "700 MB of zeros after the declared vectors": _rewritten(honest, folder / "a.zip", {"vectors.npy": vectors + zeros}),
        "vectors header declaring 10^7 rows": _rewritten(honest, folder / "b.zip", {
            "vectors.npy": _npy_header((10**7, dim)) + zeros}),
        "state member of 2 GB of zeros": _rewritten(honest, folder / "c.zip", {
            "manifest.json": json.dumps({**manifest, "state": ["pca_mean"]}).encode(),
            "state/pca_mean.npy": _npy_header((2**29,)) + bytes(2 * 2**30)}),
        "images.json of 1 GB": _rewritten(honest, folder / "d.zip", {
            "images.json": b"[" + b" " * 2**30 + b"]"}),
    }
    rows = []
    for n, (case, path) in enumerate(cases.items()):
        started = time.perf_counter()
        process = subprocess.Popen([str(Path(sys.executable).parent / "imgdb"), "index", "import", str(path),
                                    "--name", f"imported_{n}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env=os.environ.copy())
        sampler = Sampler(process.pid)
        sampler.start()
        _, error = process.communicate()
        sampler.done.set()
        rows.append({"case": case, "archive_kb": path.stat().st_size / 1024, "seconds": time.perf_counter() - started,
                     "peak_mb": sampler.peak, "outcome": "imported" if process.returncode == 0 else
                     error.decode(errors="replace").strip().splitlines()[-1][:110]})
        path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--uploads", type=int, default=96)
    parser.add_argument("--slow", type=int, default=40)
    parser.add_argument("--id-searches", type=int, default=200)
    parser.add_argument("--parts", default="memory,starvation,archives")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    museum = museum_or_exit()
    mem = lat = imports = limits = None
    with private_imgdb() as db:
        if parts & {"memory", "starvation"}:
            db.ingest([museum / "images"])
            limits = db.settings.decoding
            process, url = serve(IMGDB_ALLOW_PRIVATE_URLS="1")
            try:
                mem = memory(url, process.pid, args.clients, args.uploads) if "memory" in parts else None
                lat = starvation(url, args.slow, args.id_searches) if "starvation" in parts else None
            finally:
                process.terminate()
                process.wait(timeout=60)
        imports = archives(db, museum) if "archives" in parts else None
    if mem is not None:
        report_memory(mem, limits, args)
    if lat is not None:
        report_latencies(lat, args)
    if imports is not None:
        print("\nImports of an index archive (`imgdb index import`, a process of its own, its peak VmRSS):\n")
        print("| archive | size KB | outcome | seconds | peak RSS MB |")
        print("| --- | --- | --- | --- | --- |")
        for row in imports:
            print(f"| {row['case']} | {row['archive_kb']:,.0f} | {row['outcome']} | {row['seconds']:.1f} | "
                  f"{row['peak_mb']:.0f} |")


def report_memory(mem: dict[str, float], limits, args: argparse.Namespace) -> None:  # noqa: ANN001
    print(f"\nDecode limits: {limits.max_bytes / 2**20:.0f} MiB per image, {limits.in_flight / 2**20:.0f} MiB in flight.\n")
    print(f"Memory: {args.clients} clients, {args.uploads} uploads of a {mem['file_kb']:.0f} KB PNG "
          f"(6000x6000 RGBA) in {mem['seconds']:.1f} s, {mem['ok']} answered, {mem['refused']} refused.\n")
    print("| server RSS | MB |")
    print("| --- | --- |")
    for key in ("before", "peak", "after"):
        print(f"| {key} | {mem[key]:.0f} |")
    print(f"\npeak - before: {mem['peak'] - mem['before']:.0f} MB (budget in flight {limits.in_flight / 2**20:.0f} MiB"
          f" + 1 GB allowed); after - before: {mem['after'] - mem['before']:.0f} MB (200 MB allowed)\n")


def report_latencies(lat: dict[str, list[float]], args: argparse.Namespace) -> None:
    print(f"Searches by id, {args.id_searches} sequential, alone and with {lat['busy'][0]} slow URL searches in flight:\n")
    print("| | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- |")
    for key in ("alone", "during"):
        values = lat[key]
        print(f"| {key} | {statistics.median(values):.1f} | {percentile(values, 99):.1f} | {max(values):.1f} |")


if __name__ == "__main__":
    main()
