"""Parts found by name: built-ins plus any a package registers under an entry-point group
(``name = "module:Class"``), imported only when used, so that a new part is one new module and
no edit to the code that uses it."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any


def named(group: str, builtin: Mapping[str, str]) -> dict[str, str]:
    """Every known name of ``group`` mapped to its ``module:Class`` (built-ins win a clash)."""
    return {**_registered(group), **builtin}


@lru_cache(maxsize=None)
def _registered(group: str) -> dict[str, str]:
    """The entry points of ``group``, read once per process: scanning the installed packages'
    metadata takes milliseconds, more than a whole HNSW query."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def load(target: str) -> Any:
    """The object a ``module:Class`` string names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
