"""The data and the yardsticks for benchmarks/ann.py: a SIFT1M-like set made from the museum images,
faiss's own numbers on it, and the dimension where a KD-tree stops beating brute force.

SIFT1M (Jégou et al.) is ~1M SIFT descriptors of photos, queried with descriptors of other photos;
the same recipe on the 347 museum images gives about as many real descriptors, with no download.
Usage: python benchmarks/ann_data.py [OUT_DIR]   (PNGs go to OUT_DIR, default benchmarks/.cache/)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import faiss
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import track
from scipy.spatial import cKDTree
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MUSEUM, museum_or_exit  # noqa: E402,F401  (MUSEUM is re-exported for ann.py)

CACHE = Path(__file__).resolve().parent / ".cache"
HELD_OUT = 10  # last query photos by name: the queries come from them, never the base (delete the cache on change)
K = 10
STDERR = Console(stderr=True, soft_wrap=True)
HEADER = ["system", "method", "params", "recall@10", "QPS", "p50 ms", "p99 ms", "build s", "bytes/vector"]


@dataclass
class SiftSet:
    """SIFT1M's shape: raw float32 SIFT base, queries from unseen photos, exact 100-NN ground truth."""

    base: np.ndarray  # float32 (N, 128)
    queries: np.ndarray  # float32 (n_query, 128)
    truth: np.ndarray  # int64 (n_query, 100): base rows of the exact L2 neighbours, nearest first
    describe: str
    image_of: np.ndarray  # int32 (N,): the image of each base row; an image's rows are consecutive


def _sift(path: Path) -> np.ndarray:
    """Every descriptor OpenCV's default SIFT finds in the full-resolution grayscale image."""
    _, desc = cv2.SIFT_create().detectAndCompute(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), None)
    return np.empty((0, 128), np.float32) if desc is None else desc


def _extract(museum: Path) -> dict[str, np.ndarray]:
    """Descriptors of all images, split into the base and the held-out photos' (minutes: the slow part)."""
    gallery = sorted((museum / "images").glob("*.jpg"))
    paths = gallery + sorted((museum / "queries").glob("*.jpg"))
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallel over images instead: cv2 releases the GIL, and images never wait on each other
    try:
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            descs = list(track(pool.map(_sift, paths), total=len(paths), description="SIFT", console=STDERR))
    finally:
        cv2.setNumThreads(threads)
    cut = len(paths) - HELD_OUT
    return {"base": np.concatenate(descs[:cut]), "held": np.concatenate(descs[cut:]),
            "counts": np.array([len(d) for d in descs[:cut]]), "n_gallery": np.array(len(gallery))}


