"""The Python-side first stages: product quantization (PQ, OPQ, IVF-PQ), random-hyperplane LSH and a KD-tree.

The quantizers are faiss's (its PQ is the reference the issue measures against, and its ADC and
Hamming scans are hand-tuned SIMD); what imgdb adds is the life cycle around them. A quantizer is
trained once on a sample of the collection and persisted as faiss's own serialisation of the
*empty* trained index, in ``index_state``. Every vector's code is computed when the vector is written
and stored next to it (``ann_code``), so adds and deletes are plain row writes; at query time the
codes are loaded back into a faiss index with ``add_sa_codes`` (see :mod:`imgdb.ann.layer`).

The KD-tree has no codes: it is rebuilt from the stored vectors when loaded, which is only
sensible for the low-dimensional descriptors it helps with (``benchmarks/ann.py`` shows where it
stops helping).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import faiss
import numpy as np
from scipy.spatial import cKDTree

from imgdb.ann.spec import AnnSpec

#: Fewer stored vectors than this and a quantizer is not worth training: search stays exact.
MIN_TRAIN = 16
#: Training sample cap: faiss's k-means uses at most 256 points per centroid anyway.
MAX_TRAIN = 262_144
#: Key of the serialised trained index in ``index_state`` (the layer adds its namespace prefix).
STATE_KEY = "faiss"


class Searcher(ABC):
    """An in-memory first stage over one index's rows: image ids of the nearest codes or vectors."""

    def __init__(self, ids: np.ndarray) -> None:
        #: Row position → image id.
        self.ids = ids

    @abstractmethod
    def _search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions and first-stage distances of the ``n`` best rows (position -1 pads)."""

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ids and first-stage distances of the ``n`` best rows, best first."""
        if len(self.ids) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        positions, distances = self._search(np.ascontiguousarray(query, dtype=np.float32), min(n, len(self.ids)))
        keep = positions >= 0
        return self.ids[positions[keep]], distances[keep]


class FaissSearcher(Searcher):
    def __init__(self, index: faiss.Index, ids: np.ndarray, squared: bool) -> None:
        super().__init__(ids)
        self.index = index
        self.squared = squared

    def _search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        distances, positions = self.index.search(query[None, :], n)
        distances = distances[0]
        # PQ distances are squared L2: report L2 like pgvector's <->. LSH reports Hamming bits.
        return positions[0], np.sqrt(np.maximum(distances, 0)) if self.squared else distances


class TreeSearcher(Searcher):
    def __init__(self, tree: cKDTree, ids: np.ndarray) -> None:
        super().__init__(ids)
        self.tree = tree

    def _search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        distances, positions = self.tree.query(query, k=n)
        return np.atleast_1d(positions).astype(np.int64), np.atleast_1d(distances).astype(np.float32)


class CodeIndex(ABC):
    """One index's Python-side first stage: how it learns, encodes and searches."""

    #: Whether rows carry codes (else the searcher is built from the stored vectors).
    uses_codes = True

    def __init__(self, spec: AnnSpec, dim: int) -> None:
        self.spec = spec
        self.dim = dim

    @property
    @abstractmethod
    def trained(self) -> bool: ...

    @abstractmethod
    def train(self, sample: np.ndarray) -> dict[str, np.ndarray]:
        """Learn from a sample of the collection; returns the arrays to persist."""

    @abstractmethod
    def load_state(self, state: dict[str, np.ndarray]) -> None: ...

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """One code (a row of bytes) per vector."""
        raise NotImplementedError

    def codes_for(self, vectors: np.ndarray) -> np.ndarray | None:
        """The codes to write with new vectors, or None when this first stage keeps none (yet)."""
        return self.encode(vectors) if self.uses_codes and self.trained else None

    @abstractmethod
    def searcher(self, ids: np.ndarray, data: np.ndarray) -> Searcher:
        """A searcher over rows ``ids`` with their codes (or vectors, if not :attr:`uses_codes`)."""

    @property
    def code_size(self) -> int:
        """Bytes per stored code."""
        return 0


