"""The index layer: keeps every index's first stage current, and caches what queries read of it.

Queries themselves are :mod:`imgdb.query`: pgvector first stages (HNSW, IVFFlat, binary
quantization) run inside PostgreSQL; Python-side ones (PQ, IVF-PQ, LSH, KD-tree) run in this
process over codes loaded from PostgreSQL by :meth:`AnnLayer.searcher`.

Python-side state lives in PostgreSQL: the trained quantizer in ``index_state`` (keys ``ann.*``),
each vector's code in its row. Every write to an index bumps ``indexes.version`` (a trigger), and
a searcher is reloaded when the version it was loaded at is no longer current, so codes added or
deleted by any process are seen by the next query.

A query costs one round trip for pgvector methods with an exact re-rank (the registry row is
cached for TARGET_TTL seconds) and three for Python-side ones (the version check, the re-rank, the
join).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from imgdb import lazy
from imgdb.ann.spec import parse_ann
from imgdb.db import search as sql

if TYPE_CHECKING:
    from imgdb.ann.codes import CodeIndex, Searcher
    from imgdb.db import store
    from imgdb.db.engine import Database
    from imgdb.orm import SearchIndex
else:  # (writes and Python-side first stages only: a pgvector query reads through `sql`)
    store = lazy.module("imgdb.db.store")

#: Namespace of the index layer's arrays in ``index_state``.
STATE_OWNER = "ann."
#: Rows encoded per chunk when codes are (re)computed for stored vectors.
ENCODE_CHUNK = 65_536
#: Seconds an index's registry row is trusted without asking PostgreSQL again. Changes made by this
#: process are seen at once; a drop elsewhere is noticed by the failing query, which asks again.
TARGET_TTL = 2.0


@dataclass(frozen=True)
class _Loaded:
    version: int
    searcher: Searcher


class AnnLayer:
    """One process's view of the index layer (thread-safe: the web server shares it)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._loaded: dict[int, _Loaded] = {}
        self._targets: dict[str, tuple[float, sql.Target]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ writes

    def code_index(self, index: SearchIndex) -> CodeIndex | None:
        """The index's Python-side first stage with its trained state, or None for pgvector methods."""
        ann = parse_ann(index.ann, index.ann_params)
        if not ann.python_side:
            return None
        from imgdb.ann.codes import code_index  # faiss and scipy: loaded by Python-side indexes only

        codes = code_index(ann, index.dim)
        with self.database.connect() as conn:
            codes.load_state(store.load_state(conn, index, STATE_OWNER))
        return codes

    def sync(self, index: SearchIndex, *, retrain: bool = False) -> None:
        """Bring the first stage up to date after writes: build a missing pgvector index, or train
        the quantizer (once there are enough vectors, or again with ``retrain``) and encode the rows
        that have no code yet."""
        with self.database.engine.begin() as conn:
            store.ensure_ann(conn, index)
        codes = self.code_index(index)
        if codes is None or not codes.uses_codes:
            return
        with self.database.engine.begin() as conn:
            if retrain or not codes.trained:
                from imgdb.ann.codes import MAX_TRAIN, MIN_TRAIN

                if store.count_vectors(conn, index) < MIN_TRAIN:
                    return
                _, sample = store.read_vectors(conn, index, sample=MAX_TRAIN)
                store.save_state(conn, index, codes.train(sample), STATE_OWNER)
                store.clear_codes(conn, index)
            while True:
                ids, vectors = store.read_vectors(conn, index, without_codes=True, limit=ENCODE_CHUNK)
                if not len(ids):
                    break
                store.write_codes(conn, index, ids, codes.encode(vectors))

    def train_from(self, index: SearchIndex, vectors: np.ndarray) -> CodeIndex | None:
        """Train an untrained Python-side first stage on vectors about to be written (a bulk load
        of vectors made elsewhere), so that they are written with their codes in one pass."""
        from imgdb.ann.codes import MAX_TRAIN, MIN_TRAIN

        codes = self.code_index(index)
        if codes is None or not codes.uses_codes or codes.trained or len(vectors) < MIN_TRAIN:
            return codes
        rows = np.random.default_rng(0).permutation(len(vectors))[:MAX_TRAIN]
        state = codes.train(vectors[np.sort(rows)])
        with self.database.engine.begin() as conn:
            store.save_state(conn, index, state, STATE_OWNER)
        return codes

    # ------------------------------------------------------------ reads

    def target(self, name: str) -> sql.Target | None:
        """The index named ``name`` as queries see it (cached for TARGET_TTL seconds)."""
        cached = self._targets.get(name)
        if cached is not None and time.monotonic() - cached[0] < TARGET_TTL:
            return cached[1]
        found = self.database.searching(lambda conn: sql.lookup(conn, name))
        if found is not None:
            self._targets[name] = (time.monotonic(), found)
        return found

    def searcher(self, index: SearchIndex, version: int) -> Searcher | None:
        """The in-memory first stage of a Python-side index at ``version`` (None while it is
        untrained: the query is then answered exactly)."""
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

    def _load(self, index: SearchIndex) -> _Loaded | None:
        from imgdb.ann.codes import code_index

        codes = code_index(parse_ann(index.ann, index.ann_params), index.dim)
        # One snapshot: the version, the quantizer and the codes must agree.
        with self.database.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                version = store.index_version(conn, index)
                codes.load_state(store.load_state(conn, index, STATE_OWNER))
                if not codes.trained:
                    return None
                if not codes.uses_codes:
                    ids, data = store.read_vectors(conn, index)
                else:
                    ids, blob = store.read_codes(conn, index)
                    data = np.frombuffer(blob, dtype=np.uint8).reshape(len(ids), codes.code_size)
                    # Rows written by plain SQL since the last ingest have no code yet: encode them here.
                    extra_ids, extra = store.read_vectors(conn, index, without_codes=True)
                    if len(extra_ids):
                        ids = np.concatenate([ids, extra_ids])
                        data = np.concatenate([data, codes.encode(extra)])
        return _Loaded(version, codes.searcher(ids, data))

    def forget(self, index: SearchIndex | None = None) -> None:
        """Drop what is cached about an index (it was dropped or rebuilt), or about every index."""
        if index is None:
            self._loaded.clear()
            self._targets.clear()
            return
        self._loaded.pop(index.id, None)
        self._targets.pop(index.name, None)
