"""imgdb: content-based image retrieval inside PostgreSQL + pgvector.

Search images with an image; similarity is plain SQL (``ORDER BY embedding <-> :q``) next to your
own tables. Start with :func:`connect`.

This package's names are imgdb's public API, the one its own faces (the CLI, the web app) use too:
the handle and its results, the errors, the settings, what the registries offer (extractors, ANN
methods, re-rankers) and the operator's database commands. Each name is imported from its module
when first used, so that ``from imgdb import ImgdbError`` costs a command nothing it does not use
(``imgdb --help`` loads no database driver, ``TrainOptions`` alone loads torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgdb.admin import database_status, database_url, stop_embedded, upgrade_database
    from imgdb.catalog import DEFAULT_INDEX
    from imgdb.client import Imgdb, connect
    from imgdb.config import Settings
    from imgdb.db.records import MAX_ID, IndexRecord
    from imgdb.db.search import Hit
    from imgdb.db.values import check_metadata
    from imgdb.db.values import loads as parse_json
    from imgdb.errors import (ConcurrentChange, DatabaseError, ExtractorSpecError, FetchError, FilterError, ImageNotFound,
                              ImageReadError, ImgdbError, IndexExists, IndexNotFound, driver_failure)
    from imgdb.features.registry import DEFAULT_SPEC as DEFAULT_EXTRACTOR
    from imgdb.io.fetch import is_url
    from imgdb.io.reader import return_memory
    from imgdb.io.sources import is_remote
    from imgdb.jobs.on_ray import RayOptions
    from imgdb.jobs.search import MAX_CANDIDATES, MAX_K
    from imgdb.training.trainer import TrainOptions

__version__ = "0.1.0"

#: Each public name: the module it lives in, and its name there.
_NAMES: dict[str, tuple[str, str]] = {
    **{name: ("imgdb.client", name) for name in ("Imgdb", "connect")},
    **{name: ("imgdb.errors", name) for name in (
        "ConcurrentChange", "DatabaseError", "ExtractorSpecError", "FetchError", "FilterError", "ImageNotFound",
        "ImageReadError", "ImgdbError", "IndexExists", "IndexNotFound", "driver_failure")},
    **{name: ("imgdb.admin", name) for name in ("database_status", "database_url", "stop_embedded", "upgrade_database")},
    "DEFAULT_INDEX": ("imgdb.catalog", "DEFAULT_INDEX"),
    "DEFAULT_EXTRACTOR": ("imgdb.features.registry", "DEFAULT_SPEC"),
    "Settings": ("imgdb.config", "Settings"),
    "MAX_ID": ("imgdb.db.records", "MAX_ID"),
    "IndexRecord": ("imgdb.db.records", "IndexRecord"),
    "Hit": ("imgdb.db.search", "Hit"),
    "check_metadata": ("imgdb.db.values", "check_metadata"),
    "parse_json": ("imgdb.db.values", "loads"),
    "is_url": ("imgdb.io.fetch", "is_url"),
    "return_memory": ("imgdb.io.reader", "return_memory"),
    "is_remote": ("imgdb.io.sources", "is_remote"),
    "MAX_K": ("imgdb.jobs.search", "MAX_K"),
    "MAX_CANDIDATES": ("imgdb.jobs.search", "MAX_CANDIDATES"),
    "TrainOptions": ("imgdb.training.trainer", "TrainOptions"),
    "RayOptions": ("imgdb.jobs.on_ray", "RayOptions"),
}
__all__ = [
    "DEFAULT_EXTRACTOR", "DEFAULT_INDEX", "MAX_CANDIDATES", "MAX_ID", "MAX_K", "ConcurrentChange", "DatabaseError", "ExtractorSpecError",
    "FetchError", "FilterError", "Hit", "ImageNotFound", "ImageReadError", "Imgdb", "ImgdbError", "IndexExists",
    "IndexNotFound", "IndexRecord", "RayOptions", "Settings", "TrainOptions", "__version__", "ann_help", "check_metadata", "connect",
    "database_status", "database_url", "driver_failure", "extractors", "is_remote", "is_url", "parse_json", "rerank_help",
    "return_memory", "stop_embedded", "upgrade_database",
]


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'imgdb' has no attribute {name!r}")
    module, attribute = _NAMES[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # (the next use is a plain look-up)
    return value


def extractors() -> list[tuple[str, str, str]]:
    """``(family, default spec, description)`` for every extractor variant (``imgdb extractors``)."""
    from imgdb.features.registry import list_extractors

    return list_extractors()


def ann_help() -> str:
    """What an ANN spec (``--ann``) can name: every registered method, its summary and defaults."""
    from imgdb.ann.registry import help_text

    return help_text()


def rerank_help() -> str:
    """What ``--rerank`` can name: every registered re-ranker and what it does."""
    from imgdb.query.registry import help_text

    return help_text()
