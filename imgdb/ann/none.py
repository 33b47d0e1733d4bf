"""``none``: no index structure. Every query is an exact scan in SQL, which is also how any query is
answered while its index's own first stage cannot answer yet (a structure not learned or not built)."""

from __future__ import annotations

from collections.abc import Sequence

from imgdb.ann.method import AnnMethod
from imgdb.ann.pgvector import single_sql_order
from imgdb.ann.spec import AnnSpec
from imgdb.db import search as sql
from imgdb.query.parts import FirstStage, Probe, Ranking, Reranker


class NoIndex(AnnMethod):
    name = "none"
    summary = "no index: an exact scan"
    approximate = False

    def first_stage(self, ann: AnnSpec) -> FirstStage:
        return ExactScan(ann)


class ExactScan(FirstStage):
    """An exact scan of the vectors that pass the filters, in SQL."""

    def rank(self, probe: Probe, n: int) -> Ranking | None:
        return Ranking(*sql.first_stage(probe.conn, probe.index, probe.vector, n, probe.filters, exact=True))

    def single_statement(self, probe: Probe, n: int, chain: Sequence[Reranker]) -> list[sql.Hit] | None:
        if single_sql_order(chain) is None:
            return None
        return sql.nearest(probe.conn, probe.index, probe.vector, probe.k, probe.k, probe.filters, exact=True)
