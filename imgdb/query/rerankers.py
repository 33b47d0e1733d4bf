"""The re-rankers that order a first stage's candidates by distance (spatial verification is
:mod:`imgdb.query.verify`)."""

from __future__ import annotations

from imgdb.ann.spec import CANDIDATES_PER_RESULT
from imgdb.db import search as sql
from imgdb.db.records import IndexRecord
from imgdb.errors import ImgdbError
from imgdb.query.parts import FirstStage, Probe, Ranking, Reranker


class Exact(Reranker):
    """By the exact distance of the stored vectors (the default): after an approximate first stage
    it sees CANDIDATES_PER_RESULT candidates per result."""

    name = "exact"
    summary = "re-rank the candidates by their stored vectors"
    starts_chain = True
    sql_order = "exact"

    def candidates(self, k: int, stage: FirstStage) -> int:
        return k * CANDIDATES_PER_RESULT if stage.approximate else k

    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking:
        return Ranking(*sql.exact_distances(probe.conn, probe.index, probe.vector, ranking.ids))


class KeepOrder(Reranker):
    """The first stage's own order and distances (``none``)."""

    name = "none"
    summary = "the first stage's own order"
    starts_chain = True
    sql_order = "first_stage"

    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking:
        return ranking


class PqOrder(KeepOrder):
    """Product-quantization order, with the asymmetric distances of the query to each code's
    reconstruction: only after a PQ or IVF-PQ first stage (``pq``)."""

    name = "pq"
    summary = "product-quantization distances (pq and ivfpq indexes)"
    sql_order = None

    def check(self, index: IndexRecord, stage: FirstStage) -> None:
        if not stage.pq_distances:
            raise ImgdbError(f"--rerank pq needs product-quantization codes: this index's first stage is "
                             f"{index.ann} (create or rebuild it with --ann pq or ivfpq)")
