"""ANN specs: ``METHOD[/KEY=VALUE]...`` such as ``hnsw/m=32/ef_search=80`` or ``ivfpq/lists=4096``.

An index stores its method and every parameter spelled out (defaults filled in), like extractor
specs, so that changing a default later never changes how an existing index behaves. ``0`` means
"chosen from the collection when the structure is built" where a good value depends on its size
(IVF lists, PQ sub-quantizers). A spec is a plain value: the methods that give it meaning, and the
parser that checks it against them, are :mod:`imgdb.ann.registry`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgdb.db.records import IndexRecord

#: Candidates fetched per result for an exact re-rank after an approximate first stage.
CANDIDATES_PER_RESULT = 10


@dataclass(frozen=True)
class AnnSpec:
    """A first stage: its method's name and every parameter, spelled out."""

    method: str
    params: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, index: IndexRecord) -> AnnSpec:
        """An index's first stage, as its registry row stores it."""
        return cls(index.ann, {k: int(v) for k, v in index.ann_params.items()})

    def __str__(self) -> str:
        return "/".join([self.method, *(f"{k}={v}" for k, v in self.params.items())])

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}
