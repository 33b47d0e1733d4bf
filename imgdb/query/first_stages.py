"""First stages: pgvector's indexes inside PostgreSQL, the Python-side codes, and an exact scan."""

from __future__ import annotations

from collections.abc import Sequence

from imgdb.ann.spec import AnnSpec
from imgdb.db import search as sql
from imgdb.query.parts import FirstStage, Probe, Ranking, Reranker

#: pgvector stops growing the HNSW candidate list here.
MAX_EF_SEARCH = 1000


class Pgvector(FirstStage):
    """HNSW, IVFFlat, or HNSW over the centred sign bits (binary quantization), in PostgreSQL."""

    def __init__(self, ann: AnnSpec) -> None:
        super().__init__(ann)
        self.hamming = ann.method == "bq"
        self.approximate = self.hamming

    def settings(self, n: int) -> dict[str, str]:
        """The pgvector settings for ``n`` candidates: HNSW's candidate list grows to match (within
        pgvector's bound), IVFFlat probes as many lists as the index says."""
        if self.ann.method == "ivfflat":
            return {"ivfflat.probes": str(self.ann.params["probes"])}
        return {"hnsw.ef_search": str(min(max(self.ann.params["ef_search"], n), MAX_EF_SEARCH))}

    def rank(self, probe: Probe, n: int) -> Ranking | None:
        if not probe.target.has_ann:
            # A bulk load dropped it (and builds it when it ends), or one was interrupted. A query
            # never builds it (that would run DDL behind the load's locks, for as long as a build
            # takes): it answers by exact scan until a writer does (ingest, sync, index rebuild).
            return None
        return Ranking(*sql.first_stage(probe.conn, probe.target, probe.vector, n, probe.filters,
                                        settings=self.settings(n), hamming=self.hamming))

    def single_statement(self, probe: Probe, n: int, chain: Sequence[Reranker]) -> list[sql.Hit] | None:
        if not probe.target.has_ann or not _by_distance_only(chain):
            return None
        return sql.nearest(probe.conn, probe.target, probe.vector, probe.k, n, probe.filters,
                           settings=self.settings(n), hamming=self.hamming, rerank=chain[0].name == "exact")


class Codes(FirstStage):
    """PQ, IVF-PQ, LSH or the KD-tree, searched in this process (:mod:`imgdb.ann.codes`)."""

    def __init__(self, ann: AnnSpec) -> None:
        super().__init__(ann)
        self.approximate = ann.method != "kdtree"

    def rank(self, probe: Probe, n: int) -> Ranking | None:
        searcher = probe.layer.searcher(probe.target.index, sql.version(probe.conn, probe.target.index))
        return None if searcher is None else Ranking(*searcher.search(probe.vector, n))


class Exact(FirstStage):
    """No index structure: an exact scan in SQL (``--ann none``, and the answer of any query whose
    first stage cannot answer yet)."""

    def rank(self, probe: Probe, n: int) -> Ranking | None:
        return Ranking(*sql.first_stage(probe.conn, probe.target, probe.vector, n, probe.filters, exact=True))

    def single_statement(self, probe: Probe, n: int, chain: Sequence[Reranker]) -> list[sql.Hit] | None:
        if not _by_distance_only(chain):
            return None
        return sql.nearest(probe.conn, probe.target, probe.vector, probe.k, probe.k, probe.filters, exact=True)


def _by_distance_only(chain: Sequence[Reranker]) -> bool:
    """Whether the chain is one ``exact`` or ``none`` re-rank: what a single SQL statement can do."""
    return [r.name for r in chain] in (["exact"], ["none"])
