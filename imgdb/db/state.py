"""SQL of what indexes learned (``index_state``): named arrays stored as ``.npy`` bytes.

Two owners share the table, namespaced by key: an index's extractor (keys without a dot: codebooks,
PCA matrices) and its ANN method (keys ``ann.*``: quantizers, binary quantization's centre), so
that learning one again never erases the other.
"""

from __future__ import annotations

import io

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from imgdb.db import search as reads
from imgdb.db.models import IndexState
from imgdb.db.records import IndexRecord

#: First key of the advisory lock that serialises learning an index's state (the second is its id).
LEARNING_LOCK = 0x7EA1
_state = IndexState.__table__


def save(conn: Connection, index: IndexRecord, arrays: dict[str, np.ndarray], owner: str = "") -> None:
    """Store learned arrays with the index, replacing what ``owner`` stored before (``""``: the
    extractor, ``"ann."``: the index layer)."""
    mine = _state.c.key.startswith(owner) if owner else ~_state.c.key.contains(".")
    keys = [owner + key for key in arrays]
    conn.execute(sa.delete(_state).where(_state.c.index_id == index.id, mine, _state.c.key.not_in(keys)))
    for key, array in arrays.items():
        # An upsert: two processes that learned the same state at once must not collide.
        statement = pg_insert(_state).values(index_id=index.id, key=owner + key, value=npy_bytes(array))
        conn.execute(statement.on_conflict_do_update(index_elements=["index_id", "key"],
                                                     set_={"value": statement.excluded.value}))


def load(conn: Connection, index: IndexRecord, owner: str = "") -> dict[str, np.ndarray]:
    """:func:`imgdb.db.search.state`, in ``conn``'s transaction."""
    return reads.state(conn.connection.driver_connection, index, owner)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes, without pickles: how learned state is stored (and exported)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def lock_learning(conn: Connection, index: IndexRecord) -> None:
    """Serialise learning an index's state across processes (until the transaction ends): one that
    waited finds the state learned meanwhile and takes it."""
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(LEARNING_LOCK, index.id)))
