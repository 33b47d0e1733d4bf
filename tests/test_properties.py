"""Properties for any input hypothesis can make up, against the real PostgreSQL: a filter either
compiles to bound parameters that PostgreSQL runs, or is refused with a one-line reason; metadata
either round-trips through jsonb unchanged, or is refused with a one-line reason."""

from __future__ import annotations

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from imgdb.db.filters import parse_filter
from imgdb.db.search import compile_filters
from imgdb.db.values import UnstorableValue, check_metadata
from imgdb.errors import ImgdbError

#: Every character there is, NUL, controls and lone surrogates included.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
FIELDS = st.one_of(
    st.sampled_from(["id", "uri", "sha256", "width", "Height", "format", "file_size", "taken_at", "camera",
                     "added_at", "meta.author", "META.year"]),
    ANY_TEXT.map(lambda key: "meta." + key),
    ANY_TEXT,
)
VALUES = st.one_of(ANY_TEXT, st.integers().map(str), st.floats().map(str), st.just("2024-01-01"),
                   st.text("0123456789:-T .", max_size=30))
EXPRESSIONS = st.one_of(
    ANY_TEXT,
    st.builds(lambda field, op, value: f"{field}{op}{value}", FIELDS,
              st.sampled_from(["=", "!=", "<", "<=", ">", ">=", "=="]), VALUES),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4),
    max_leaves=25,
)
PROPERTIES = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(exc: Exception) -> bool:
    return bool(str(exc)) and "\n" not in str(exc)


def same(a: object, b: object) -> bool:
    """JSON equality as jsonb keeps it: numbers are numbers (an integral float comes back an int,
    equal as a double), everything else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@PROPERTIES
@given(EXPRESSIONS)
def test_any_filter_runs_in_postgres_with_bound_values_or_is_refused(client, expr: str) -> None:  # noqa: ANN001
    try:
        clause = parse_filter(expr)
    except ImgdbError as exc:
        assert one_line(exc), exc
        return
    sql, params = compile_filters([clause])
    assert "%(" in sql or not params  # values go as parameters
    with psycopg.connect(client.database.url, options="-c search_path=imgdb,public") as conn:
        conn.execute(f"SELECT count(*) FROM images WHERE {sql}", params).fetchone()


@PROPERTIES
@given(JSON)
def test_any_metadata_round_trips_through_jsonb_or_is_refused(client, value: object) -> None:  # noqa: ANN001
    document = {"key": value}
    try:
        check_metadata(document)
    except UnstorableValue as exc:
        assert one_line(exc), exc
        return
    with psycopg.connect(client.database.url) as conn:
        back = conn.execute("SELECT %s::jsonb", (Jsonb(document),)).fetchone()[0]
    assert same(back, document), (back, document)
