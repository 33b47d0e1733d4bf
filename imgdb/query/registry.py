"""First stages by ANN method and re-rankers by name: built-ins plus entry points of the groups
``imgdb.first_stages`` and ``imgdb.rerankers`` (:mod:`imgdb.plugins`)."""

from __future__ import annotations

import functools

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
    return _first_stage_class(ann.method)(ann)


@functools.lru_cache(maxsize=32)
def _first_stage_class(method: str) -> type[FirstStage]:
    target = plugins.named("imgdb.first_stages", FIRST_STAGES).get(method)
    if target is None:
        raise ImgdbError(f"no first stage serves ANN method {method!r}")
    return plugins.load(target)


def rerankers(text: str) -> list[Reranker]:
    """The chain a ``--rerank`` value names: comma-separated re-rankers, such as ``exact``,
    ``pq`` or ``exact,verify``."""
    return list(_chain(str(text), tuple(plugins.named("imgdb.rerankers", RERANKERS).items())))


@functools.lru_cache(maxsize=128)
def _chain(text: str, registered: tuple[tuple[str, str], ...]) -> tuple[Reranker, ...]:
    """Re-rankers hold no state of their own, so a chain is resolved once per spelling and set of
    registered re-rankers (every query of a process asks for the same few)."""
    known = dict(registered)
    names = [part.strip().lower() for part in text.split(",")]
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
    return tuple(plugins.load(known[name])() for name in names)
