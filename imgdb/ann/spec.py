"""ANN method specs: ``METHOD[/KEY=VALUE]...`` such as ``hnsw/m=32/ef_search=80`` or ``ivfpq/lists=4096``.

An index stores its method and every parameter spelled out (defaults filled in), like extractor
specs, so that changing a default later never changes how an existing index behaves. ``0`` means
"chosen from the collection when the structure is built" where a good value depends on its size
(IVF lists, PQ sub-quantizers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imgdb.db.records import PGVECTOR_METHODS
from imgdb.errors import ImgdbError

#: First stages served by pgvector inside PostgreSQL.
SQL_METHODS = PGVECTOR_METHODS
#: First stages served by imgdb's Python-side layer from codes stored in PostgreSQL.
PY_METHODS = ("pq", "ivfpq", "lsh", "kdtree")
METHODS = (*SQL_METHODS, *PY_METHODS, "none")

#: Defaults, from ``benchmarks/ann.py`` on 1M SIFT descriptors and the museum CNN vectors (README).
DEFAULTS: dict[str, dict[str, int]] = {
    # pgvector's own defaults: recall@10 0.97+ at ef_search 40 on 1M SIFT vectors.
    "hnsw": {"m": 16, "ef_construction": 64, "ef_search": 40},
    # lists 0: rows/1000 up to 1M rows, sqrt(rows) above (pgvector's advice); 10 probes.
    "ivfflat": {"lists": 0, "probes": 10},
    # Hamming HNSW over the sign bits, re-ranked by the full vectors: needs a wide candidate pool.
    "bq": {"m": 16, "ef_construction": 64, "ef_search": 200},
    # m 0: dim/4 sub-quantizers of 8 bits = 1/16 of the float32 vector. opq 1 learns a rotation
    # first (from at least dim vectors: a smaller collection gets plain PQ until `index rebuild`).
    "pq": {"m": 0, "nbits": 8, "opq": 0},
    # lists 0: 4·sqrt(training rows), the rows k-means learns from (a sample of at most 262,144, so at
    # most 2048 lists, each learnt from 128+ points); probes 32.
    "ivfpq": {"lists": 0, "probes": 32, "m": 0, "nbits": 8, "opq": 0},
    # bits 0: 4·dim random hyperplanes (1/8 of the float32 vector), ranked by Hamming distance.
    "lsh": {"bits": 0},
    "kdtree": {"leafsize": 16},
    "none": {},
}

#: Candidates fetched per result for an exact re-rank after an approximate first stage.
CANDIDATES_PER_RESULT = 10


@dataclass(frozen=True)
class AnnSpec:
    method: str
    params: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return "/".join([self.method, *(f"{k}={v}" for k, v in self.params.items())])

    @property
    def in_sql(self) -> bool:
        """Whether PostgreSQL serves the first stage (else the Python-side layer, or exact SQL)."""
        return self.method in SQL_METHODS

    @property
    def python_side(self) -> bool:
        return self.method in PY_METHODS

    @property
    def has_pq(self) -> bool:
        """Whether the first stage ranks by product-quantization distances (``--rerank pq``)."""
        return self.method in ("pq", "ivfpq")

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}


def parse_ann(text: str, stored: dict[str, Any] | None = None) -> AnnSpec:
    """Parse ``METHOD[/KEY=VALUE]...``; ``stored`` parameters (from the registry) fill the rest."""
    head, *parts = [p.strip() for p in text.strip().split("/")]
    method = head.lower()
    if method not in METHODS:
        raise ImgdbError(f"unknown ANN method {head!r}: use one of {', '.join(METHODS)}")
    params = dict(DEFAULTS[method])
    for key, value in (stored or {}).items():
        if key in params:
            params[key] = int(value)
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or key not in params:
            known = ", ".join(f"{k}=" for k in params) or "none"
            raise ImgdbError(f"ANN method {method}: bad option {part!r} (options: {known})")
        try:
            params[key] = int(value)
        except ValueError:
            raise ImgdbError(f"ANN method {method}: {key} must be an integer, not {value!r}") from None
        if params[key] < 0:
            raise ImgdbError(f"ANN method {method}: {key} must not be negative")
    if method in ("hnsw", "bq") and not 2 <= params["m"] <= 100:
        raise ImgdbError(f"{method}: m must be between 2 and 100 (pgvector's limits)")
    if method in ("pq", "ivfpq") and not 1 <= params["nbits"] <= 16:
        raise ImgdbError(f"{method}: nbits must be between 1 and 16")
    return AnnSpec(method, params)
