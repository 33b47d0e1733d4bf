"""Re-rankers by name: built-ins plus entry points of the group ``imgdb.rerankers``
(:mod:`imgdb.plugins`). First stages come with their ANN method (:mod:`imgdb.ann.registry`)."""

from __future__ import annotations

import functools

from imgdb import plugins
from imgdb.errors import ImgdbError
from imgdb.query.parts import Reranker

GROUP = "imgdb.rerankers"
BUILTIN: dict[str, str] = {
    "exact": "imgdb.query.rerankers:Exact",
    "none": "imgdb.query.rerankers:KeepOrder",
    "pq": "imgdb.query.rerankers:PqOrder",
    "verify": "imgdb.query.verify:Verify",
    "multi": "imgdb.query.verify:MultiVerify",
    "qe": "imgdb.query.expansion:AverageExpansion",
    "aqe": "imgdb.query.expansion:AlphaExpansion",
    "dba": "imgdb.query.expansion:DatabaseAugmentation",
}
#: Longest chain of re-rankers a query may ask for.
MAX_CHAIN = 8


def rerankers(text: str) -> list[Reranker]:
    """The chain a ``--rerank`` value names: comma-separated re-rankers, such as ``exact``,
    ``pq`` or ``exact,verify``."""
    return list(_chain(str(text), tuple(plugins.named(GROUP, BUILTIN).items())))


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
    chain = [_class(known[name]) for name in names]
    if not chain[0].starts_chain:
        chain.insert(0, _class(known["exact"]))
    for part in chain[1:]:
        if part.starts_chain:
            raise ImgdbError(f"re-rank {part.name!r} orders the first stage's candidates: it can only come first")
    return tuple(part() for part in chain)


def _class(target: str) -> type[Reranker]:
    cls = plugins.load(target)
    if not (isinstance(cls, type) and issubclass(cls, Reranker)):
        raise ImgdbError(f"{target} is registered as a re-ranker but is not one")
    return cls


def help_text() -> str:
    """What ``--rerank`` takes, for the CLI's help."""
    known = plugins.named(GROUP, BUILTIN)
    return ("; ".join(f"{name}: {_class(target).summary}" for name, target in known.items())
            + ". A chain such as exact,verify runs them in turn.")
