"""First stages searched in this process (``pq``, ``ivfpq``, ``lsh``, ``kdtree``): what they share.

The quantizers are faiss's (its PQ is the reference the issue measures against, and its ADC and
Hamming scans are hand-tuned SIMD); what imgdb adds is the life cycle around them. A quantizer is
learned once from a sample of the collection and kept as faiss's own serialisation of the *empty*
trained index, in ``index_state``. Every vector's code is computed when the vector is written and
stored next to it (``ann_code``), so adds and deletes are plain row writes; at query time the codes
are loaded back into a faiss index with ``add_sa_codes`` (:mod:`imgdb.ann.layer` keeps it current).

A method without codes (the KD-tree) builds its searcher from the stored vectors when loaded. faiss
and scipy are imported by the methods that use them, when they first do: a process whose indexes
are all pgvector ones never loads them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from imgdb.ann.method import AnnMethod, CodeIndex, Searcher
from imgdb.ann.spec import AnnSpec
from imgdb.db import search as sql
from imgdb.query.parts import FirstStage, Probe, Ranking

if TYPE_CHECKING:
    import faiss

#: Key of the serialised trained faiss index in the method's state.
FAISS_KEY = "faiss"


class CodesMethod(AnnMethod):
    """A method whose first stage runs in this process over codes (or vectors) read from PostgreSQL."""

    def first_stage(self, ann: AnnSpec) -> FirstStage:
        return CodesStage(ann, self)


class FaissMethod(CodesMethod):
    """A method whose codes are a trained faiss index's (``sa_encode``); the method says which index."""

    learns = True
    uses_codes = True
    #: Whether faiss reports squared L2 distances (reported as L2, like pgvector's ``<->``).
    squared: ClassVar[bool] = True

    @abstractmethod
    def untrained(self, ann: AnnSpec, dim: int, rows: int) -> faiss.Index:
        """The faiss index to train for a sample of ``rows`` vectors of ``dim``."""

    def searching(self, index: faiss.Index, ann: AnnSpec) -> None:  # noqa: B027 - most need no setting
        """Set what a search with this index runs with (IVF's probes)."""

    def learn(self, ann: AnnSpec, dim: int, sample: np.ndarray) -> dict[str, np.ndarray]:
        import faiss

        index = self.untrained(ann, dim, len(sample))
        quiet(index)
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        return {FAISS_KEY: faiss.serialize_index(index)}

    def code_index(self, ann: AnnSpec, dim: int, state: Mapping[str, np.ndarray]) -> CodeIndex | None:
        if FAISS_KEY not in state:
            return None
        import faiss

        return FaissCodes(self, ann, faiss.deserialize_index(state[FAISS_KEY]))


class FaissCodes(CodeIndex):
    """A trained faiss index: encodes vectors, and is cloned and filled with stored codes to search."""

    def __init__(self, method: FaissMethod, ann: AnnSpec, trained: faiss.Index) -> None:
        self.method, self.ann, self.trained = method, ann, trained
        self.code_size = trained.sa_code_size()

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        return self.trained.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))

    def searcher(self, ids: np.ndarray, data: np.ndarray) -> Searcher:
        import faiss

        index = faiss.clone_index(self.trained)
        # A rotation (OPQ) wraps the quantizer: the codes go to the inner index, queries through both.
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
        if len(ids):
            inner.add_sa_codes(np.ascontiguousarray(data), np.arange(len(ids), dtype=np.int64))
        index.ntotal = inner.ntotal
        self.method.searching(index, self.ann)
        return FaissSearcher(index, ids, self.method.squared)


class FaissSearcher(Searcher):
    def __init__(self, index: faiss.Index, ids: np.ndarray, squared: bool) -> None:
        super().__init__(ids)
        self.index = index
        self.squared = squared

    def _search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        distances, positions = self.index.search(query[None, :], n)
        distances = distances[0]
        return positions[0], np.sqrt(np.maximum(distances, 0)) if self.squared else distances


def quiet(index: faiss.Index) -> None:
    """Let k-means run on few points per centroid without a warning on stderr: small collections
    are expected to, and their users should not see faiss's advice on training-set sizes."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    for holder in (inner, getattr(inner, "pq", None)):
        if holder is not None and hasattr(holder, "cp"):
            holder.cp.min_points_per_centroid = 1


class CodesStage(FirstStage):
    """Candidates from the index's searcher in this process (loaded, and reloaded when the index's
    version moves, by the index layer)."""

    def __init__(self, ann: AnnSpec, method: CodesMethod) -> None:
        super().__init__(ann)
        self.approximate = method.approximate
        self.pq_distances = method.ranks_by_pq

    def rank(self, probe: Probe, n: int) -> Ranking | None:
        searcher = probe.layer.searcher(probe.index, sql.version(probe.conn, probe.index))
        return None if searcher is None else Ranking(*searcher.search(probe.vector, n))
