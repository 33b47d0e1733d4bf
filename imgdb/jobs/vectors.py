"""An index's first stage rebuilt from its stored vectors, and vectors made elsewhere loaded in bulk."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgdb.ann import registry as ann_methods
from imgdb.ann.registry import STATE_OWNER
from imgdb.ann.spec import AnnSpec
from imgdb.catalog import Catalog
from imgdb.db import indexes, pgvector, state, vectors
from imgdb.db.records import IndexRecord
from imgdb.errors import ImgdbError
from imgdb.jobs.ingest import StatusCallback

#: Rows written per transaction by a bulk load.
LOAD_CHUNK = 100_000


def rebuild(catalog: Catalog, name: str, ann: str | None = None,
            on_status: StatusCallback | None = None) -> IndexRecord:
    """Rebuild an index's first stage from its stored vectors, optionally switching to another ANN
    spec (parameters not given keep their current values when the method stays): what the method
    learns is learned again, its structure built again."""
    target = catalog.index(name)
    current = AnnSpec.of(target)
    wanted = current if ann is None else ann_methods.parse_ann(
        ann, current.params if ann.split("/")[0].strip().lower() == current.method else None)
    ann_methods.check(wanted, target.dim, target.storage)
    if on_status:
        on_status(f"rebuilding {name!r} as {wanted}")
    with catalog.database.engine.begin() as conn:
        pgvector.drop_ann(conn, target)
        if wanted.method != current.method:
            # What the old method learned and encoded means nothing to the new one.
            state.save(conn, target, {}, STATE_OWNER)
            vectors.clear_codes(conn, target)
        target = indexes.set_ann(conn, target, wanted.method, wanted.params)
    catalog.layer.forget(target)
    catalog.layer.sync(target, relearn=True)
    return catalog.counted(target)


def add_vectors(catalog: Catalog, ids: Sequence[int], found: np.ndarray, *, index: str) -> int:
    """Store vectors computed elsewhere for images already in the database; returns how many were
    added (ids already in the index are left as they are). A load that at least doubles the index
    builds its ANN index once at the end; a method that has not learned yet learns from these
    vectors first, so that they are written with their codes."""
    target = catalog.index(index)
    found = np.ascontiguousarray(found, dtype=np.float32)
    if found.ndim != 2 or found.shape[1] != target.dim or len(found) != len(ids):
        raise ImgdbError(f"index {target.name!r} needs {len(ids)} vectors of {target.dim} dimensions, "
                         f"got an array of shape {found.shape}")
    codes_index = catalog.layer.learn_from(target, found)
    ids_array = np.asarray(ids, dtype=np.int64)
    with catalog.database.engine.begin() as conn:
        present = vectors.ids_with_vectors(conn, target, ids_array.tolist())
        if len(ids_array) - len(present) >= vectors.count(conn, target):
            pgvector.drop_ann(conn, target)
    keep = np.flatnonzero(~np.isin(ids_array, list(present)))
    try:
        for start in range(0, len(keep), LOAD_CHUNK):
            rows = keep[start:start + LOAD_CHUNK]
            codes = codes_index.codes_for(found[rows]) if codes_index is not None else None
            with catalog.database.engine.begin() as conn:
                vectors.copy(conn, target, ids_array[rows].tolist(), found[rows], codes)
    finally:
        catalog.layer.sync(target)
    return len(keep)
