"""Modules imported on first use: what lets a process that only searches skip SQLAlchemy.

Importing SQLAlchemy's engine and ORM takes about half a second, as long as everything else a
cold ``imgdb search`` does. The search path itself speaks plain psycopg (:mod:`imgdb.db.search`),
so the modules that write through SQLAlchemy (:mod:`imgdb.db.indexes` and its neighbours) are bound
where they are used as stand-ins from :func:`module`, which import the real module at the first
attribute read and forward to it from then on. Static type checkers are shown the real modules
(imported under ``TYPE_CHECKING`` beside the stand-ins).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """A module's stand-in until first use. Thread-safe: importlib takes its per-module lock, and a
    thread that reads an attribute while another imports the module waits for the import to end."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.loaded(), attribute)

    def loaded(self) -> ModuleType:
        """The module itself, imported now if it was not yet (a dictionary look-up once it was)."""
        return importlib.import_module(self._name)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def module(name: str) -> Any:
    """A stand-in for module ``name`` (typed ``Any``: declare the real module under ``TYPE_CHECKING``)."""
    return LazyModule(name)
