"""What the parts of a query hand each other: a :class:`Probe` (the query as every part sees it)
and a :class:`Ranking` (ids, best first), and the two kinds of part."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import psycopg
from PIL import Image

from imgdb.ann.spec import AnnSpec
from imgdb.db.records import IndexRecord
from imgdb.db.search import Hit

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement


@dataclass(frozen=True)
class Ranking:
    """Image ids best first, with the distance each was ranked by, and what re-rankers noted about
    them (reported with the hits)."""

    ids: np.ndarray
    distances: np.ndarray
    notes: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class QueryImage:
    """What the query was, for the parts that look at the image rather than its vector: its pixels,
    decoded once for all of them, or the stored image it names (``id:N``); neither for a vector."""

    pixels: Image.Image | None = None
    image_id: int | None = None
    #: What parts derived from the image (its keypoints per spec), so that the next part reuses it.
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]


@dataclass(frozen=True)
class EncodedQuery:
    """A query encoded once, to search with more than once (eval: the search path's head and the
    exact tail of a ranking share one encoding)."""

    vector: np.ndarray
    image: QueryImage


class InProcessSearcher(Protocol):
    """A first stage held in this process (:class:`imgdb.ann.codes.Searcher`)."""

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]: ...


class Searchers(Protocol):
    """Where first stages that run in this process find theirs, current to the index's version
    (:class:`imgdb.ann.layer.AnnLayer`)."""

    def searcher(self, index: IndexRecord, version: int) -> InProcessSearcher | None: ...


@dataclass(frozen=True)
class Probe:
    """One query as its parts see it: the connection it runs on, the index, the query vector and
    image, how many results it wants, its filters, and where in-process first stages are kept."""

    conn: psycopg.Connection
    index: IndexRecord
    vector: np.ndarray
    image: QueryImage
    k: int
    filters: Sequence[ColumnElement[bool]]
    layer: Searchers


class FirstStage(ABC):
    """Ranked candidates for a probe, from one index structure."""

    def __init__(self, ann: AnnSpec) -> None:
        self.ann = ann
        #: Whether its distances are only estimates (quantized codes, sign bits): an exact re-rank
        #: then sees more candidates than results.
        self.approximate = False
        #: Whether its distances are product-quantization ones (what ``--rerank pq`` keeps).
        self.pq_distances = False

    @abstractmethod
    def rank(self, probe: Probe, n: int) -> Ranking | None:
        """The ``n`` best candidates, or None when the structure cannot answer yet (an untrained
        quantizer, a pgvector index a bulk load dropped): the query is then answered exactly."""

    def single_statement(self, probe: Probe, n: int, chain: Sequence[Reranker]) -> list[Hit] | None:
        """The whole query (re-rank and join included) in one SQL statement, where this stage and
        ``chain`` allow it: the fast path. None where they do not."""
        return None


class Reranker(ABC):
    """Takes a ranking and returns one (never more ids than it was given)."""

    name: ClassVar[str]
    #: What it does, in a few words, for ``--help``.
    summary: ClassVar[str]
    #: Whether it decides which distances the first stage's candidates carry (``exact``, ``none``,
    #: ``pq``): a chain starts with one such re-ranker (``exact`` unless it names another), and the
    #: others refine what it gives.
    starts_chain: ClassVar[bool] = False
    #: How SQL orders the candidates when this re-ranker is the whole chain: ``"exact"`` (by the
    #: stored vectors) or ``"first_stage"`` (by the first stage's own distances), so that the query
    #: is one statement; None where it needs this process.
    sql_order: ClassVar[str | None] = None

    def check(self, index: IndexRecord, stage: FirstStage) -> None:  # noqa: B027 - most work on any index
        """Refuse an index or first stage this re-rank cannot work with (with the reason)."""

    def candidates(self, k: int, stage: FirstStage) -> int:
        """How many first-stage candidates it wants to see for ``k`` results."""
        return k

    @abstractmethod
    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking: ...
