"""A query: the index's first stage, the chain of re-rankers, then the one ``images`` join.

Where the first stage and the chain allow it (a pgvector index with an exact re-rank, or none),
the whole query is one SQL statement: the latency-critical common case. A first stage that cannot
answer yet (an untrained quantizer, a pgvector index a bulk load dropped), or a filter that leaves
fewer than ``k`` results among the candidates, hands the query to an exact scan, so that neither
ever costs results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import psycopg

from imgdb.ann.spec import parse_ann
from imgdb.db import search as sql
from imgdb.query.first_stages import Exact
from imgdb.query.parts import FirstStage, Probe, QueryImage, Reranker
from imgdb.query.registry import first_stage, rerankers

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement
    from imgdb.ann.layer import AnnLayer


def search(layer: AnnLayer, conn: psycopg.Connection, target: sql.Target, vector: np.ndarray, k: int,
           filters: Sequence[ColumnElement[bool]] = (), *, image: QueryImage = QueryImage(),
           rerank: str = "exact", candidates: int | None = None) -> list[sql.Hit]:
    """The ``k`` nearest images that pass ``filters``; ``image`` is the query's image, for the
    re-rankers that look at pixels; ``rerank`` names the chain
    (:func:`~imgdb.query.registry.rerankers`), ``candidates`` how many first-stage results it sees
    (default: what the chain asks for, 10 per result for an exact re-rank of approximate ones)."""
    ann = parse_ann(target.index.ann, target.index.ann_params)
    chain = rerankers(rerank)
    for part in chain:
        part.check(target, ann)
    probe = Probe(conn, target, ann, vector, image, k, filters, layer)
    hits = _run(first_stage(ann), probe, chain, candidates)
    if filters and len(hits) < k:
        hits = _run(Exact(ann), probe, chain, candidates)
    return hits


def _run(stage: FirstStage, probe: Probe, chain: Sequence[Reranker], candidates: int | None) -> list[sql.Hit]:
    n = max(candidates or max(part.candidates(probe.k, stage) for part in chain), probe.k)
    hits = stage.single_statement(probe, n, chain)
    if hits is not None:
        return hits
    ranking = stage.rank(probe, n)
    if ranking is None:
        return _run(Exact(stage.ann), probe, chain, candidates)
    for part in chain:
        ranking = part.rerank(probe, ranking)
    return sql.hits(probe.conn, probe.target, ranking.ids, ranking.distances, probe.k, probe.filters, ranking.notes)
