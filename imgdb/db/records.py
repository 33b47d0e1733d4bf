"""imgdb's registry rows as plain values: what a query needs to know of an index and its attached
tables, and the rules that name what belongs to them.

Free of SQLAlchemy on purpose. A process that only searches (a cold ``imgdb search``, a web worker
answering its first query) reads these over a plain psycopg connection (:mod:`imgdb.db.search`)
and never pays the half second that importing SQLAlchemy's ORM takes; the ORM models
(:mod:`imgdb.orm`) share the same naming rules, and writers (:mod:`imgdb.db.store`) the same checks.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imgdb.db.values import printable
from imgdb.errors import ImgdbError

#: Index names: lower-case identifiers, short enough for every object named after them.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
#: Largest image id (``bigint``); a longer ``id:N`` names no image.
MAX_ID = 2**63 - 1
#: First stages that are a pgvector index on the vectors table (the index's ``ann`` column names
#: the method, ``ann_params`` its parameters, spelled out when the index was created).
PGVECTOR_METHODS = ("hnsw", "ivfflat", "bq")
#: Prefix of the per-index view users query. No other relation of the schema starts with it.
VIEW_PREFIX = "images_"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ImgdbError(f"bad index name {printable(name)[:60]!r}: use lower-case letters, digits and _, "
                         "starting with a letter (at most 40)")
    return name


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
    def ann_index(self) -> str:
        """The pgvector HNSW/IVFFlat index on :attr:`vectors_table`, when the method has one."""
        return f"{self.vectors_table}_ann"


@dataclass(frozen=True)
class IndexRecord(IndexNames):
    """One row of ``indexes`` as a query read it (the columns of :class:`imgdb.orm.SearchIndex`)."""

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
