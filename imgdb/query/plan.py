"""A query: the index's first stage, the chain of re-rankers, then the one ``images`` join.

Where the first stage and the chain allow it (a pgvector index with an exact re-rank, or none),
the whole query is one SQL statement: the latency-critical common case. A first stage that cannot
answer yet (a method that has not learned from the data, a pgvector index a bulk load dropped), or
a filter that leaves fewer than ``k`` results among the candidates, hands the query to an exact
scan, so that neither ever costs results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import psycopg

from imgdb.ann.none import ExactScan
from imgdb.ann.registry import method
from imgdb.ann.spec import AnnSpec
from imgdb.db import search as sql
from imgdb.db.records import IndexRecord
from imgdb.query.parts import FirstStage, Probe, QueryImage, Reranker, Searchers
from imgdb.query.registry import rerankers

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement


def search(layer: Searchers, conn: psycopg.Connection, index: IndexRecord, vector: np.ndarray, k: int,
           filters: Sequence[ColumnElement[bool]] = (), *, image: QueryImage = QueryImage(),
           rerank: str = "exact", candidates: int | None = None) -> list[sql.Hit]:
    """The ``k`` nearest images that pass ``filters``; ``image`` is the query's image, for the
    re-rankers that look at pixels; ``rerank`` names the chain
    (:func:`~imgdb.query.registry.rerankers`), ``candidates`` how many first-stage results it sees
    (default: what the chain asks for, 10 per result for an exact re-rank of approximate ones)."""
    ann = AnnSpec.of(index)
    stage = method(ann.method).first_stage(ann)
    chain = rerankers(rerank)
    for part in chain:
        part.check(index, stage)
    probe = Probe(conn, index, vector, image, k, filters, layer)
    hits = _run(stage, probe, chain, candidates)
    if filters and len(hits) < k:
        hits = _run(ExactScan(ann), probe, chain, candidates)
    return hits


def _run(stage: FirstStage, probe: Probe, chain: Sequence[Reranker], candidates: int | None) -> list[sql.Hit]:
    n = max(candidates or max(part.candidates(probe.k, stage) for part in chain), probe.k)
    hits = stage.single_statement(probe, n, chain)
    if hits is not None:
        return hits
    ranking = stage.rank(probe, n)
    if ranking is None:
        return _run(ExactScan(stage.ann), probe, chain, candidates)
    for part in chain:
        ranking = part.rerank(probe, ranking)
    return sql.hits(probe.conn, probe.index, ranking.ids, ranking.distances, probe.k, probe.filters, ranking.notes)
