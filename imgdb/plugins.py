"""Parts found by name: built-ins plus any a package registers under one of imgdb's entry-point
groups (``name = "module:Class"``), imported only when used, so that a new part is one new module
and no edit to the code that uses it.

The groups: ``imgdb.extractors`` (by extractor family), ``imgdb.ann_methods`` (by ANN method) and
``imgdb.rerankers`` (by re-rank name).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import cache
from importlib.metadata import entry_points
from typing import Any

GROUPS = ("imgdb.extractors", "imgdb.ann_methods", "imgdb.rerankers")


def named(group: str, builtin: Mapping[str, str]) -> dict[str, str]:
    """Every known name of ``group`` mapped to its ``module:Class`` (built-ins win a clash)."""
    return {**_registered().get(group, {}), **builtin}


@cache
def _registered() -> dict[str, dict[str, str]]:
    """The entry points of every imgdb group, read once per process in one pass: scanning the
    installed packages' metadata takes milliseconds, more than a whole HNSW query."""
    every = entry_points()
    return {group: {ep.name: ep.value for ep in every.select(group=group)} for group in GROUPS}


def load(target: str) -> Any:
    """The object a ``module:Class`` string names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
