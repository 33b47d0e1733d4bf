"""Query expansion and database-side augmentation, as re-rankers over the candidates.

* ``qe`` (average query expansion, Chum et al. 2007): the query vector plus the vectors of its top
  ``TOP`` results, averaged and L2-normalised, ranks the candidates again;
* ``aqe`` (α-QE, Radenović et al. 2018): the same with each result weighted by its similarity to
  the query to the power ``ALPHA``, so that a doubtful result counts little;
* ``dba`` (database-side augmentation, Arandjelović & Zisserman 2012): each candidate's vector is
  replaced by the α-weighted mean of itself and its ``TOP`` nearest among the candidates, and the
  query ranks those; a candidate pulled towards its neighbours matches a query that looks like them.

After ``verify`` (``exact,verify,aqe``) only verified results expand the query, and none when none
verified (spatially verified expansion, which cannot drift to a wrong picture), and verified hits
stay first, in verification's order.
"""

from __future__ import annotations

import numpy as np

from imgdb.db import search as sql
from imgdb.query.parts import Probe, Ranking, Reranker

#: Results that expand the query (and neighbours that augment a candidate).
TOP = 3
#: α of α-QE and α-DBA (Radenović et al.'s value).
ALPHA = 3.0


def _normalised(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _rank(ranking: Ranking, vectors: np.ndarray, query: np.ndarray) -> Ranking:
    """The candidates re-ranked by their distance to ``query``, notes kept; after ``verify``,
    verified hits stay ahead, in the order verification gave them (geometry outranks any vector)."""
    distances = np.linalg.norm(vectors - query, axis=1).astype(np.float32)
    verified = np.array([bool(ranking.notes.get(i, {}).get("verified")) for i in ranking.ids.tolist()], bool)
    order = np.lexsort((distances, np.where(verified, np.arange(len(verified)), len(verified))))
    return Ranking(ranking.ids[order], distances[order], ranking.notes)


class AverageExpansion(Reranker):
    name = "qe"
    summary = "average query expansion with the top results"
    alpha = 0.0  # weights (similarity ** alpha): all ones

    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking:
        if not len(ranking.ids):
            return ranking
        vectors = sql.vectors_of(probe.conn, probe.index, ranking.ids)
        query = probe.vector.astype(np.float32)
        top = [i for i, image_id in enumerate(ranking.ids.tolist())
               if ranking.notes.get(image_id, {}).get("verified", True)][:TOP]  # (verified ones, after verify)
        if not top:
            return ranking
        weights = np.clip(vectors[top] @ query, 0.0, None) ** self.alpha if self.alpha else np.ones(len(top))
        expanded = _normalised(query + (weights[:, None] * vectors[top]).sum(axis=0))
        return _rank(ranking, vectors, expanded)


class AlphaExpansion(AverageExpansion):
    name = "aqe"
    summary = "query expansion weighted by similarity (alpha-QE)"
    alpha = ALPHA


class DatabaseAugmentation(Reranker):
    name = "dba"
    summary = "database-side augmentation of the candidates"

    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking:
        if len(ranking.ids) < 2:
            return ranking
        vectors = sql.vectors_of(probe.conn, probe.index, ranking.ids)
        similarity = vectors @ vectors.T
        neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, : TOP + 1]  # itself first
        weights = np.clip(np.take_along_axis(similarity, neighbours, axis=1), 0.0, None) ** ALPHA
        augmented = _normalised((weights[:, :, None] * vectors[neighbours]).sum(axis=1))
        return _rank(ranking, augmented, probe.vector.astype(np.float32))
