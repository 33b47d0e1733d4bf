"""ANN methods by name: the built-ins plus any a package registers under the entry-point group
``imgdb.ann_methods`` (``name = "module:Class"``, :mod:`imgdb.plugins`). Parsing and checking a spec,
and the CLI's help and error messages, come from here, so a new method needs no other edit."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from imgdb import plugins
from imgdb.ann.method import AnnMethod
from imgdb.ann.spec import AnnSpec
from imgdb.errors import ImgdbError

GROUP = "imgdb.ann_methods"
BUILTIN: dict[str, str] = {
    "hnsw": "imgdb.ann.hnsw:Hnsw",
    "ivfflat": "imgdb.ann.ivfflat:IvfFlat",
    "bq": "imgdb.ann.bq:BinaryQuantization",
    "pq": "imgdb.ann.pq:ProductQuantization",
    "ivfpq": "imgdb.ann.ivfpq:InvertedProductQuantization",
    "lsh": "imgdb.ann.lsh:Lsh",
    "kdtree": "imgdb.ann.kdtree:KdTree",
    "none": "imgdb.ann.none:NoIndex",
}
#: What an index gets when created without ``--ann``, where its vectors fit it.
DEFAULT = "hnsw"
#: What it gets where they are longer than DEFAULT indexes (a whole VLAD or Fisher vector of 8,192
#: dimensions): codes of any length, searched in imgdb, the candidates re-ranked from the stored vectors.
DEFAULT_LONG = "ivfpq"
#: ... with at most this many sub-quantizers (PQ's own default, dim/4, is 2,048 for 8,192 dimensions:
#: learning from 4,096 such vectors took 177 s on this project's 2-core machine, 26 s at m=512 and
#: 5.7 s at m=256, codes of 256 bytes; 40 s from 16,384 vectors, 244 s from 65,536, the most a
#: method learns from at that length: AnnMethod.sample_rows).
LONG_SUBQUANTIZERS = 256
#: Namespace of the index layer's arrays in ``index_state`` (the extractor's keys have no dot).
STATE_OWNER = "ann."


def names() -> list[str]:
    """Every method's name, built-ins first."""
    return list(dict.fromkeys([*BUILTIN, *plugins.named(GROUP, BUILTIN)]))


def method(name: str) -> AnnMethod:
    """The method called ``name``; a one-line error naming the known ones for any other."""
    target = plugins.named(GROUP, BUILTIN).get(name)
    if target is None:
        raise ImgdbError(f"unknown ANN method {name[:40]!r}: use one of {', '.join(names())}")
    return _instance(target)


@functools.cache
def _instance(target: str) -> AnnMethod:
    cls = plugins.load(target)
    if not (isinstance(cls, type) and issubclass(cls, AnnMethod)):
        raise ImgdbError(f"{target} is registered as an ANN method but is not one")
    return cls()


def parse_ann(text: str, stored: Mapping[str, Any] | None = None) -> AnnSpec:
    """Parse ``METHOD[/KEY=VALUE]...``; ``stored`` parameters (from the registry) fill the rest."""
    head, *parts = [p.strip() for p in text.strip().split("/")]
    found = method(head.lower())
    params = dict(found.defaults)
    for key, value in (stored or {}).items():
        if key in params:
            params[key] = int(value)
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or key not in params:
            options = ", ".join(f"{k}=" for k in params) or "none"
            raise ImgdbError(f"ANN method {found.name}: bad option {part[:40]!r} (options: {options})")
        try:
            params[key] = int(value)
        except ValueError:
            raise ImgdbError(f"ANN method {found.name}: {key} must be an integer, not {value[:20]!r}") from None
        if params[key] < 0:
            raise ImgdbError(f"ANN method {found.name}: {key} must not be negative")
    found.check(params, None, None)
    return AnnSpec(found.name, params)


def check(ann: AnnSpec, dim: int, storage: str) -> None:
    """Refuse a first stage the vectors' dimension and storage cannot have, saying what can."""
    found = method(ann.method)
    found.check(ann.params, dim, storage)
    limit = found.max_dim(storage)
    if limit is None or dim <= limit:
        return
    fitting = [name for name in names() if name != ann.method and _fits(method(name), dim, storage)]
    hint = "--storage halfvec, " if storage == "vector" and _fits(found, dim, "halfvec") else ""
    raise ImgdbError(f"{ann.method} indexes {storage} columns of at most {limit} dimensions, these vectors have "
                     f"{dim}: use {hint}--ann {', '.join(fitting)}")


def default_for(dim: int, storage: str) -> str:
    """The first stage an index of ``dim`` dimensions in ``storage`` gets when none is asked."""
    if _fits(method(DEFAULT), dim, storage):
        return DEFAULT
    m = next(m for m in range(min(LONG_SUBQUANTIZERS, dim), 0, -1) if dim % m == 0)
    return f"{DEFAULT_LONG}/m={m}"


def _fits(candidate: AnnMethod, dim: int, storage: str) -> bool:
    limit = candidate.max_dim(storage)
    return limit is None or dim <= limit


def help_text() -> str:
    """What ``--ann`` takes, for the CLI's help: every method with its summary and defaults."""
    return ("First stage: " + "; ".join(method(name).help() for name in names())
            + ". Options override defaults, e.g. hnsw/m=32/ef_search=80.")


def query_state_keys() -> tuple[str, ...]:
    """The learned-state keys that some method's SQL reads with every query, in the index layer's
    namespace (read with the registry row: :func:`imgdb.db.search.lookup`)."""
    return tuple(sorted({STATE_OWNER + key for name in names() for key in method(name).query_state}))
