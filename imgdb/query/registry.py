"""First stages by ANN method and re-rankers by name: built-ins plus entry points of the groups
``imgdb.first_stages`` and ``imgdb.rerankers`` (:mod:`imgdb.plugins`)."""

from __future__ import annotations

from imgdb import plugins
from imgdb.ann.spec import AnnSpec
from imgdb.errors import ImgdbError
from imgdb.query.parts import FirstStage, Reranker

FIRST_STAGES: dict[str, str] = {
    **dict.fromkeys(("hnsw", "ivfflat", "bq"), "imgdb.query.first_stages:Pgvector"),
    **dict.fromkeys(("pq", "ivfpq", "lsh", "kdtree"), "imgdb.query.first_stages:Codes"),
    "none": "imgdb.query.first_stages:Exact",
}
RERANKERS: dict[str, str] = {
    "exact": "imgdb.query.rerankers:Exact",
    "none": "imgdb.query.rerankers:KeepOrder",
    "pq": "imgdb.query.rerankers:PqOrder",
    "verify": "imgdb.query.verify:Verify",
    "multi": "imgdb.query.verify:MultiVerify",
    "qe": "imgdb.query.expansion:AverageExpansion",
    "aqe": "imgdb.query.expansion:AlphaExpansion",
    "dba": "imgdb.query.expansion:DatabaseAugmentation",
}
#: Re-rankers that decide which distances the first stage's candidates carry; a chain starts with
#: one (``exact`` unless it names another), the others refine what it gives.
BASES = ("exact", "none", "pq")
#: Longest chain of re-rankers a query may ask for.
MAX_CHAIN = 8


def first_stage(ann: AnnSpec) -> FirstStage:
    target = plugins.named("imgdb.first_stages", FIRST_STAGES).get(ann.method)
    if target is None:
        raise ImgdbError(f"no first stage serves ANN method {ann.method!r}")
    return plugins.load(target)(ann)


def rerankers(text: str) -> list[Reranker]:
    """The chain a ``--rerank`` value names: comma-separated re-rankers, such as ``exact``,
    ``pq`` or ``exact,verify``."""
    known = plugins.named("imgdb.rerankers", RERANKERS)
    names = [part.strip().lower() for part in str(text).split(",")]
    if len(names) > MAX_CHAIN:
        raise ImgdbError(f"at most {MAX_CHAIN} re-rankers in a chain, not {len(names)}")
    for name in names:
        if name not in known:
            raise ImgdbError(f"unknown re-rank {name[:40]!r}: use one of {', '.join(known)}")
    if names[0] not in BASES:
        names.insert(0, "exact")
    for name in names[1:]:
        if name in BASES:
            raise ImgdbError(f"re-rank {name!r} orders the first stage's candidates: it can only come first")
    return [plugins.load(known[name])() for name in names]
