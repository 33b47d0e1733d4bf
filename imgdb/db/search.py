"""The statements a query runs, on pooled autocommit psycopg connections.

Search is the latency-critical path, so it skips what the rest of imgdb happily pays for: no
SQLAlchemy execution layer, no transaction (autocommit: no BEGIN/COMMIT round trips), pgvector's
settings set once per connection and only when they change, and one statement per stage, which
psycopg prepares after a few runs. Filters are compiled from the same SQLAlchemy clauses as
everywhere else (:mod:`imgdb.db.filters`), then run here as plain SQL with bound parameters.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import sqlalchemy as sa
from pgvector import HalfVector
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import ColumnElement

from imgdb.ann.spec import AnnSpec
from imgdb.db import store
from imgdb.db.attached import TABLE_NAME, Source
from imgdb.db.schema import SESSION_SETTINGS
from imgdb.orm import SearchIndex

#: pgvector stops growing the HNSW candidate list here.
MAX_EF_SEARCH = 1000

_settings: weakref.WeakKeyDictionary[psycopg.Connection, dict[str, str]] = weakref.WeakKeyDictionary()
_dialect = postgresql.psycopg.dialect()


@dataclass(frozen=True)
class Hit:
    """One search result; ``refs`` are the rows of attached tables that hold the image, as
    ``(table, key)``, the key JSON-typed as its column is."""

    id: int
    uri: str
    distance: float
    metadata: dict[str, Any]
    refs: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        document = {"id": self.id, "uri": self.uri, "distance": self.distance, "metadata": self.metadata}
        if self.refs:
            # The first row (by table, then key) in CONVENTIONS' two keys; every row in `refs`.
            document |= {"table": self.refs[0][0], "ref": self.refs[0][1],
                         "refs": [{"table": table, "ref": ref} for table, ref in self.refs]}
        return document


@dataclass(frozen=True)
class Target:
    """An index as a query sees it: its registry row, whether its pgvector index exists (an
    interrupted bulk load can leave it dropped), for binary quantization the centre its bits
    are taken around (:func:`imgdb.db.store.learn_center`), and the tables attached to it."""

    index: SearchIndex
    has_ann: bool
    center: np.ndarray | None = None
    sources: tuple[Source, ...] = ()


def lookup(conn: psycopg.Connection, name: str) -> Target | None:
    """The index named ``name``, in one round trip."""
    row = conn.cursor(row_factory=dict_row).execute(
        "SELECT *, to_regclass(format('%%I.vectors_%%s_ann', current_schema(), id)) IS NOT NULL AS has_ann,"
        " (SELECT value FROM index_state s WHERE s.index_id = indexes.id AND s.key = %s) AS center,"
        " (SELECT jsonb_agg(jsonb_build_object('id', s.id, 'index_id', s.index_id, 'index_name', indexes.name,"
        f"   'table', {TABLE_NAME}, 'column', s.column_name, 'column_kind', s.column_kind,"
        "   'key', s.key_column, 'key_type', s.key_type, 'root', s.root) ORDER BY s.id)"
        "  FROM sources s WHERE s.index_id = indexes.id) AS sources"
        " FROM indexes WHERE name = %s",
        ("ann." + store.CENTER_KEY, name),
    ).fetchone()
    if row is None:
        return None
    has_ann, center, sources = row.pop("has_ann"), row.pop("center"), row.pop("sources")
    return Target(SearchIndex(**row), has_ann, None if center is None else np.load(io.BytesIO(center)),
                  tuple(Source(**s) for s in sources or ()))


#: What a hit reads of ``images``; its distance ``d`` follows, then :func:`_ref_column`.
HIT_COLUMNS = "images.id, images.uri, images.metadata"


def _ref_column(target: Target) -> str:
    """For an index with attached tables, the keys of the rows that hold each hit's image (a
    subquery on ``refs``'s image index per hit; nothing at all for other indexes)."""
    if not target.sources:
        return ""
    ids = ",".join(str(s.id) for s in target.sources)
    return (", (SELECT jsonb_agg(jsonb_build_array(r.source_id, r.ref) ORDER BY r.source_id, r.ref)"
            f" FROM refs r WHERE r.image_id = images.id AND r.source_id IN ({ids})) AS refs")


def _hit(target: Target, row: Sequence[Any], distance: float | None = None) -> Hit:
    by_id = {s.id: s for s in target.sources}
    refs = tuple((by_id[source_id].table, by_id[source_id].ref_json(ref))
                 for source_id, ref in (row[4] if len(row) > 4 else None) or ())
    return Hit(row[0], row[1], float(row[3] if distance is None else distance), row[2], refs)


def version(conn: psycopg.Connection, index: SearchIndex) -> int:
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


def _ef_search(conn: psycopg.Connection, ann: AnnSpec, candidates: int) -> None:
    """HNSW's candidate list grows to the candidates asked for (within pgvector's bound)."""
    configure(conn, {"hnsw.ef_search": str(min(max(ann.params["ef_search"], candidates), MAX_EF_SEARCH))})


