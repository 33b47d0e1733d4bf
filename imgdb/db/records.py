"""imgdb's registry rows as plain values: what a query needs to know of an index and its attached
tables, and the rules that name what belongs to them.

Free of SQLAlchemy on purpose. A process that only searches (a cold ``imgdb search``, a web worker
answering its first query) reads these over a plain psycopg connection (:mod:`imgdb.db.search`)
and never pays the half second that importing SQLAlchemy's ORM takes; the ORM models
(:mod:`imgdb.db.models`) share the same naming rules, and writers (:mod:`imgdb.db.indexes`) the
same checks.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imgdb.db.schema import quote
from imgdb.db.values import printable
from imgdb.errors import ImgdbError

#: Index names: lower-case identifiers, short enough for every object named after them.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
#: Largest image id (``bigint``); a longer ``id:N`` names no image.
MAX_ID = 2**63 - 1
#: Prefix of the per-index view users query. No other relation of the schema starts with it.
VIEW_PREFIX = "images_"
#: Prefix of the per-index view of its duplicates.
DUPLICATES_PREFIX = "duplicates_"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ImgdbError(f"bad index name {printable(name)[:60]!r}: use lower-case letters, digits and _, "
                         "starting with a letter (at most 40)")
    return name


#: How an index stores its vectors: float32, or float16 (half the bytes, indexable to 4000 dimensions).
STORAGES = ("vector", "halfvec")


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise ImgdbError(f"unknown storage {printable(storage)[:20]!r}: use {' or '.join(STORAGES)}")
    return storage


def view_name(index_name: str) -> str:
    """The view plain SQL queries for index ``index_name``."""
    return VIEW_PREFIX + index_name


class IndexNames:
    """The relations of one index. Objects made per index are named by its id, so that no index name
    can make two of them collide (``a`` and ``a_ann``); only the view users query carries the name."""

    if TYPE_CHECKING:  # (declared by the classes that mix this in: an ORM model keeps its own columns)
        id: int
        name: str

    @property
    def vectors_table(self) -> str:
        """The table holding this index's vectors."""
        return f"vectors_{self.id}"

    @property
    def relation(self) -> str:
        """The view that plain SQL queries: every ``images`` column plus ``embedding``, ``ref``, ``source``."""
        return view_name(self.name)

    @property
    def duplicates_relation(self) -> str:
        """The view of its groups of duplicates (``imgdb duplicates``)."""
        return DUPLICATES_PREFIX + self.name

    @property
    def ann_index(self) -> str:
        """The pgvector HNSW/IVFFlat index on :attr:`vectors_table`, when the method has one."""
        return f"{self.vectors_table}_ann"


@dataclass(frozen=True)
class IndexRecord(IndexNames):
    """An index: its row of ``indexes`` (the columns of :class:`imgdb.db.models.SearchIndex`, which
    maps the same row for applications that speak the ORM), and what a query needs to know of it
    besides, read with the row in one round trip (:func:`imgdb.db.search.lookup`)."""

    id: int
    name: str
    extractor: str
    dim: int
    metric: str
    storage: str
    ann: str
    ann_params: dict[str, Any]
    local: str | None
    version: int
    created_at: dt.datetime
    #: Whether its pgvector index exists now (a bulk load drops it until the load ends; a method
    #: that learns from the data builds none before it has).
    has_ann: bool = False
    #: What its first stage learned that its SQL reads with every query, by key (binary
    #: quantization's centre: :attr:`imgdb.ann.method.AnnMethod.query_state`).
    ann_state: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    #: Its calibrated score's models, where it learned them (:mod:`imgdb.query.scores`).
    score_state: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    #: The application tables attached to it.
    sources: tuple[Source, ...] = ()
    #: Whether its vectors are sharded over a Citus cluster (``imgdb db distribute``): queries are
    #: then one distributed statement, their settings made in its transaction.
    distributed: bool = False
    #: How many vectors it holds, where they were counted (``index list``, create, rebuild).
    images: int | None = None

    def to_json(self) -> dict[str, Any]:
        """A row of ``imgdb index list --json``."""
        return {"name": self.name, "extractor": self.extractor, "dim": self.dim, "images": self.images,
                "ann": self.ann, "ann_params": dict(self.ann_params), "storage": self.storage, "local": self.local}


@dataclass(frozen=True)
class StoredNetwork:
    """A network's weights as imgdb stores them (a row of ``networks``), named by their sha256, and
    how they came to be: a fine-tuning (``imgdb train``) or a weights file given at index creation."""

    sha256: str
    backbone: str
    weights: bytes = field(repr=False)
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


#: Key types whose values are JSON integers, or other JSON numbers, in search hits; booleans are
#: booleans, and every other type a string.
_INTEGER_TYPES = ("smallint", "integer", "bigint")
_NUMBER_TYPES = ("numeric", "real", "double precision")


@dataclass(frozen=True)
class Source:
    """One attached table, as the sync worker and search hits need it."""

    id: int
    index_id: int
    index_name: str
    #: The table's name now (``regclass`` text: unqualified where the search path finds it).
    table: str
    column: str
    column_kind: str
    key: str
    key_type: str
    root: str | None
    #: The table's schema and name while it exists (:attr:`relation`).
    table_schema: str | None = None
    table_relname: str | None = None

    @property
    def relation(self) -> str:
        """The table as imgdb writes it into SQL: each part quoted (:func:`imgdb.db.schema.quote`),
        never the ``regclass`` text, whose quoting SQLAlchemy and psycopg would read into."""
        if self.table_schema is None or self.table_relname is None:
            raise ImgdbError(f"table {self.table} was dropped: detach it (imgdb detach {self.table})")
        return f"{quote(self.table_schema)}.{quote(self.table_relname)}"

    def ref_json(self, ref: str) -> Any:
        """A key in text form as the JSON value its SQL type is (a number stays a number)."""
        if self.key_type in _INTEGER_TYPES:
            return int(ref)
        if self.key_type in _NUMBER_TYPES or self.key_type.startswith("numeric("):
            return float(ref)
        if self.key_type == "boolean":
            return ref == "true"
        return ref


#: An attached table's name now: its ``regclass`` while it exists, the name it had otherwise.
TABLE_NAME = ("CASE WHEN EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = s.relid) THEN s.relid::regclass::text"
              " ELSE s.table_name END")
#: An attached table's schema and name while it exists (:attr:`Source.relation`), as two columns.
TABLE_PARTS = ("(SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = s.relid)"
               " AS table_schema, (SELECT c.relname FROM pg_class c WHERE c.oid = s.relid) AS table_relname")
