"""The index layer: keeps every index's first stage current with its vectors, and caches what
queries read of it.

What a method learns from the data (:meth:`~imgdb.ann.method.AnnMethod.learn`) it learns here, from
the index's own vectors: after a write, once the index holds ``min_vectors`` of them (never from an
empty table), and again when asked (``imgdb index rebuild``). The arrays live in ``index_state``
under keys ``ann.*``; a pgvector index the method keeps is built from them; codes are written with
each vector from then on, and the rows written before get theirs here.

Queries themselves are :mod:`imgdb.query`: pgvector first stages run inside PostgreSQL; in-process
ones over codes loaded from PostgreSQL by :meth:`AnnLayer.searcher`. Every write to an index bumps
``indexes.version`` (a trigger), and a searcher is reloaded when the version it was loaded at is no
longer current, so codes added or deleted by any process are seen by the next query.

A query costs one round trip for pgvector methods with an exact re-rank (the registry row is cached
for RECORD_TTL seconds) and three for in-process ones (the version check, the re-rank, the join).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from imgdb import lazy
from imgdb.ann.registry import STATE_OWNER, method, query_state_keys
from imgdb.ann.spec import AnnSpec
from imgdb.db import search as sql
from imgdb.db.records import IndexRecord
from imgdb.query import scores

if TYPE_CHECKING:
    from imgdb.ann.method import CodeIndex, Searcher
    from imgdb.db import pgvector, state, vectors
    from imgdb.db.engine import Database
else:  # (writes and in-process first stages only: a pgvector query reads through `sql`)
    pgvector, state, vectors = (lazy.module(f"imgdb.db.{name}") for name in ("pgvector", "state", "vectors"))

#: Rows encoded per chunk when codes are computed for stored vectors.
ENCODE_CHUNK = 65_536
#: Seconds an index's registry row is trusted without asking PostgreSQL again. Changes made by this
#: process are seen at once; a drop elsewhere is noticed by the failing query, which asks again.
RECORD_TTL = 2.0


@dataclass(frozen=True)
class _Loaded:
    version: int
    searcher: Searcher


class AnnLayer:
    """One process's view of the index layer (thread-safe: the web server shares it)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._loaded: dict[int, _Loaded] = {}
        self._records: dict[str, tuple[float, IndexRecord]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ writes

    def code_index(self, index: IndexRecord) -> CodeIndex | None:
        """The index's in-process structure as learned, for writers to encode new vectors with;
        None for methods that keep no codes, and until the method has learned."""
        found = method(index.ann)
        if not found.uses_codes:
            return None
        with self.database.connect() as conn:
            learned = state.load(conn, index, STATE_OWNER)
        return found.code_index(AnnSpec.of(index), index.dim, learned)

    def sync(self, index: IndexRecord, *, relearn: bool = False) -> None:
        """Bring the first stage up to date after writes: learn what the method learns once there
        are enough vectors (again with ``relearn``), build the pgvector index it keeps where it is
        missing, and encode the rows that have no code yet."""
        found, ann = method(index.ann), AnnSpec.of(index)
        with self.database.engine.begin() as conn:
            learned = state.load(conn, index, STATE_OWNER)
            if found.learns and (relearn or not learned) and vectors.count(conn, index) >= found.min_vectors:
                state.lock_learning(conn, index)
                learned = state.load(conn, index, STATE_OWNER)  # (another process may have learned meanwhile)
                if relearn or not learned:
                    _, sample = vectors.read(conn, index, sample=found.sample_rows(index.dim))
                    learned = found.learn(ann, index.dim, sample)
                    state.save(conn, index, learned, STATE_OWNER)
                    # What was built or encoded from the old state goes with it.
                    pgvector.drop_ann(conn, index)
                    vectors.clear_codes(conn, index)
            if not pgvector.has_ann(conn, index):
                structure = found.structure(index, vectors.count(conn, index), learned)
                if structure is not None:
                    pgvector.build_ann(conn, index, structure.using, structure.memory_mb)
            codes = found.code_index(ann, index.dim, learned) if found.uses_codes else None
            while codes is not None:
                ids, found_vectors = vectors.read(conn, index, without_codes=True, limit=ENCODE_CHUNK)
                if not len(ids):
                    break
                vectors.write_codes(conn, index, ids, codes.encode(found_vectors))
        self._records.pop(index.name, None)  # (queries see the new structure at once)

    def learn_from(self, index: IndexRecord, incoming: np.ndarray) -> CodeIndex | None:
        """Have a method that has not learned yet learn from vectors about to be written (a bulk load
        of vectors made elsewhere), so that they are written with their codes in one pass; returns
        what to encode them with (None where the method keeps no codes)."""
        found, ann = method(index.ann), AnnSpec.of(index)
        with self.database.engine.begin() as conn:
            learned = state.load(conn, index, STATE_OWNER)
            if found.learns and not learned and len(incoming) >= found.min_vectors:
                state.lock_learning(conn, index)
                learned = state.load(conn, index, STATE_OWNER)
                if not learned:
                    rows = np.sort(np.random.default_rng(0).permutation(len(incoming))[:found.sample_rows(index.dim)])
                    learned = found.learn(ann, index.dim, incoming[rows])
                    state.save(conn, index, learned, STATE_OWNER)
        return found.code_index(ann, index.dim, learned) if found.uses_codes else None

    # ------------------------------------------------------------ reads

    def record(self, name: str) -> IndexRecord | None:
        """The index named ``name`` as queries see it, with what its first stage's SQL reads of its
        learned state (cached for RECORD_TTL seconds)."""
        cached = self._records.get(name)
        if cached is not None and time.monotonic() - cached[0] < RECORD_TTL:
            return cached[1]
        keys = query_state_keys() + scores.KEYS
        found = self.database.searching(lambda conn: sql.lookup(conn, name, keys, self.database.distributed))
        if found is not None:
            self._records[name] = (time.monotonic(), found)
        return found

    def searcher(self, index: IndexRecord, version: int) -> Searcher | None:
        """The in-process first stage of an index at ``version`` (None until its method has
        learned: the query is then answered exactly)."""
        cached = self._loaded.get(index.id)
        if cached is not None and cached.version == version:
            return cached.searcher
        with self._lock:
            cached = self._loaded.get(index.id)
            if cached is None or cached.version != version:
                loaded = self._load(index)
                if loaded is None:
                    return None
                self._loaded[index.id] = cached = loaded
        return cached.searcher

    def _load(self, index: IndexRecord) -> _Loaded | None:
        found = method(index.ann)
        # One snapshot: the version, the learned state and the codes must agree.
        with self.database.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                version = sql.version(conn.connection.driver_connection, index)
                structure = found.code_index(AnnSpec.of(index), index.dim, state.load(conn, index, STATE_OWNER))
                if structure is None:
                    return None
                if not structure.code_size:
                    ids, data = vectors.read(conn, index)
                else:
                    ids, blob = vectors.read_codes(conn, index)
                    data = np.frombuffer(blob, dtype=np.uint8).reshape(len(ids), structure.code_size)
                    # Rows written by plain SQL since the last ingest have no code yet: encode them here.
                    extra_ids, extra = vectors.read(conn, index, without_codes=True)
                    if len(extra_ids):
                        ids = np.concatenate([ids, extra_ids])
                        data = np.concatenate([data, structure.encode(extra)])
        return _Loaded(version, structure.searcher(ids, data))

    def forget(self, index: IndexRecord | None = None) -> None:
        """Drop what is cached about an index (it was written, dropped or rebuilt), or about every index."""
        if index is None:
            self._loaded.clear()
            self._records.clear()
            return
        self._loaded.pop(index.id, None)
        self._records.pop(index.name, None)
