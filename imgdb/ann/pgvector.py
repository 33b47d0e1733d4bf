"""First stages inside PostgreSQL: a pgvector index on the index's vectors table (``hnsw``,
``ivfflat``, ``bq``), and the query path's part that uses it.

The method says what to build (:meth:`~imgdb.ann.method.AnnMethod.structure`) and the settings a
query runs with; building runs in :mod:`imgdb.db.pgvector`, querying in :mod:`imgdb.db.search`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from imgdb.ann.method import AnnMethod
from imgdb.ann.spec import AnnSpec
from imgdb.db import search as sql
from imgdb.db.records import IndexRecord
from imgdb.query.parts import FirstStage, Probe, Ranking, Reranker

#: pgvector's limits on indexed dimensions, per column type (binary quantization indexes bits).
INDEXED_DIM_LIMIT = {"vector": 2000, "halfvec": 4000, "bit": 64000}
#: pgvector stops growing the HNSW candidate list here.
MAX_EF_SEARCH = 1000


class PgvectorMethod(AnnMethod):
    """A first stage served by a pgvector index inside PostgreSQL."""

    approximate = False
    #: Whether it ranks by the Hamming distance of sign bits (binary quantization).
    hamming: ClassVar[bool] = False

    def max_dim(self, storage: str) -> int | None:
        return INDEXED_DIM_LIMIT[storage]

    def first_stage(self, ann: AnnSpec) -> FirstStage:
        return PgvectorStage(ann, self)


def hnsw_memory_mb(rows: int, index: IndexRecord, m: int) -> int:
    """maintenance_work_mem for building an HNSW graph: its vectors, 2·m neighbour slots per element
    at layer 0 (16 bytes each), element overhead, and a margin; between 64 MB and 8 GB. A graph that
    outgrows it is finished on disk, several times slower."""
    vector_bytes = index.dim * (2 if index.storage == "halfvec" else 4)
    estimate = rows * (vector_bytes + 2 * m * 16 + 200) * 1.5
    return int(min(max(estimate / 2**20, 64), 8192))


class PgvectorStage(FirstStage):
    """Candidates from the pgvector index, in one statement with the re-rank and the join where the
    chain allows it."""

    def __init__(self, ann: AnnSpec, method: PgvectorMethod) -> None:
        super().__init__(ann)
        self.method = method
        self.approximate = method.approximate

    def _center(self, index: IndexRecord) -> np.ndarray | None:
        return index.ann_state.get("center") if self.method.hamming else None

    def rank(self, probe: Probe, n: int) -> Ranking | None:
        if not probe.index.has_ann:
            # A bulk load dropped it (and builds it when it ends), one was interrupted, or the method
            # has not learned from the data yet. A query never builds it (that would run DDL behind a
            # load's locks, for as long as a build takes): it answers by exact scan until a writer
            # does (ingest, sync, index rebuild).
            return None
        return Ranking(*sql.first_stage(probe.conn, probe.index, probe.vector, n, probe.filters,
                                        settings=self.method.query_settings(self.ann, n),
                                        center=self._center(probe.index)))

    def single_statement(self, probe: Probe, n: int, chain: Sequence[Reranker]) -> list[sql.Hit] | None:
        order = single_sql_order(chain)
        if not probe.index.has_ann or order is None:
            return None
        return sql.nearest(probe.conn, probe.index, probe.vector, probe.k, n, probe.filters,
                           settings=self.method.query_settings(self.ann, n), center=self._center(probe.index),
                           rerank=order == "exact")


def single_sql_order(chain: Sequence[Reranker]) -> str | None:
    """How a chain of one re-ranker that SQL can do orders the candidates (its ``sql_order``); None
    for a chain that needs this process."""
    return chain[0].sql_order if len(chain) == 1 else None

