"""The database layer against the real embedded PostgreSQL: migrations, server reuse, the SQL
relation and its ANN plan, filtered search that still returns k rows, the ORM, learned state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from imgdb.db import images, indexes, pgvector, state, vectors
from imgdb.db.engine import Database
from imgdb.db.filters import parse_filters
from imgdb.io.reader import ImageFacts, sha256_hex
from imgdb.orm import Image, vectors_model

ROWS = 3000
DIM = 64


@pytest.fixture(scope="module")
def synthetic(client) -> tuple[str, np.ndarray, list[int]]:  # noqa: ANN001
    """An index of ROWS random unit vectors over synthetic image rows, written through the library."""
    client.create_index("synthetic", "color:hsv/bins=4x4x4")
    rng = np.random.default_rng(7)
    unit = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    rows = [
        (f"synthetic://{i}", ImageFacts(f"{i:064x}", 100 + i, 50, "PNG", 1000, None, None),
         {"group": "odd" if i % 2 else "even", "n": i, **({"tag": "rare"} if i % 100 == 0 else {})})
        for i in range(ROWS)
    ]
    with client.database.engine.begin() as conn:
        index = indexes.require(conn, "synthetic")
        ids = images.upsert(conn, rows)
        pgvector.drop_ann(conn, index)
        vectors.copy(conn, index, ids, unit)
    client.catalog.layer.sync(index)
    with client.database.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return "synthetic", unit, ids


def literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def test_schema_is_at_head_and_upgrade_is_idempotent(client) -> None:  # noqa: ANN001
    database = client.database
    assert database.revision() == database.head
    assert database.upgrade() is False


def test_alembic_command_line_upgrade_works(client, imgdb_home: Path) -> None:  # noqa: ANN001
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=root,
                            env={**os.environ, "IMGDB_HOME": str(imgdb_home)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert client.database.revision() == client.database.head


def test_embedded_server_is_reused_across_processes(client, imgdb_home: Path) -> None:  # noqa: ANN001
    result = subprocess.run([str(Path(sys.executable).parent / "imgdb"), "db", "url"], env={**os.environ, "IMGDB_HOME": str(imgdb_home)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == client.database.url


def test_unreachable_database_is_a_one_line_error(tmp_path: Path) -> None:
    from imgdb.errors import DatabaseError

    with pytest.raises(DatabaseError, match="cannot connect to PostgreSQL") as caught:
        Database(f"postgresql://nobody@/imgdb?host={tmp_path}", migrate=True)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("where", ["", "WHERE metadata @> '{\"group\": \"odd\"}'", "WHERE width > 150"])
def test_documented_sql_is_served_by_the_hnsw_index(client, synthetic, where: str) -> None:  # noqa: ANN001
    name, vectors, _ = synthetic
    sql = f"EXPLAIN SELECT id, uri FROM images_{name} {where} ORDER BY embedding <-> '{literal(vectors[0])}' LIMIT 10"
    with client.database.connect() as conn:
        plan = "\n".join(conn.exec_driver_sql(sql).scalars())
    assert f"Index Scan using {client.index(name).ann_index}" in plan, plan


def test_plain_sql_with_a_filter_returns_k_rows(client, synthetic) -> None:  # noqa: ANN001
    """When the planner walks the HNSW graph for a filter that 1% of rows pass, the database's
    default of iterative index scans keeps LIMIT 10 full for plain SQL; pgvector's old behaviour
    (``off``) returns whatever passed among the first ef_search candidates."""
    name, vectors, _ = synthetic
    sql = (f"SELECT id FROM images_{name} WHERE metadata @> '{{\"tag\": \"rare\"}}' "
           f"ORDER BY embedding <-> '{literal(vectors[5])}' LIMIT 10")
    with client.database.engine.begin() as conn:
        assert conn.exec_driver_sql("SHOW hnsw.iterative_scan").scalar_one() == "strict_order"
        # The planner would answer this selective query exactly; make it take the graph.
        conn.exec_driver_sql("SET LOCAL enable_sort = off")
        plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + sql).scalars())
        assert f"Index Scan using {client.index(name).ann_index}" in plan, plan
        assert len(conn.exec_driver_sql(sql).all()) == 10
        conn.exec_driver_sql("SET LOCAL hnsw.iterative_scan = off")
        assert len(conn.exec_driver_sql(sql).all()) < 10


def test_search_matches_exact_ranking(client, synthetic) -> None:  # noqa: ANN001
    name, vectors, ids = synthetic
    hits = client.search(vectors[11], k=10, index=name)
    exact = np.argsort(np.linalg.norm(vectors - vectors[11], axis=1))[:10]
    assert [h.id for h in hits][0] == ids[11]
    assert len({h.id for h in hits} & {ids[i] for i in exact}) >= 9  # HNSW recall on 3000 points
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def test_selective_filter_still_returns_k(client, synthetic) -> None:  # noqa: ANN001
    """12 of 3000 rows pass: the ANN scan's budget alone may not find them all; k come back anyway."""
    name, vectors, ids = synthetic
    hits = client.search(vectors[0], k=12, index=name, filters=["width<=111"])
    assert sorted(h.id for h in hits) == sorted(ids[:12])


