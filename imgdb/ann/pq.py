"""``pq``: product quantization (optionally with an OPQ rotation), searched in this process by faiss's
asymmetric distance over codes stored with each vector. Codes at 8 bits and ``dim/4`` sub-quantizers
are 1/16 of the float32 vector."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from imgdb.ann.codes import FaissMethod
from imgdb.ann.spec import AnnSpec

if TYPE_CHECKING:
    import faiss


class ProductQuantization(FaissMethod):
    name = "pq"
    summary = "product-quantization codes searched in imgdb; m=0: dim/4 sub-quantizers; opq=1 learns a rotation"
    defaults = {"m": 0, "nbits": 8, "opq": 0}
    ranks_by_pq = True

    def check(self, params: Mapping[str, int], dim: int | None, storage: str | None) -> None:
        self.require(1 <= params["nbits"] <= 16, f"{self.name}: nbits must be between 1 and 16")
        self.require(params["opq"] in (0, 1), f"{self.name}: opq is 0 or 1")
        if dim is not None:
            m = self.subquantizers(params, dim)
            self.require(m <= dim and dim % m == 0, f"{self.name}: m={m} does not divide the dimension {dim}")

    @staticmethod
    def subquantizers(params: Mapping[str, int], dim: int) -> int:
        """``m``, or dim/4 (the nearest divisor below) where it is 0."""
        return params["m"] or next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)

    def factory(self, ann: AnnSpec, dim: int, rows: int) -> str:
        """faiss's factory string of the codes, with OPQ's rotation where it is asked and possible."""
        m = self.subquantizers(ann.params, dim)
        # k-means needs at least as many points as centroids: fewer bits on small collections.
        nbits = min(ann.params["nbits"], int(math.log2(max(rows, 2))))
        # "np": no polysemous training, which the factory turns on by default and which makes
        # training ten times slower for codes imgdb never ranks by Hamming distance.
        return f"PQ{m}x{nbits}np"

    def untrained(self, ann: AnnSpec, dim: int, rows: int) -> faiss.Index:
        import faiss

        # faiss's OPQ training crashes on fewer vectors than dimensions: plain PQ until a rebuild.
        rotate = ann.params["opq"] and rows >= dim
        prefix = f"OPQ{self.subquantizers(ann.params, dim)}," if rotate else ""
        return faiss.index_factory(dim, prefix + self.factory(ann, dim, rows))
