"""SQL for fine-tuned networks (the ``networks`` table): weights stored once, by content hash.

Any number of indexes may name one network in their specs; its row is written once (two processes
storing the same bytes converge on the same row) and read by every process that opens such an index.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from imgdb.errors import ImgdbError
from imgdb.orm import Network

_networks = Network.__table__


def save(conn: Connection, record: dict[str, Any]) -> None:
    """Store a network (a row of ``networks`` as a dict); content already there is left as it is."""
    conn.execute(pg_insert(_networks).values(**record).on_conflict_do_nothing(index_elements=["sha256"]))


def weights(conn: Connection, sha256: str) -> bytes:
    """The stored weights of network ``sha256``."""
    blob = conn.execute(sa.select(_networks.c.weights).where(_networks.c.sha256 == sha256)).scalar()
    if blob is None:
        raise ImgdbError(f"network {sha256[:12]} is not in this database (import its index with `imgdb index import`)")
    return bytes(blob)


def record(conn: Connection, sha256: str) -> dict[str, Any] | None:
    """Network ``sha256``'s whole row, weights included (what an export carries)."""
    row = conn.execute(sa.select(_networks).where(_networks.c.sha256 == sha256)).mappings().first()
    return dict(row) if row else None
