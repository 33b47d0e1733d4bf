"""Properties for any input hypothesis can make up, against the real PostgreSQL: a filter either
compiles to bound parameters that PostgreSQL runs, or is refused with a one-line reason; metadata
either round-trips through jsonb unchanged, or is refused with a one-line reason."""

from __future__ import annotations

import psycopg
from hypothesis import HealthCheck, example, given, settings
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


#: A valid PostgreSQL identifier: any characters but NUL (and lone surrogates, which UTF-8 cannot
#: hold), at most 63 bytes (PostgreSQL's NAMEDATALEN), quoted or not.
IDENTIFIERS = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1,
                      max_size=63).filter(lambda name: len(name.encode()) <= 63)


def written(identifier: str) -> str:
    """An identifier as an application writes it in SQL or in `imgdb attach SCHEMA.TABLE`."""
    return '"' + identifier.replace('"', '""') + '"'


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(IDENTIFIERS, min_size=4, max_size=4, unique=True))
@example(["a%sb", "ph :i", "p$fn$x", 'k"; --'])  # (the names an attack broke attach and the trigger with)
def test_tables_and_columns_of_any_name_attach_sync_search_and_detach(client, museum, names: list[str]) -> None:  # noqa: ANN001
    """Identifiers are data: a table, its schema, image column and key of any valid name (``:i``,
    ``%s``, ``$fn$``, quotes, emoji...) are followed, embedded, found and let go of."""
    from psycopg import sql

    schema, table, column, key = names
    photos = [str(p) for p in sorted((museum / "images").glob("*.jpg"))[:3]]
    if "props" not in {i.name for i in client.indexes()}:
        client.create_index("props", "color:hsv", ann="none")
    where = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
    with psycopg.connect(client.database.url, autocommit=True) as app:
        app.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            app.execute(sql.SQL("CREATE TABLE {} ({} int PRIMARY KEY, {} text)").format(
                where, sql.Identifier(key), sql.Identifier(column)))
            app.execute(sql.SQL("INSERT INTO {} VALUES (1, {}), (2, {})").format(
                where, sql.Literal(photos[0]), sql.Literal(photos[1])))
            attached = client.attach(f"{written(schema)}.{written(table)}", column, key=key, index="props")
            assert attached.queued == 2
            assert client.sync("props").embedded == 2
            app.execute(sql.SQL("UPDATE {} SET {} = {} WHERE {} = 2").format(
                where, sql.Identifier(column), sql.Literal(photos[2]), sql.Identifier(key)))
            assert client.sync("props").embedded == 1
            hit = client.search(photos[2], index="props", k=1)[0]
            assert hit.distance < 1e-5 and [ref for _, ref in hit.refs] == [2]
            shown = client.sync_status("props")[0]["table"]
            assert client.detach(shown).removed == 2
        finally:
            app.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
