"""``hnsw``: pgvector's HNSW graph on the vectors (L2; imgdb's vectors are unit length, so it ranks as
cosine does). The default first stage: recall@10 0.97+ at ef_search 40 on 1M SIFT vectors
(benchmarks/ann.py)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from imgdb.ann.method import Structure
from imgdb.ann.pgvector import MAX_EF_SEARCH, PgvectorMethod, hnsw_memory_mb
from imgdb.ann.spec import AnnSpec
from imgdb.db.records import IndexRecord


class Hnsw(PgvectorMethod):
    name = "hnsw"
    summary = "pgvector's HNSW graph, the default"
    # pgvector's own defaults.
    defaults = {"m": 16, "ef_construction": 64, "ef_search": 40}

    def check(self, params: Mapping[str, int], dim: int | None, storage: str | None) -> None:
        self.require(2 <= params["m"] <= 100, f"{self.name}: m must be between 2 and 100 (pgvector's limits)")
        self.require(params["ef_construction"] >= 2 * params["m"],
                     f"{self.name}: ef_construction must be at least twice m (pgvector's limit)")

    def structure(self, index: IndexRecord, rows: int, state: Mapping[str, np.ndarray]) -> Structure | None:
        return self.graph(index, rows, f"embedding {index.storage}_l2_ops")

    def graph(self, index: IndexRecord, rows: int, column: str) -> Structure:
        """An HNSW graph over ``column`` (an expression with its operator class)."""
        p = index.ann_params
        return Structure(f"hnsw ({column}) WITH (m = {int(p['m'])}, ef_construction = {int(p['ef_construction'])})",
                         hnsw_memory_mb(rows, index, int(p["m"])))

    def query_settings(self, ann: AnnSpec, candidates: int) -> dict[str, str]:
        """The candidate list grows with the candidates asked for, within pgvector's bound."""
        return {"hnsw.ef_search": str(min(max(ann.params["ef_search"], candidates), MAX_EF_SEARCH))}