def test_orm_models_query_by_vector_distance(client, synthetic) -> None:  # noqa: ANN001
    name, vectors, ids = synthetic
    with Session(client.database.engine) as session:
        V = vectors_model(session, name)
        found = session.scalars(
            sa.select(Image).join(V, V.image_id == Image.id)
            .where(Image.metadata_["group"].astext == "odd")
            .order_by(V.embedding.l2_distance(vectors[3])).limit(3)
        ).all()
    assert found[0].id == ids[3]
    assert all(image.metadata_["group"] == "odd" for image in found)


def test_filter_values_are_bound_never_pasted(client, synthetic) -> None:  # noqa: ANN001
    name, vectors, _ = synthetic
    hostile = "x'; DROP TABLE images; --"
    clause = parse_filters([f"meta.group={hostile}"])[0]
    compiled = clause.compile(dialect=client.database.engine.dialect)
    assert "DROP" not in str(compiled)
    assert client.search(vectors[0], k=5, index=name, filters=[f"meta.group={hostile}"]) == []
    with client.database.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM images").scalar_one() >= ROWS


def test_learned_state_round_trips_through_postgres(client, synthetic) -> None:  # noqa: ANN001
    arrays = {"codebook": np.arange(12, dtype=np.float32).reshape(3, 4), "pca": np.eye(3)}
    with client.database.engine.begin() as conn:
        index = indexes.require(conn, synthetic[0])
        state.save(conn, index, arrays)
    with client.database.connect() as conn:
        loaded = state.load(conn, index)
    assert set(loaded) == set(arrays)
    for key, array in arrays.items():
        np.testing.assert_array_equal(loaded[key], array)
        assert loaded[key].dtype == array.dtype


def test_ivfflat_index_is_built_after_the_load_and_searched(client, museum: Path) -> None:  # noqa: ANN001
    client.create_index("ivf", "color:hsv", ann="ivfflat")
    gallery = sorted((museum / "images").glob("*.jpg"))[:60]
    assert client.ingest(gallery, index="ivf").added == 60
    with client.database.connect() as conn:
        index = indexes.require(conn, "ivf")
        assert pgvector.has_ann(conn, index)
        ids = list(images.ids_by_hash(conn, [sha256_hex(p.read_bytes()) for p in gallery[:5]]).values())
    for image_id in ids:
        hits = client.search(f"id:{image_id}", index="ivf", k=3)
        assert hits[0].id == image_id and len(hits) == 3


def test_a_search_outlives_its_connection_being_dropped(client, synthetic) -> None:  # noqa: ANN001
    """A server restart (here: the search connection's backend terminated) costs the next query one
    reconnect, not an error (a statement that fails for another reason is not run twice: test_hostile)."""
    name, vectors, ids = synthetic
    before = client.search(vectors[5], k=3, index=name)
    pids = client.database.searching(lambda conn: [conn.info.backend_pid])
    with psycopg.connect(client.database.url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", pids).fetchone()[0]
    after = client.search(vectors[5], k=3, index=name)
    assert [h.id for h in after] == [h.id for h in before] and after[0].id == ids[5]
    assert client.database.searching(lambda conn: conn.info.backend_pid) != pids[0]
