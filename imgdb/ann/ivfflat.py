"""``ivfflat``: pgvector's inverted lists of full vectors. Builds faster and smaller than HNSW; a query
scans ``probes`` lists."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from imgdb.ann.method import Structure
from imgdb.ann.pgvector import PgvectorMethod
from imgdb.ann.spec import AnnSpec
from imgdb.db.records import IndexRecord


class IvfFlat(PgvectorMethod):
    name = "ivfflat"
    summary = "pgvector's inverted lists; lists=0: rows/1000, sqrt(rows) past 1M"
    defaults = {"lists": 0, "probes": 10}

    def check(self, params: Mapping[str, int], dim: int | None, storage: str | None) -> None:
        self.require(params["probes"] >= 1, f"{self.name}: probes must be at least 1")

    def structure(self, index: IndexRecord, rows: int, state: Mapping[str, np.ndarray]) -> Structure | None:
        lists = int(index.ann_params["lists"]) or default_lists(rows)
        return Structure(f"ivfflat (embedding {index.storage}_l2_ops) WITH (lists = {lists})")

    def query_settings(self, ann: AnnSpec, candidates: int) -> dict[str, str]:
        return {"ivfflat.probes": str(ann.params["probes"])}


def default_lists(rows: int) -> int:
    """pgvector's rule of thumb: rows/1000 lists up to 1M rows, sqrt(rows) above."""
    return max(1, rows // 1000 if rows <= 1_000_000 else int(rows ** 0.5))
