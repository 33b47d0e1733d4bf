"""``bq``: binary quantization, an HNSW graph over the sign bits of each vector minus the collection's
mean, ranked by Hamming distance and re-ranked by the full vectors in the same statement.

pgvector's ``binary_quantize`` keeps the sign of each value. Descriptors that are never negative
(SIFT, un-whitened CNN activations: most of what imgdb stores) would quantize to nearly constant
bits, so the method quantizes the vector minus the collection's mean instead: every bit then splits
the collection roughly in half. The mean is learned from the data: once the index holds vectors
(never from an empty table, whose "mean" of zeros left every bit of a GeM descriptor set), and again
at ``imgdb index rebuild``. Until then there is no graph and queries are exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from imgdb.ann.hnsw import Hnsw
from imgdb.ann.method import Structure
from imgdb.ann.pgvector import INDEXED_DIM_LIMIT
from imgdb.ann.spec import AnnSpec
from imgdb.db.records import IndexRecord
from imgdb.db.search import sign_bits

#: Key of the learned centre in the index layer's state.
CENTER = "center"


class BinaryQuantization(Hnsw):
    name = "bq"
    summary = "HNSW over the centred sign bits, re-ranked by the full vectors"
    # A Hamming ranking is coarse: a wide candidate pool for the re-rank.
    defaults = {"m": 16, "ef_construction": 64, "ef_search": 200}
    approximate = True
    hamming = True
    learns = True
    query_state = (CENTER,)

    def max_dim(self, storage: str) -> int | None:
        return INDEXED_DIM_LIMIT["bit"]

    def learn(self, ann: AnnSpec, dim: int, sample: np.ndarray) -> dict[str, np.ndarray]:
        return {CENTER: sample.astype(np.float64).mean(axis=0).astype(np.float32)}

    def structure(self, index: IndexRecord, rows: int, state: Mapping[str, np.ndarray]) -> Structure | None:
        if CENTER not in state:
            return None
        return self.graph(index, rows, f"({sign_bits(index, state[CENTER])}) bit_hamming_ops")