def compile_filters(clauses: Sequence[ColumnElement[bool]]) -> tuple[str, dict[str, Any]]:
    """``AND``-ed filter clauses as SQL on the ``images`` table, with their bound parameters."""
    if not clauses:
        return "TRUE", {}
    compiled = sa.and_(*clauses).compile(dialect=_dialect, compile_kwargs={"render_postcompile": True})
    # Values SQLAlchemy would serialise through the JSONB type (containment filters) go as Jsonb.
    params = {k: Jsonb(v) if isinstance(v, (dict, list)) else v for k, v in compiled.params.items()}
    return str(compiled), params


def _param(index: SearchIndex, vector: np.ndarray) -> Any:
    return HalfVector(vector) if index.storage == "halfvec" else np.asarray(vector, dtype=np.float32)


def _hits(target: Target, rows: Sequence[tuple[Any, ...]]) -> list[Hit]:
    # IVFFlat's relaxed order may return rows slightly out of order: callers get them sorted.
    return sorted((_hit(target, r) for r in rows), key=lambda h: h.distance)


def nearest(conn: psycopg.Connection, target: Target, ann: AnnSpec, vector: np.ndarray, k: int,
            candidates: int, filters: Sequence[ColumnElement[bool]] = (), *, exact: bool = False,
            rerank: bool = True) -> list[Hit]:
    """The ``k`` nearest images that pass ``filters``, with pgvector serving the first stage.

    HNSW/IVFFlat: the index returns ``candidates`` rows (ef_search grows to match), the best ``k``
    are kept. Binary quantization: ``candidates`` rows by Hamming distance of the centred sign
    bits, re-ranked by the full vectors in the same statement (``rerank=False`` keeps the Hamming
    order). ``exact`` hides the distance from the index (``+ 0``): an exact scan of what passes.
    """
    index = target.index
    where, params = compile_filters(filters)
    params |= {"q": _param(index, vector), "k": k, "n": max(candidates, k)}
    distance = "(v.embedding <-> %(q)s)" + (" + 0" if exact else "")
    table = f'"{index.vectors_table}"'
    refs = _ref_column(target)
    if ann.method == "bq" and not exact and target.center is not None:
        bits = (f"{store.sign_bits(index, target.center, 'v.embedding')} <~>"
                f" {store.sign_bits(index, target.center, '%(q)s')}")
        _ef_search(conn, ann, candidates)
        join = " JOIN images ON images.id = v.image_id" if filters else ""
        inner = (f"SELECT v.image_id, v.embedding, {bits} AS hamming FROM {table} v{join}"
                 f" WHERE {where} ORDER BY {bits} LIMIT %(n)s")
        order = "c.embedding <-> %(q)s" if rerank else "c.hamming"
        sql = (f"SELECT {HIT_COLUMNS}, {order} AS d{refs} FROM ({inner}) c JOIN images ON images.id = c.image_id"
               f" ORDER BY d LIMIT %(k)s")
    else:
        if ann.method == "hnsw":
            _ef_search(conn, ann, candidates)
        elif ann.method == "ivfflat":
            configure(conn, {"ivfflat.probes": str(ann.params["probes"])})
        if filters:
            sql = (f"SELECT {HIT_COLUMNS}, {distance} AS d{refs} FROM {table} v"
                   f" JOIN images ON images.id = v.image_id WHERE {where} ORDER BY {distance} LIMIT %(k)s")
        else:
            # The index scan alone, then ten primary-key look-ups: the planner never has to weigh
            # the join against the index order.
            sql = (f"SELECT {HIT_COLUMNS}, c.d{refs} FROM (SELECT v.image_id, {distance} AS d FROM {table} v"
                   f" ORDER BY {distance} LIMIT %(n)s) c JOIN images ON images.id = c.image_id ORDER BY c.d LIMIT %(k)s")
    return _hits(target, conn.execute(sql, params, binary=True).fetchall())


def by_ids(conn: psycopg.Connection, target: Target, vector: np.ndarray, ids: np.ndarray,
           distances: np.ndarray | None, k: int, filters: Sequence[ColumnElement[bool]] = ()) -> list[Hit]:
    """Candidates from a Python-side first stage, as hits: re-ranked by their exact distance to the
    stored vectors (``distances`` None), or kept in first-stage order with those distances."""
    index = target.index
    where, params = compile_filters(filters)
    params |= {"ids": ids.tolist(), "k": k}
    refs = _ref_column(target)
    if distances is None:
        params["q"] = _param(index, vector)
        sql = (f'SELECT {HIT_COLUMNS}, v.embedding <-> %(q)s AS d{refs} FROM "{index.vectors_table}" v'
               f" JOIN images ON images.id = v.image_id WHERE v.image_id = ANY(%(ids)s) AND {where}"
               f" ORDER BY d LIMIT %(k)s")
        return _hits(target, conn.execute(sql, params, binary=True).fetchall())
    sql = (f"SELECT {HIT_COLUMNS}, NULL AS d{refs} FROM images WHERE images.id = ANY(%(ids)s) AND {where}")
    found = {r[0]: r for r in conn.execute(sql, params, binary=True).fetchall()}
    hits = [_hit(target, found[i], d) for i, d in zip(ids.tolist(), distances) if i in found]
    return hits[:k]
