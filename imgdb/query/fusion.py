"""Fusion of one query's rankings from several indexes of the same images (``--index a,b``).

No single descriptor wins everywhere (on museum photos RootSIFT-VLAD beats every CNN; on copies
with colour changes the CNN wins), and the images table is shared, so the same image has the same
id in every index. Two ways to combine:

* ``rrf``, reciprocal-rank fusion (Cormack et al. 2009): score ``Σ 1 / (RRF_K + rank)``; ranks only,
  so indexes whose distances live on different scales combine without calibration. Reported as a
  distance: ``1 - score / best possible score`` (0: first everywhere);
* ``mean``: each index's distances min-max normalised over its own list (0 its best, 1 its worst,
  1 where an image is missing), averaged.

After ``verify``, hits verified in any index come first. Each fused hit notes its rank per index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from imgdb.db.search import Hit
from imgdb.errors import ImgdbError

FUSIONS = ("rrf", "mean")
#: RRF's constant: damps the weight of the very first ranks (the paper's 60).
RRF_K = 60
#: Results taken from each index before fusing.
DEPTH = 100
#: Most indexes one query fuses.
MAX_INDEXES = 8


def check(method: str, names: Sequence[str]) -> None:
    if method not in FUSIONS:
        raise ImgdbError(f"unknown fusion {method[:20]!r}: use {' or '.join(FUSIONS)}")
    if len(names) > MAX_INDEXES:
        raise ImgdbError(f"at most {MAX_INDEXES} indexes in one search, not {len(names)}")
    if len(set(names)) != len(names):
        raise ImgdbError("an index is named twice in --index")


def fuse(rankings: dict[str, list[Hit]], k: int, method: str = "rrf") -> list[Hit]:
    """The best ``k`` of ``rankings`` (index name → its hits, best first), fused."""
    first: dict[int, Hit] = {}
    ranks: dict[int, dict[str, int]] = {}
    scores: dict[int, float] = {}
    verified: set[int] = set()
    for name, hits in rankings.items():
        if method == "mean" and hits:
            low, high = hits[0].distance, max(h.distance for h in hits)
        for rank, hit in enumerate(hits, start=1):
            first.setdefault(hit.id, hit)
            ranks.setdefault(hit.id, {})[name] = rank
            if hit.notes.get("verified"):
                verified.add(hit.id)
            if method == "rrf":
                scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (RRF_K + rank)
            else:
                normalised = (hit.distance - low) / (high - low) if high > low else 0.0
                scores[hit.id] = scores.get(hit.id, 0.0) + normalised
    if method == "rrf":
        best = len(rankings) / (RRF_K + 1)
        distance = {i: 1.0 - s / best for i, s in scores.items()}
    else:  # a missing image counts as each index's worst
        distance = {i: (s + len(rankings) - len(ranks[i])) / len(rankings) for i, s in scores.items()}
    order = sorted(first, key=lambda i: (i not in verified, distance[i]))
    return [replace(first[i], distance=float(distance[i]),
                    notes={**first[i].notes, **({"verified": True} if i in verified else {}), "ranks": ranks[i]})
            for i in order[:k]]
