"""imgdb's one schema: everything it makes lives there, no index name can make two of its objects
collide, another schema can be chosen, and an install of the layout before the schema moves in
without losing an image, a vector, an index or what was learned."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import imgdb
from imgdb.db import indexes, pgvector, state, vectors
from imgdb.errors import ImgdbError
from imgdb.orm import VIEW_PREFIX, Image, IndexState, SearchIndex
from tests import legacy
from tests.conftest import tool_env

#: Objects of the database that are neither the system's nor an extension's, outside a schema.
FOREIGN_OBJECTS = """
    SELECT 'relation ' || c.oid::regclass AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', %(schema)s)
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
      AND c.relkind <> 't'
    UNION ALL
    SELECT 'function ' || p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', %(schema)s)
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
"""


def foreign_objects(url: str, schema: str = "imgdb") -> list[str]:
    with psycopg.connect(url) as conn:
        return sorted(row[0] for row in conn.execute(FOREIGN_OBJECTS, {"schema": schema}))


def test_everything_imgdb_made_is_in_its_schema(new_database, museum: Path, client) -> None:  # noqa: ANN001
    """Ingest, an attached table, sync, an ANN rebuild: outside its schema, the database has exactly
    the objects the application had (its table gained triggers, whose functions are imgdb's)."""
    url = new_database("tidy")
    photos = sorted((museum / "images").glob("*.jpg"))[:3]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE photos (id int PRIMARY KEY, path text)")
        conn.execute("INSERT INTO photos VALUES (1, %s), (2, %s)", (str(photos[0]), str(photos[1])))
    before = foreign_objects(url)
    with imgdb.connect(url, settings=client.settings) as db:
        db.create_index("colors", "color:hsv/bins=4x4x4", ann="ivfflat")
        db.ingest(photos[2:], index="colors")
        db.attach("photos", "path", index="colors")
        assert db.sync("colors").embedded == 2
        db.rebuild_index("colors", "hnsw")
        with db.database.connect() as conn:
            tables = conn.execute(sa.text("SELECT table_schema FROM information_schema.tables"
                                          " WHERE table_name = 'alembic_version'")).scalars().all()
    assert foreign_objects(url) == before == ["relation photos", "relation photos_pkey"]
    assert tables == ["imgdb"]


def test_no_index_name_can_collide_with_another_object(client, museum: Path) -> None:  # noqa: ANN001
    # `a` and `a_ann` once shared a name (a's ANN index, a_ann's table); the others would reach the
    # relations PostgreSQL names after `images` (images_pkey, images_sha256_key, images_id_seq).
    names = ["a", "a_ann", "pkey", "sha256_key", "id_seq"]
    photo = museum / "images" / "bbdd_00121.jpg"
    for name in names:
        client.create_index(name, "color:hsv/bins=4x4x4")
        assert client.ingest([photo], index=name).added == 1
        assert client.search(photo, index=name, k=1)[0].distance < 1e-6
    with client.database.connect() as conn:
        found = {index.name: index for index in indexes.all_indexes(conn)}
        for name in names:
            assert pgvector.has_ann(conn, found[name])
        relations = conn.execute(sa.text("SELECT relname, relkind FROM pg_class"
                                         " WHERE relnamespace = 'imgdb'::regnamespace")).all()
    views = {name for name, kind in relations if name.startswith(VIEW_PREFIX)}
    assert views == {index.relation for index in found.values()}
    assert all(kind == "v" for name, kind in relations if name in views)
    ids = {str(index.id) for index in found.values()}
    assert all(name.split("_")[1] in ids for name, _ in relations if name.startswith("vectors_"))


def test_another_schema_keeps_everything_there(new_database, museum: Path, client) -> None:  # noqa: ANN001
    url = new_database("elsewhere")
    photos = sorted((museum / "images").glob("*.jpg"))[:3]
    with imgdb.connect(url, settings=replace(client.settings, schema="search")) as db:
        db.create_index("colors", "color:hsv/bins=4x4x4")
        assert db.ingest(photos, index="colors").added == 3
        assert db.search(photos[1], index="colors", k=1)[0].uri == str(photos[1])
        with Session(db.database.engine) as session:  # the models' schema, translated
            assert session.scalar(sa.select(sa.func.count()).select_from(Image)) == 3
    assert foreign_objects(url, "search") == []
    with psycopg.connect(url) as conn:
        schemas = {row[0] for row in conn.execute("SELECT nspname FROM pg_namespace")}
    assert "search" in schemas and "imgdb" not in schemas


def test_db_upgrade_is_the_first_command_a_new_database_needs(new_database, client) -> None:  # noqa: ANN001
    """`imgdb db upgrade` on a database imgdb never saw installs pgvector and its schema, as first
    use does, and leaves it at the current revision."""
    url = new_database("fresh_upgrade", vector=False)
    env = tool_env(IMGDB_DATABASE_URL=url)
    done = subprocess.run(["imgdb", "db", "upgrade", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["upgraded"] is True and report["schema"] == "imgdb"
    with imgdb.connect(url, settings=client.settings) as db:
        assert report["revision"] == db.database.head == db.database.revision()
    again = subprocess.run(["imgdb", "db", "upgrade", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["upgraded"] is False
    assert foreign_objects(url) == []


@pytest.mark.parametrize("schema", ["public", "pg_mine", "Upper", "a-b", ""])
def test_unusable_schema_names_are_refused(client, schema: str) -> None:  # noqa: ANN001
    with pytest.raises(ImgdbError, match="IMGDB_SCHEMA"):
        imgdb.connect(client.database.url, settings=replace(client.settings, schema=schema))


def test_upgrade_moves_the_layout_before_the_schema_and_keeps_everything(new_database, museum_sample: Path,
                                                                         client) -> None:  # noqa: ANN001
    """A database made by revisions 0001-0002 (tables, alembic's version, per-index tables and views
    in public) with real vectors and learned state: the upgrade moves every row into the schema,
    searches answer as before, and index `a`, whose ANN index the old names made impossible (index
    `a_ann`'s table had its name, so ingest into `a` failed), gets one."""
    url = new_database("legacy")
    paths = sorted((museum_sample / "images").glob("*.jpg"))
    metadata = {Path(k).name: v for k, v in json.loads((museum_sample / "metadata.json").read_text()).items()}
    olds = []
    for name, spec, ann in [("colors", "color:hsv/bins=4x4x4/size=256", "hnsw"),
                            ("orbs", "bow:orb/k=16/side=320/max=300", "hnsw"),
                            ("bits", "color:hsv/bins=4x4x4/size=256", "bq"),
                            ("a_ann", "color:hsv/bins=4x4x4/size=256", "hnsw"),
                            ("a", "color:hsv/bins=4x4x4/size=256", "hnsw")]:
        _, described, learned = legacy.describe(paths, spec)
        index = legacy.LegacyIndex(name, spec, ann=ann, vectors=described, state=learned)
        if ann == "bq":
            index.ann_params = {"m": 16, "ef_construction": 64, "ef_search": 200}
            index.state = {"ann.center": described.mean(axis=0)}
        olds.append(index)
    legacy.build(url, paths, metadata, olds)

    with imgdb.connect(url, settings=client.settings) as db:
        assert db.database.revision() == db.database.head
        assert foreign_objects(url) == []
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('public.alembic_version')").fetchone()[0] is None
        with db.database.connect() as conn:
            images = {row.uri: row for row in conn.execute(sa.select(Image.__table__)).all()}
            assert set(images) == {str(p) for p in paths}
            assert all(images[str(p)].metadata == metadata.get(p.name, {}) for p in paths)
            for old in olds:
                index = indexes.require(conn, old.name)
                assert (index.extractor, index.ann) == (old.spec, old.ann)
                ids, stored = vectors.read(conn, index)
                order = [images[str(p)].id for p in paths]
                np.testing.assert_array_equal(ids, order)
                np.testing.assert_allclose(stored, old.vectors, rtol=1e-6, atol=1e-7)
                assert pgvector.has_ann(conn, index) is (old.name != "a"), old.name
                learned = {**state.load(conn, index), **{"ann." + k: v for k, v in
                                                         state.load(conn, index, "ann.").items()}}
                assert set(learned) == set(old.state)
                for key, array in old.state.items():
                    np.testing.assert_array_equal(learned[key], array)
            assert conn.execute(sa.select(sa.func.count()).select_from(IndexState)).scalar() == sum(
                len(i.state) for i in olds)
            assert conn.execute(sa.select(sa.func.count()).select_from(SearchIndex)).scalar() == len(olds)

        # The learned codebook encodes a query as it encoded the collection; the moved ANN indexes serve.
        np.testing.assert_allclose(db.embed(paths[3], index="orbs"), olds[1].vectors[3], atol=1e-6)
        for name in ("colors", "orbs", "bits"):
            hit = db.search(f"id:{images[str(paths[5])].id}", index=name, k=1)[0]
            assert hit.uri == str(paths[5]) and hit.distance < 1e-4
        colors = db.index("colors")
        with db.database.engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(conn.execute(sa.text(
                "EXPLAIN SELECT id FROM images_colors ORDER BY embedding <-> CAST(:q AS vector) LIMIT 5"),
                {"q": "[" + ",".join(map(str, olds[0].vectors[0])) + "]"}).scalars())
        assert f"Index Scan using {colors.ann_index}" in plan, plan
        # Writes go on where the old install stopped: ingest into `a` works and builds its ANN
        # index, and the trigger counts the write.
        version = db.index("a").version
        assert db.ingest([museum_sample / "queries" / "qsd1_w1_00000.jpg"], index="a").added == 1
        assert db.index("a").version > version
        with db.database.connect() as conn:
            assert pgvector.has_ann(conn, db.index("a"))
