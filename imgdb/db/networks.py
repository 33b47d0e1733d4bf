"""SQL of stored networks (the ``networks`` table): weights stored once, by content hash.

Any number of indexes may name one network in their specs; its row is written once (two processes
storing the same bytes converge on the same row) and read by every process that opens such an index.
"""

from __future__ import annotations

from dataclasses import asdict

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from imgdb.db.models import Network
from imgdb.db.records import StoredNetwork
from imgdb.errors import ImgdbError

_networks = Network.__table__


def save(conn: Connection, network: StoredNetwork) -> None:
    """Store a network; content already there is left as it is."""
    conn.execute(pg_insert(_networks).values(**asdict(network)).on_conflict_do_nothing(index_elements=["sha256"]))


def weights(conn: Connection, sha256: str) -> bytes:
    """The stored weights of network ``sha256``."""
    blob = conn.execute(sa.select(_networks.c.weights).where(_networks.c.sha256 == sha256)).scalar()
    if blob is None:
        raise ImgdbError(f"network {sha256[:12]} is not in this database (import its index with `imgdb index import`)")
    return bytes(blob)


def record(conn: Connection, sha256: str) -> StoredNetwork | None:
    """Network ``sha256`` whole, weights included (what an export carries)."""
    row = conn.execute(sa.select(*(_networks.c[name] for name in StoredNetwork.__dataclass_fields__))
                       .where(_networks.c.sha256 == sha256)).mappings().first()
    return None if row is None else StoredNetwork(**{**row, "weights": bytes(row["weights"])})