class FaissCodes(CodeIndex):
    """PQ, OPQ+PQ, IVF-PQ and LSH: a faiss index trained once, filled from stored codes."""

    def __init__(self, spec: AnnSpec, dim: int) -> None:
        super().__init__(spec, dim)
        self._trained: faiss.Index | None = None

    @property
    def trained(self) -> bool:
        return self._trained is not None

    def factory(self, rows: int) -> faiss.Index:
        """The untrained faiss index for a collection of ``rows`` vectors."""
        p = self.spec.params
        if self.spec.method == "lsh":
            bits = p["bits"] or 4 * self.dim
            # Thresholds at the training medians: every bit splits the collection in half, which
            # uncentred data (SIFT, post-ReLU CNN activations) needs for its bits to carry information.
            return faiss.IndexLSH(self.dim, bits, True, True)
        m = p["m"] or default_subquantizers(self.dim)
        if self.dim % m:
            raise ValueError(f"{self.spec.method}: m={m} does not divide the dimension {self.dim}")
        # k-means needs at least as many points as centroids: fewer bits on small collections.
        nbits = min(p["nbits"], int(math.log2(max(rows, 2))))
        # "np": no polysemous training, which the factory turns on by default and which makes
        # training ten times slower for codes imgdb never ranks by Hamming distance.
        pq = f"PQ{m}x{nbits}np"
        if self.spec.method == "ivfpq":
            # From the training sample, not the collection: k-means gets 128+ points per list.
            lists = p["lists"] or max(1, min(int(4 * math.sqrt(rows)), rows // 8))
            pq = f"IVF{lists},{pq}"
        # faiss's OPQ training crashes on fewer vectors than dimensions: plain PQ until a rebuild.
        rotate = p["opq"] and rows >= self.dim
        index = faiss.index_factory(self.dim, (f"OPQ{m}," if rotate else "") + pq)
        _quiet(index)
        return index

    def train(self, sample: np.ndarray) -> dict[str, np.ndarray]:
        index = self.factory(len(sample))
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        self._trained = index
        return {STATE_KEY: faiss.serialize_index(index)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._trained = faiss.deserialize_index(state[STATE_KEY]) if STATE_KEY in state else None

    @property
    def code_size(self) -> int:
        return self._trained.sa_code_size() if self._trained is not None else 0

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        assert self._trained is not None, "encode before train"
        return self._trained.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))

    def searcher(self, ids: np.ndarray, data: np.ndarray) -> Searcher:
        assert self._trained is not None, "search before train"
        index = faiss.clone_index(self._trained)
        # An OPQ rotation wraps the quantizer: the codes go to the inner index, queries through both.
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
        if len(ids):
            inner.add_sa_codes(np.ascontiguousarray(data), np.arange(len(ids), dtype=np.int64))
        index.ntotal = inner.ntotal
        if self.spec.method == "ivfpq":
            faiss.extract_index_ivf(index).nprobe = self.spec.params["probes"]
        return FaissSearcher(index, ids, squared=self.spec.method != "lsh")


class KdTree(CodeIndex):
    """Exact nearest neighbours by a KD-tree over the stored vectors (scipy's cKDTree)."""

    uses_codes = False

    @property
    def trained(self) -> bool:
        return True

    def train(self, sample: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        pass

    def searcher(self, ids: np.ndarray, data: np.ndarray) -> Searcher:
        return TreeSearcher(cKDTree(data, leafsize=self.spec.params["leafsize"]), ids)


def _quiet(index: faiss.Index) -> None:
    """Let k-means run on few points per centroid without a warning on stderr: small collections
    are expected to, and their users should not see faiss's advice on training-set sizes."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    for holder in (inner, getattr(inner, "pq", None)):
        if holder is not None and hasattr(holder, "cp"):
            holder.cp.min_points_per_centroid = 1


def default_subquantizers(dim: int) -> int:
    """dim/4 sub-quantizers (codes 1/16 of the float32 vector at 8 bits), or the nearest divisor below."""
    return next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)


def code_index(spec: AnnSpec, dim: int) -> CodeIndex:
    """The Python-side first stage an ANN spec names."""
    if spec.method == "kdtree":
        return KdTree(spec, dim)
    if spec.method in ("pq", "ivfpq", "lsh"):
        return FaissCodes(spec, dim)
    raise ValueError(f"{spec.method} is not a Python-side method")