def _queries_and_truth(base: np.ndarray, held: np.ndarray, n_query: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-seed sample of the held-out descriptors and their exact 100 nearest base rows."""
    if len(held) < n_query:
        sys.exit(f"the {HELD_OUT} held-out photos give {len(held)} descriptors, fewer than {n_query} queries")
    queries = held[np.random.default_rng(0).choice(len(held), n_query, replace=False)]
    exact = faiss.IndexFlatL2(base.shape[1])
    exact.add(base)
    return queries, exact.search(queries, 100)[1]


def load_sift(cache: Path | None = None, n_query: int = 1000) -> SiftSet:
    """The SIFT1M-like set; extracted once, then read back from the .npz file `cache` in seconds
    (default benchmarks/.cache/sift1m.npz)."""
    path = cache or CACHE / "sift1m.npz"
    if path.exists():
        with np.load(path) as stored:
            parts = {name: stored[name] for name in stored.files}
    else:
        parts = _extract(museum_or_exit())
    if len(parts.get("queries", ())) != n_query:
        parts["queries"], parts["truth"] = _queries_and_truth(parts["base"], parts["held"], n_query)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **parts)
    base, counts, n_gallery = parts["base"], parts["counts"], int(parts["n_gallery"])
    if len(base) < 1_000_000:
        STDERR.print(f"[bold red]WARNING: the base has only {len(base):,} descriptors, fewer than SIFT1M's 1M[/]")
    describe = (f"base: {len(base):,} SIFT descriptors from {len(counts)} images ({n_gallery} paintings + "
                f"{len(counts) - n_gallery} query photos); queries: {n_query} of the {len(parts['held']):,} "
                f"descriptors of {HELD_OUT} held-out query photos")
    image_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    return SiftSet(base, parts["queries"], parts["truth"], describe, image_of)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _markdown(header: list[str], cells: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *cells])


@dataclass
class Row:
    """One measured method: a line of the ANN table and a point of the recall/QPS plot."""

    system: str
    method: str
    params: str
    recall10: float
    qps: float
    p50_ms: float
    p99_ms: float
    build_s: float | None
    bytes_per_vector: float | None

    def cells(self) -> list[str]:
        return [self.system, self.method, self.params, f"{self.recall10:.3f}", f"{self.qps:.0f}",
                f"{self.p50_ms:.3f}", f"{self.p99_ms:.3f}", _fmt(self.build_s, ".1f"),
                _fmt(self.bytes_per_vector, ".0f")]


def markdown_table(rows: list[Row]) -> str:
    return _markdown(HEADER, [row.cells() for row in rows])


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of each query's 10 true neighbours among its first 10 results (-1 = missing), averaged."""
    return float((truth[:, :K, None] == found[:, None, :K]).any(2).mean())


def time_queries(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
                 warmup: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Serve queries one at a time, as requests arrive. `search` gets one (1, d) row and returns its ids,
    best first; gives the first 10 ids per query ((nq, 10) int64, -1 padded) and each latency in seconds."""
    for i in range(min(warmup, len(queries))):
        search(queries[i : i + 1])
    found = np.full((len(queries), K), -1, np.int64)
    latencies = np.empty(len(queries))
    for i in range(len(queries)):
        started = time.perf_counter()
        ids = search(queries[i : i + 1])
        latencies[i] = time.perf_counter() - started
        ids = np.asarray(ids).ravel()[:K]
        found[i, : len(ids)] = ids
    return found, latencies


def summarize(latencies: np.ndarray) -> tuple[float, float, float]:
    """(queries per second, p50 ms, p99 ms) of one-at-a-time latencies."""
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
    return float(len(latencies) / latencies.sum()), float(p50), float(p99)


@contextmanager
def single_thread() -> Iterator[None]:
    """One core for faiss and BLAS while timing queries, as one request is served; builds may use all."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        faiss.omp_set_num_threads(threads)


def reranked(index: faiss.Index, base: np.ndarray, candidates: int = 100) -> Callable[[np.ndarray], np.ndarray]:
    """A search that takes `candidates` ids from the compressed index, then keeps the 10 nearest by exact L2
    on the raw vectors: how compressed codes are used when the raw vectors can still be read."""
    def search(q: np.ndarray) -> np.ndarray:
        ids = index.search(q, candidates)[1][0]
        ids = ids[ids >= 0]
        return ids[np.argsort(((base[ids] - q) ** 2).sum(1))[:K]]
    return search


def _built(index: faiss.Index, base: np.ndarray, sample: np.ndarray) -> float:
    """Train (a no-op for HNSW) and fill the index; seconds taken."""
    started = time.perf_counter()
    index.train(sample)
    index.add(base)
    return time.perf_counter() - started


def faiss_reference(base: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[Row]:
    """faiss in-process on the same data and the same one-query-at-a-time timing: the bar for imgdb."""
    dim = base.shape[1]
    sample = base[np.random.default_rng(0).choice(len(base), min(len(base), 200_000), replace=False)]
    rows: list[Row] = []

    def measure(method: str, params: str, search: Callable, build_s: float, nbytes: float) -> None:
        with single_thread():
            found, latencies = time_queries(search, queries)
        rows.append(Row("faiss", method, params, recall_at_10(found, truth), *summarize(latencies), build_s, nbytes))
        STDERR.print(" | ".join(rows[-1].cells()))

    hnsw = faiss.IndexHNSWFlat(dim, 16)
    hnsw.hnsw.efConstruction = 64
    build = _built(hnsw, base, sample)
    for ef in (40, 80):
        hnsw.hnsw.efSearch = ef
        measure("HNSWFlat", f"M=16 efConstruction=64 efSearch={ef}", lambda q: hnsw.search(q, K)[1], build,
                4 * dim + 2 * 16 * 4)
    pq = faiss.IndexPQ(dim, 32, 8)
    build = _built(pq, base, sample)
    measure("PQ", "PQ32x8, k=10", lambda q: pq.search(q, K)[1], build, 32)
    measure("PQ + re-rank", "PQ32x8, 100 candidates re-ranked exactly", reranked(pq, base), build, 32)
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, 4096, 32, 8)
    build = _built(ivfpq, base, sample)
    ivfpq.nprobe = 32
    measure("IVFPQ + re-rank", "IVF4096,PQ32x8 nprobe=32, 100 re-ranked; +8 B id/vector", reranked(ivfpq, base),
            build, 32)
    lsh = faiss.IndexLSH(dim, 512, True, False)
    build = _built(lsh, base, sample)
    measure("LSH + re-rank", "512 bits, rotated, 100 re-ranked", reranked(lsh, base), build, 64)
    return rows


def _side_by_side(sift: SiftSet, dim: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points made of dim/128 consecutive descriptors of one image, concatenated."""
    m = dim // 128
    image_of = sift.image_of
    starts = rng.choice(np.flatnonzero(image_of[: len(image_of) - m + 1] == image_of[m - 1 :]), n, replace=False)
    return sift.base[starts[:, None] + np.arange(m)].reshape(n, dim)


def _exact_costs(base: np.ndarray, queries: np.ndarray) -> dict:
    """Build time, then per-query exact 10-NN time of a cKDTree and of BLAS brute force, on one core."""
    started = time.perf_counter()
    tree = cKDTree(base)
    build_s = time.perf_counter() - started
    norms = np.einsum("ij,ij->i", base, base)
    with single_thread():
        by_tree, tree_s = time_queries(lambda q: tree.query(q[0], k=K)[1], queries)
        by_brute, brute_s = time_queries(lambda q: np.argpartition(norms - 2 * (base @ q[0]), K)[:K], queries)
    kdtree_ms, brute_ms = tree_s.mean() * 1e3, brute_s.mean() * 1e3
    return {"dim": base.shape[1], "n_base": len(base), "build_s": build_s, "kdtree_ms": kdtree_ms,
            "brute_ms": brute_ms, "speedup": brute_ms / kdtree_ms, "agree": recall_at_10(by_brute, by_tree)}


def kdtree_curve(dims: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512), n_base: int = 100_000,
                 n_query: int = 200, sift: SiftSet | None = None) -> list[dict]:
    """Exact 10-NN, KD-tree versus brute force, as dimensions grow: where the tree stops paying.

    Real data at every dimension, since uniform noise says little about descriptors: up to 128, the
    leading PCA components of museum SIFT descriptors (which keep the most structure a tree can use);
    no real 256- or 512-d features can be computed offline here, so those put 2 or 4 consecutive
    descriptors of one image side by side (OpenCV orders an image's keypoints by x, so these are
    nearby or same-point patches): real, correlated values. The last n_query points are the queries.
    """
    sift = sift or load_sift()
    rng = np.random.default_rng(0)
    n = n_base + n_query
    projected = PCA(random_state=0).fit_transform(sift.base[rng.choice(len(sift.base), n, replace=False)])
    rows = []
    for dim in dims:
        points = projected[:, :dim] if dim <= projected.shape[1] else _side_by_side(sift, dim, n, rng)
        points = np.ascontiguousarray(points, np.float32)
        rows.append(_exact_costs(points[:n_base], points[n_base:]))
        STDERR.print(" | ".join(_kdtree_cells(rows[-1])))
    return rows


def _kdtree_cells(row: dict) -> list[str]:
    return [str(row["dim"]), f"{row['build_s']:.2f}", f"{row['kdtree_ms']:.3f}", f"{row['brute_ms']:.3f}",
            f"{row['speedup']:.2f}", f"{row['agree']:.3f}"]


def kdtree_table(rows: list[dict]) -> str:
    header = ["dim", "build s", "KD-tree ms/query", "brute ms/query", "speedup", "agree@10"]
    return _markdown(header, [_kdtree_cells(row) for row in rows])


def _save(fig: Figure, ax: Axes, path: Path) -> None:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def plot_kdtree(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    dims = [row["dim"] for row in rows]
    for key, label in (("kdtree_ms", "scipy cKDTree"), ("brute_ms", "brute force (BLAS)")):
        ax.plot(dims, [row[key] for row in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(dim) for dim in dims])
    ax.set(yscale="log", xlabel="dimensions", ylabel="ms per query (exact 10-NN, 1 core)",
           title=f"Exact 10-NN over {rows[0]['n_base']:,} real points")
    _save(fig, ax, path)


def plot_recall_qps(rows: list[Row], path: Path, title: str) -> None:
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for n, key in enumerate(dict.fromkeys((row.system, row.method) for row in rows)):
        group = sorted((row for row in rows if (row.system, row.method) == key), key=lambda row: row.recall10)
        ax.plot([row.recall10 for row in group], [row.qps for row in group], marker="osD^v<>ph*XP"[n % 12],
                color=colormaps["tab20"](n % 20), label=" ".join(key))
        for row in group:
            ax.annotate(row.params, (row.recall10, row.qps), fontsize=6, xytext=(4, 4), textcoords="offset points")
    ax.set(yscale="log", xlabel="recall@10", ylabel="queries per second (1 core)", title=title)
    _save(fig, ax, path)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else CACHE
    out.mkdir(parents=True, exist_ok=True)
    sift = load_sift()
    print(sift.describe)
    rows = faiss_reference(sift.base, sift.queries, sift.truth)
    curve = kdtree_curve(sift=sift)
    print(markdown_table(rows), kdtree_table(curve), sep="\n\n")
    plot_recall_qps(rows, out / "faiss_recall_qps.png", f"faiss, {len(sift.base):,} museum SIFT descriptors")
    plot_kdtree(curve, out / "kdtree.png")


if __name__ == "__main__":
    main()
