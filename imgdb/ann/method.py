"""What an ANN method is: one registered part (:mod:`imgdb.ann.registry`) that knows everything its
first stage needs, so that adding a method is one module and an entry point.

A method knows
* its parameters: their defaults (:attr:`AnnMethod.defaults`), and how to check them against the
  vectors' dimension and storage (:meth:`AnnMethod.check`, :meth:`AnnMethod.max_dim`);
* what it learns from the data, and from how many vectors on (:meth:`AnnMethod.learn`,
  :attr:`AnnMethod.min_vectors`): the index layer (:mod:`imgdb.ann.layer`) has it learn once the
  index holds that many vectors, and again at ``imgdb index rebuild``, never from an empty table;
  until then its first stage cannot answer and queries are exact;
* the structure it keeps: a pgvector index built in PostgreSQL (:meth:`AnnMethod.structure`), or
  codes kept with each vector and searched in this process (:meth:`AnnMethod.code_index`);
* its first stage (:meth:`AnnMethod.first_stage`), and a line of help for the CLI.

The three kinds that serve the built-in methods share their machinery: :mod:`imgdb.ann.pgvector`
(``hnsw``, ``ivfflat``, ``bq``), :mod:`imgdb.ann.codes` (``pq``, ``ivfpq``, ``lsh``, ``kdtree``) and
:mod:`imgdb.ann.none`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from imgdb.ann.spec import AnnSpec
from imgdb.errors import ImgdbError

if TYPE_CHECKING:
    from imgdb.db.records import IndexRecord
    from imgdb.query.parts import FirstStage


@dataclass(frozen=True)
class Structure:
    """A pgvector index to build on an index's vectors: what follows ``USING`` in ``CREATE INDEX``
    (access method, indexed expression with its operator class, storage parameters), and the
    ``maintenance_work_mem`` its build wants."""

    using: str
    memory_mb: int = 64


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


class CodeIndex(ABC):
    """A method's in-process structure over one index, as learned: how it encodes vectors and what it searches."""

    #: Bytes per stored code (0: no codes, the searcher takes the vectors).
    code_size = 0

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """One code (a row of bytes) per vector."""
        raise NotImplementedError

    def codes_for(self, vectors: np.ndarray) -> np.ndarray | None:
        """The codes to write with new vectors, or None when this first stage keeps none."""
        return self.encode(vectors) if self.code_size else None

    @abstractmethod
    def searcher(self, ids: np.ndarray, data: np.ndarray) -> Searcher:
        """A searcher over rows ``ids`` with their codes (or vectors, if it keeps no codes)."""


#: The most float32 bytes a method learns from (:meth:`AnnMethod.sample_rows`).
SAMPLE_BYTES = 2 * 2**30


class AnnMethod(ABC):
    """One ANN method. Instances hold no state (one per process serves every index); what an index
    learned is handed in as ``state``, the arrays :meth:`learn` returned, kept in ``index_state``."""

    #: Its name in ``--ann`` specs.
    name: ClassVar[str]
    #: What it is, in a few words, for ``--help`` and error messages.
    summary: ClassVar[str]
    #: Every parameter with its default (all integers).
    defaults: ClassVar[Mapping[str, int]] = {}
    #: Whether its distances are estimates (quantized codes, sign bits): an exact re-rank then sees
    #: CANDIDATES_PER_RESULT candidates per result.
    approximate: ClassVar[bool] = True
    #: Whether it ranks by product-quantization distances (what ``--rerank pq`` keeps).
    ranks_by_pq: ClassVar[bool] = False
    #: Whether it learns from the vectors (:meth:`learn`).
    learns: ClassVar[bool] = False
    #: Fewer vectors than this and it does not learn yet: queries stay exact until it has.
    min_vectors: ClassVar[int] = 16
    #: The most vectors it learns from (a fixed pseudo-random sample of a larger index): faiss's
    #: k-means uses at most 256 points per centroid anyway. Fewer of long vectors: :meth:`sample_rows`.
    max_sample: ClassVar[int] = 262_144
    #: Keys of its learned state that its SQL reads with every query (binary quantization's centre),
    #: read with the index's registry row so that a query costs no extra round trip.
    query_state: ClassVar[tuple[str, ...]] = ()
    #: Whether each vector's row carries a code of this method (written with the vector).
    uses_codes: ClassVar[bool] = False

    def check(self, params: Mapping[str, int], dim: int | None, storage: str | None) -> None:  # noqa: B027
        """Refuse parameters this method cannot run with, with the reason: on their own (``dim`` and
        ``storage`` None, as a spec is parsed) and for vectors of ``dim`` in ``storage`` (as an index
        is created). Their being non-negative integers, and the dimension against :meth:`max_dim`,
        are checked already."""

    def sample_rows(self, dim: int) -> int:
        """The most vectors of ``dim`` dimensions it learns from: ``max_sample``, fewer where they
        would hold more than SAMPLE_BYTES as float32 (a whole VLAD of 8,192 dimensions: 65,536
        vectors, 2 GiB, not 262,144 and 8 GiB)."""
        return max(self.min_vectors, min(self.max_sample, SAMPLE_BYTES // (4 * dim)))

    def max_dim(self, storage: str) -> int | None:
        """The most dimensions it indexes in ``storage`` (``vector`` or ``halfvec``); None: no limit."""
        return None

    def learn(self, ann: AnnSpec, dim: int, sample: np.ndarray) -> dict[str, np.ndarray]:
        """What it learns from a sample of the index's vectors (``min_vectors`` or more, float32):
        the arrays to keep, by key."""
        raise NotImplementedError(f"ANN method {self.name} learns nothing")

    def structure(self, index: IndexRecord, rows: int, state: Mapping[str, np.ndarray]) -> Structure | None:
        """The pgvector index it keeps on the vectors table of ``index`` (holding ``rows`` vectors),
        given what it learned; None where it keeps none (or cannot until it has learned)."""
        return None

    def query_settings(self, ann: AnnSpec, candidates: int) -> dict[str, str]:
        """The session settings its SQL first stage runs with for ``candidates`` candidates."""
        return {}

    def code_index(self, ann: AnnSpec, dim: int, state: Mapping[str, np.ndarray]) -> CodeIndex | None:
        """Its in-process structure over the codes (or vectors) of an index, given what it learned;
        None where it has none, or has not learned yet."""
        return None

    @abstractmethod
    def first_stage(self, ann: AnnSpec) -> FirstStage:
        """The part of the query path that ranks candidates for an index of this method."""

    def help(self) -> str:
        """One line for ``--help``: name, summary, parameters and their defaults."""
        options = ", ".join(f"{k}={v}" for k, v in self.defaults.items())
        return f"{self.name} ({self.summary}{'; ' + options if options else ''})"

    @staticmethod
    def require(condition: bool, message: str) -> None:
        """:meth:`check`'s refusal: a one-line reason when ``condition`` does not hold."""
        if not condition:
            raise ImgdbError(message)
