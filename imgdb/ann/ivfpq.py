"""``ivfpq``: inverted lists over product-quantization codes (faiss's IVF-PQ): a query ranks the codes
of ``probes`` lists only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from imgdb.ann.pq import ProductQuantization
from imgdb.ann.spec import AnnSpec

if TYPE_CHECKING:
    import faiss


class InvertedProductQuantization(ProductQuantization):
    name = "ivfpq"
    summary = "inverted lists of PQ codes searched in imgdb; lists=0: 4*sqrt(training rows)"
    defaults = {"lists": 0, "probes": 32, "m": 0, "nbits": 8, "opq": 0}

    def check(self, params: Mapping[str, int], dim: int | None, storage: str | None) -> None:
        super().check(params, dim, storage)
        self.require(params["probes"] >= 1, f"{self.name}: probes must be at least 1")

    def factory(self, ann: AnnSpec, dim: int, rows: int) -> str:
        # From the training sample (at most max_sample rows, so at most 2048 lists): k-means gets
        # 128+ points per list.
        lists = ann.params["lists"] or max(1, min(int(4 * math.sqrt(rows)), rows // 8))
        return f"IVF{lists},{super().factory(ann, dim, rows)}"

    def searching(self, index: faiss.Index, ann: AnnSpec) -> None:
        import faiss

        faiss.extract_index_ivf(index).nprobe = ann.params["probes"]
