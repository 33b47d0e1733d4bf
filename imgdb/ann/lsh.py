"""``lsh``: random-hyperplane locality-sensitive hashing, ranked by Hamming distance in this process.
``bits=0``: 4·dim hyperplanes, 1/8 of the float32 vector."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgdb.ann.codes import FaissMethod
from imgdb.ann.spec import AnnSpec

if TYPE_CHECKING:
    import faiss


class Lsh(FaissMethod):
    name = "lsh"
    summary = "random-hyperplane bits ranked by Hamming distance in imgdb; bits=0: 4*dim"
    defaults = {"bits": 0}
    squared = False  # (Hamming bits)

    def untrained(self, ann: AnnSpec, dim: int, rows: int) -> faiss.Index:
        import faiss

        # Thresholds at the training medians: every bit splits the collection in half, which
        # uncentred data (SIFT, post-ReLU CNN activations) needs for its bits to carry information.
        return faiss.IndexLSH(dim, ann.params["bits"] or 4 * dim, True, True)
