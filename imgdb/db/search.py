"""The statements a query runs, on pooled autocommit psycopg connections.

Search is the latency-critical path, so it skips what the rest of imgdb happily pays for: no
SQLAlchemy execution layer, no transaction (autocommit: no BEGIN/COMMIT round trips), pgvector's
settings set once per connection and only when they change, and one statement per stage, which
psycopg prepares after a few runs. Filters are compiled from the same SQLAlchemy clauses as
everywhere else (:mod:`imgdb.db.filters`), then run here as plain SQL with bound parameters; a
query without filters never imports SQLAlchemy at all (nor does anything else here), so that a
process that only searches does not pay for loading it.
"""

from __future__ import annotations

import functools
import io
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pgvector
import psycopg
from pgvector import HalfVector
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from imgdb.db.records import TABLE_NAME, TABLE_PARTS, IndexRecord, Source
from imgdb.db.schema import SESSION_SETTINGS

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

_settings: weakref.WeakKeyDictionary[psycopg.Connection, dict[str, str]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Hit:
    """One search result; ``refs`` are the rows of attached tables that hold the image, as
    ``(table, key)``, the key JSON-typed as its column is; ``notes`` what re-rankers found out
    about it (``inliers``, ``verified``), reported beside the distance."""

    id: int
    uri: str
    distance: float
    metadata: dict[str, Any]
    refs: tuple[tuple[str, Any], ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        document = {"id": self.id, "uri": self.uri, "distance": self.distance, **self.notes, "metadata": self.metadata}
        if self.refs:
            # The first row (by table, then key) in CONVENTIONS' two keys; every row in `refs`.
            document |= {"table": self.refs[0][0], "ref": self.refs[0][1],
                         "refs": [{"table": table, "ref": ref} for table, ref in self.refs]}
        return document


def lookup(conn: psycopg.Connection, name: str, state_keys: Sequence[str] = (),
           distributed: bool = False) -> IndexRecord | None:
    """The index named ``name`` in one round trip: its row, whether its pgvector index exists, the
    learned arrays of ``state_keys`` (those its first stage's SQL reads: ``ann.center`` is
    ``ann_state["center"]``; its score models: ``score.distance`` is ``score_state["distance"]``), and
    its attached tables."""
    row = conn.cursor(row_factory=dict_row).execute(
        "SELECT *, to_regclass(format('%%I.vectors_%%s_ann', current_schema(), id)) IS NOT NULL AS has_ann,"
        " (SELECT array_agg(s.key ORDER BY s.key) FROM index_state s WHERE s.index_id = indexes.id"
        "   AND s.key = ANY(%(keys)s)) AS state_keys,"
        " (SELECT array_agg(s.value ORDER BY s.key) FROM index_state s WHERE s.index_id = indexes.id"
        "   AND s.key = ANY(%(keys)s)) AS state_values,"
        " (SELECT jsonb_agg(jsonb_build_object('id', s.id, 'index_id', s.index_id, 'index_name', indexes.name,"
        f"   'table', {TABLE_NAME}, 'column', s.column_name, 'column_kind', s.column_kind,"
        "   'key', s.key_column, 'key_type', s.key_type, 'root', s.root, 'table_schema', t.table_schema,"
        "   'table_relname', t.table_relname) ORDER BY s.id)"
        f"  FROM sources s, LATERAL (SELECT {TABLE_PARTS}) t WHERE s.index_id = indexes.id) AS sources"
        " FROM indexes WHERE name = %(name)s",
        {"keys": list(state_keys), "name": name},
    ).fetchone()
    if row is None:
        return None
    keys, values, sources = row.pop("state_keys") or [], row.pop("state_values") or [], row.pop("sources")
    state: dict[str, dict[str, np.ndarray]] = {}
    for key, value in zip(keys, values):
        owner, _, name = key.partition(".")
        state.setdefault(owner, {})[name] = np.load(io.BytesIO(value), allow_pickle=False)
    return IndexRecord(**row, ann_state=state.get("ann", {}), score_state=state.get("score", {}),
                       sources=tuple(Source(**s) for s in sources or ()), distributed=distributed)


#: What a hit reads of ``images``; its distance ``d`` follows, then :func:`_ref_column`.
HIT_COLUMNS = "images.id, images.uri, images.metadata"


def _ref_column(index: IndexRecord) -> str:
    """For an index with attached tables, the keys of the rows that hold each hit's image (a
    subquery on ``refs``'s image index per hit; nothing at all for other indexes)."""
    if not index.sources:
        return ""
    ids = ",".join(str(s.id) for s in index.sources)
    return (", (SELECT jsonb_agg(jsonb_build_array(r.source_id, r.ref) ORDER BY r.source_id, r.ref)"
            f" FROM refs r WHERE r.image_id = images.id AND r.source_id IN ({ids})) AS refs")


def _hit(index: IndexRecord, row: Sequence[Any], distance: float | None = None,
         notes: dict[str, Any] | None = None) -> Hit:
    refs: tuple[tuple[str, Any], ...] = ()
    if index.sources:
        by_id = {s.id: s for s in index.sources}
        refs = tuple((by_id[source_id].table, by_id[source_id].ref_json(ref))
                     for source_id, ref in (row[4] if len(row) > 4 else None) or ())
    return Hit(row[0], row[1], float(row[3] if distance is None else distance), row[2], refs, notes or {})


def version(conn: psycopg.Connection, index: IndexRecord) -> int:
    """The index's change counter now (Python-side searchers reload when it moved)."""
    row = conn.execute("SELECT version FROM indexes WHERE id = %s", (index.id,)).fetchone()
    return -1 if row is None else int(row[0])


def configure(conn: psycopg.Connection, wanted: dict[str, str]) -> None:
    """Bring the connection's pgvector settings to ``wanted``, in one round trip if any differ."""
    # Every imgdb connection starts with the iterative-scan settings (imgdb.db.schema).
    current = _settings.setdefault(conn, dict(SESSION_SETTINGS))
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    if changed:
        calls = ", ".join("set_config(%s, %s, false)" for _ in changed)
        conn.execute(f"SELECT {calls}", [x for kv in changed.items() for x in kv])
        current.update(changed)


_SETTING = re.compile(r"^[a-z_]+\.[a-z_]+$")


@contextmanager
def _settings_for(conn: psycopg.Connection, index: IndexRecord, wanted: Mapping[str, str] | None) -> Iterator[None]:
    """Run the statements inside with pgvector's settings ``wanted``. On one node they are the
    connection's (:func:`configure`). On a Citus cluster a session's settings never reach the
    connections the coordinator opens to the workers, where the index scans run, and a shard
    would scan with the default ``hnsw.ef_search``: recall silently lost. There they are ``SET
    LOCAL`` in a transaction around the statements, which Citus sends on to every worker
    (``citus.propagate_set_commands = local``, set on imgdb's connections)."""
    if not index.distributed:
        configure(conn, dict(wanted or {}))
        yield
        return
    with conn.transaction():
        for name, value in {**SESSION_SETTINGS, **(wanted or {})}.items():
            if not _SETTING.match(name):
                raise ValueError(f"not a setting name: {name!r}")
            conn.execute(f"SET LOCAL {name} = '{str(value).replace(chr(39), chr(39) * 2)}'")
        yield


@functools.cache
def _dialect() -> Any:
    from sqlalchemy.dialects import postgresql

    return postgresql.psycopg.dialect()


def compile_filters(clauses: Sequence[ColumnElement[bool]]) -> tuple[str, dict[str, Any]]:
    """``AND``-ed filter clauses as SQL on the ``images`` table, with their bound parameters."""
    if not clauses:
        return "TRUE", {}
    import sqlalchemy as sa  # (there are clauses: the filters module has loaded it already)

    compiled = sa.and_(*clauses).compile(dialect=_dialect(), compile_kwargs={"render_postcompile": True})
    # Values SQLAlchemy would serialise through the JSONB type (containment filters) go as Jsonb.
    params = {k: Jsonb(v) if isinstance(v, (dict, list)) else v for k, v in compiled.params.items()}
    return str(compiled), params


def _param(index: IndexRecord, vector: np.ndarray) -> Any:
    return HalfVector(vector) if index.storage == "halfvec" else np.asarray(vector, dtype=np.float32)


def _hits(index: IndexRecord, rows: Sequence[tuple[Any, ...]]) -> list[Hit]:
    # IVFFlat's relaxed order may return rows slightly out of order: callers get them sorted.
    return sorted((_hit(index, r) for r in rows), key=lambda h: h.distance)


def nearest(conn: psycopg.Connection, index: IndexRecord, vector: np.ndarray, k: int, candidates: int,
            filters: Sequence[ColumnElement[bool]] = (), *, settings: Mapping[str, str] | None = None,
            center: np.ndarray | None = None, exact: bool = False, rerank: bool = True) -> list[Hit]:
    """The ``k`` nearest images that pass ``filters``, pgvector serving the first stage, in one
    statement (the fast path of a query: first stage, exact re-rank and the ``images`` join).

    ``settings`` are the pgvector settings the first stage runs with (``hnsw.ef_search``…).
    HNSW/IVFFlat: the index returns ``candidates`` rows, the best ``k`` are kept. With a ``center``
    (binary quantization): ``candidates`` rows by Hamming distance of the sign bits around it,
    re-ranked by the full vectors in the same statement (``rerank=False`` keeps the Hamming order).
    ``exact`` hides the distance from the index (``+ 0``): an exact scan of what passes.
    """
    where, params = compile_filters(filters)
    params |= {"q": _param(index, vector)}
    k, n = int(k), max(int(candidates), int(k))
    refs = _ref_column(index)
    if center is not None and not exact:
        inner = _first_stage_sql(index, where, filters, n, center=center, exact=False, keep_vector=True)
        order = "c.embedding <-> %(q)s" if rerank else "c.d"
        sql = (f"SELECT {HIT_COLUMNS}, {order} AS d{refs} FROM ({inner}) c JOIN images ON images.id = c.image_id"
               f" ORDER BY d LIMIT {k}")
    elif filters or index.distributed:
        # (Sharded: one statement that each shard runs whole, its index scan joined with its own
        # image rows; a subquery with a LIMIT would be run first and its rows shipped back.)
        distance = _distance(exact)
        sql = (f'SELECT {HIT_COLUMNS}, {distance} AS d{refs} FROM "{index.vectors_table}" v'
               f" JOIN images ON images.id = v.image_id WHERE {where} ORDER BY {distance} LIMIT {k}")
    else:
        # The index scan alone, then ten primary-key look-ups: the planner never has to weigh
        # the join against the index order.
        inner = _first_stage_sql(index, where, filters, n, center=None, exact=exact)
        sql = (f"SELECT {HIT_COLUMNS}, c.d{refs} FROM ({inner}) c JOIN images ON images.id = c.image_id"
               f" ORDER BY c.d LIMIT {k}")
    with _settings_for(conn, index, settings):
        return _hits(index, conn.execute(sql, params, binary=True).fetchall())


def _distance(exact: bool) -> str:
    return "(v.embedding <-> %(q)s)" + (" + 0" if exact else "")


def _first_stage_sql(index: IndexRecord, where: str, filters: Sequence[ColumnElement[bool]], n: int, *,
                     center: np.ndarray | None, exact: bool, keep_vector: bool = False) -> str:
    """The ``n`` best rows of the vectors table as ``image_id, d`` (and ``embedding``).

    Limits are written into the statement rather than bound: psycopg prepares a statement after a
    few runs, and PostgreSQL's generic plan for a bound LIMIT ran the HNSW query about 15% slower
    than the same statement with the number in it (benchmarks/search_path.py). They are ints; a client
    that varies them makes more statements, of which psycopg keeps at most ``prepared_max`` (100)
    prepared per connection."""
    if center is not None and not exact:
        order = f"{sign_bits(index, center, 'v.embedding')} <~> {sign_bits(index, center, '%(q)s')}"
    else:
        order = _distance(exact)
    join = " JOIN images ON images.id = v.image_id" if filters else ""
    vector = ", v.embedding" if keep_vector else ""
    return (f'SELECT v.image_id, {order} AS d{vector} FROM "{index.vectors_table}" v{join}'
            f" WHERE {where} ORDER BY {order} LIMIT {int(n)}")


def first_stage(conn: psycopg.Connection, index: IndexRecord, vector: np.ndarray, n: int,
                filters: Sequence[ColumnElement[bool]] = (), *, settings: Mapping[str, str] | None = None,
                center: np.ndarray | None = None, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Ids and first-stage distances of the ``n`` best rows that pass ``filters``, best first (a
    pgvector index scan, or with ``exact`` a scan), for re-rankers to work on; no ``images`` join
    but the one filters need; a ``center``: by the Hamming distance of the sign bits around it."""
    where, params = compile_filters(filters)
    params |= {"q": _param(index, vector)}
    with _settings_for(conn, index, settings):
        rows = conn.execute(_first_stage_sql(index, where, filters, n, center=center, exact=exact), params,
                            binary=True).fetchall()
    return _columns(rows)


def exact_distances(conn: psycopg.Connection, index: IndexRecord, vector: np.ndarray,
                    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored vectors of ``ids`` ranked by their exact distance to ``vector`` (ids no longer
    in the index drop out)."""
    sql = (f'SELECT v.image_id, v.embedding <-> %(q)s AS d FROM "{index.vectors_table}" v'
           " WHERE v.image_id = ANY(%(ids)s) ORDER BY d")
    rows = conn.execute(sql, {"q": _param(index, vector), "ids": ids.tolist()}, binary=True).fetchall()
    return _columns(rows)


def stored_vectors(conn: psycopg.Connection, index: IndexRecord, ids: Sequence[int]) -> dict[int, np.ndarray]:
    """The stored vectors of those of ``ids`` the index holds, by id (binary: a search connection,
    which has pgvector's types registered)."""
    rows = conn.execute(f'SELECT image_id, embedding FROM "{index.vectors_table}" WHERE image_id = ANY(%s)',
                        (list(ids),), binary=True).fetchall()
    return {image_id: as_array(vector) for image_id, vector in rows}


def vectors_of(conn: psycopg.Connection, index: IndexRecord, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of ``ids``, float32, row for row (an id no longer in the index: zeros)."""
    found = stored_vectors(conn, index, ids.tolist())
    out = np.zeros((len(ids), index.dim), np.float32)
    for row, image_id in enumerate(ids.tolist()):
        if image_id in found:
            out[row] = found[image_id]
    return out


def state(conn: psycopg.Connection, index: IndexRecord, owner: str = "") -> dict[str, np.ndarray]:
    """The arrays an index learned, in ``owner``'s namespace (``ann.``: the index layer's; the
    default: the extractor's, whose keys have no dot), by key within it."""
    sql = "SELECT key, value FROM index_state WHERE index_id = %s AND "
    rows = conn.execute(sql + "starts_with(key, %s)", (index.id, owner)) if owner else \
        conn.execute(sql + "strpos(key, '.') = 0", (index.id,))
    return {key[len(owner):]: np.load(io.BytesIO(value), allow_pickle=False) for key, value in rows.fetchall()}


def as_array(vector: Any) -> np.ndarray:
    """A stored vector as float32 numpy (text and binary reads give lists, arrays, Vector or HalfVector)."""
    return np.asarray(vector.to_numpy() if isinstance(vector, (pgvector.Vector, HalfVector)) else vector, dtype=np.float32)


def sign_bits(index: IndexRecord, center: np.ndarray, column: str = "embedding") -> str:
    """The bit expression of a binary-quantization index; queries must spell it identically (the
    centre is a literal in the SQL text) for the planner to match the index."""
    literal = "[" + ",".join(f"{x:.9g}" for x in center.tolist()) + "]"
    return f"binary_quantize({column} - '{literal}'::{index.storage})::bit({index.dim})"


def _columns(rows: Sequence[tuple[Any, ...]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
            np.fromiter((r[1] for r in rows), np.float32, len(rows)))


def hits(conn: psycopg.Connection, index: IndexRecord, ids: np.ndarray, distances: np.ndarray, k: int,
         filters: Sequence[ColumnElement[bool]] = (), notes: Mapping[int, dict[str, Any]] | None = None) -> list[Hit]:
    """The first ``k`` of a ranking that pass ``filters``, as hits, in the ranking's order, with each
    one's ``notes``: the one ``images`` join at the end of a query."""
    notes = notes or {}
    where, params = compile_filters(filters)
    params |= {"ids": ids.tolist()}
    sql = f"SELECT {HIT_COLUMNS}, NULL AS d{_ref_column(index)} FROM images WHERE images.id = ANY(%(ids)s) AND {where}"
    found = {r[0]: r for r in conn.execute(sql, params, binary=True).fetchall()}
    return [_hit(index, found[i], d, notes.get(i)) for i, d in zip(ids.tolist(), distances.tolist()) if i in found][:k]
