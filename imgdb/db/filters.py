"""``--filter`` expressions on image columns and JSONB metadata, compiled to bound SQL.

Grammar: ``FIELD OP VALUE`` with OP one of ``= != < <= > >=``. FIELD is an ``images`` column
(``width``, ``camera``, ``taken_at``...) or ``meta.KEY`` for a key of the user metadata. The value is
everything after the operator, taken literally (quotes and semicolons included): it only ever
reaches PostgreSQL as a bound parameter, never as SQL text.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import re
from decimal import Decimal
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from imgdb.db.values import check_text, printable
from imgdb.errors import FilterError
from imgdb.db.models import Image

#: Most filters one search takes, and their total length.
MAX_FILTERS = 64
MAX_FILTER_CHARS = 16 * 1024
_EXPR = re.compile(r"^\s*((?i:meta)\.[^=<>!]+?|[A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|!=|=|<|>)\s*(.*?)\s*$", re.DOTALL)

_COLUMNS: dict[str, type] = {
    "id": int, "uri": str, "sha256": str, "width": int, "height": int, "format": str,
    "file_size": int, "taken_at": dt.datetime, "camera": str, "added_at": dt.datetime,
}
#: The range of each integer column's SQL type (a value outside can match nothing, or everything,
#: and PostgreSQL would refuse the statement rather than say so).
_INT_RANGE = {"width": 2**31 - 1, "height": 2**31 - 1, "id": 2**63 - 1, "file_size": 2**63 - 1}


def _typed(field: str, kind: type, raw: str) -> Any:
    try:
        if kind is int:
            value = int(raw)
            if abs(value) > _INT_RANGE[field]:
                raise FilterError(f"filter on {field}: {raw[:40]} is out of range (at most {_INT_RANGE[field]:,})")
            return value
        if kind is dt.datetime:
            return dt.datetime.fromisoformat(raw)
        return raw
    except ValueError:
        raise FilterError(f"filter on {field}: {raw!r} is not a valid {kind.__name__}") from None


def _compare(lhs: ColumnElement[Any], op: str, rhs: Any) -> ColumnElement[bool]:
    return {
        "=": lhs == rhs, "!=": lhs != rhs, "<": lhs < rhs, "<=": lhs <= rhs, ">": lhs > rhs, ">=": lhs >= rhs,
    }[op]


def _json_scalar(raw: str) -> Any:
    """The JSON number/boolean a value spells, if any (``1900``, ``2.5``, ``true``), else None.
    NaN and Infinity are not JSON (Python's parser takes them, jsonb does not)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float, bool)) else None


def _meta_clause(key: str, op: str, raw: str) -> ColumnElement[bool]:
    meta = Image.metadata_
    if op in ("=", "!="):
        # Containment can use the GIN index; match the value as a string and as the JSON scalar it
        # spells, since metadata files store years and counts either way.
        options = [meta.contains({key: raw})]
        scalar = _json_scalar(raw)
        if scalar is not None:
            options.append(meta.contains({key: scalar}))
        match = sa.or_(*options)
        return match if op == "=" else sa.not_(match)
    number = _json_scalar(raw)
    if isinstance(number, (int, float)) and not isinstance(number, bool):
        # Compare numerically only where the stored value is a JSON number; the CASE keeps a text
        # value elsewhere from aborting the whole query with a cast error.
        as_number = sa.case(
            (sa.func.jsonb_typeof(meta[key]) == "number", meta[key].astext.cast(sa.Numeric)), else_=None
        )
        # As numeric, whatever its size: an integer past bigint must not be sent as one.
        return _compare(as_number, op, sa.literal(Decimal(raw.strip()), sa.Numeric()))
    return _compare(meta[key].astext, op, raw)


def parse_filter(expr: str) -> ColumnElement[bool]:
    """Compile one filter expression to a SQLAlchemy clause on :class:`~imgdb.orm.Image`."""
    check_text(expr, f"filter {printable(expr)[:100]!r}")
    match = _EXPR.match(expr)
    if not match:
        raise FilterError(f"cannot parse filter {expr!r}: expected FIELD OP VALUE with OP one of = != < <= > >=")
    field, op, raw = match.groups()
    if field.lower().startswith("meta."):
        key = field[len("meta."):].strip()
        if not key:
            raise FilterError(f"filter {expr!r}: empty metadata key")
        return _meta_clause(key, op, raw)
    kind = _COLUMNS.get(field.lower())
    if kind is None:
        raise FilterError(
            f"unknown filter field {field!r}: use meta.KEY or one of {', '.join(_COLUMNS)}"
        )
    column = getattr(Image, field.lower())
    return _compare(column, op, _typed(field.lower(), kind, raw))


def parse_filters(exprs: Iterable[str]) -> list[ColumnElement[bool]]:
    """Compile a search's filters, refused past :data:`MAX_FILTERS` of them or :data:`MAX_FILTER_CHARS`
    in all: each is a clause PostgreSQL plans and tests on every candidate, and a request must not
    buy seconds of server time with thousands of them."""
    found = list(itertools.islice(exprs, MAX_FILTERS + 1))
    if len(found) > MAX_FILTERS:
        raise FilterError(f"more than {MAX_FILTERS} filters: a search takes at most {MAX_FILTERS}")
    if sum(len(e) for e in found if isinstance(e, str)) > MAX_FILTER_CHARS:
        raise FilterError(f"the filters are longer than {MAX_FILTER_CHARS:,} characters in all")
    return [parse_filter(e) for e in found]
