"""imgdb on a Citus cluster: a coordinator and two workers on loopback (:mod:`tests.citus`, Citus built
from its source release), ``imgdb db distribute``, then ingest, search, delete and evaluation as on
one node, each search one distributed statement whose shards scan their own HNSW index."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import imgdb
from imgdb import Imgdb, ImgdbError
from imgdb.ann.registry import BUILTIN
from imgdb.db import images, search
from imgdb.io.reader import ImageFacts
from imgdb_cli.main import app
from tests import citus

SHARDS = 8


@pytest.fixture(scope="module")
def on_cluster(client, cluster: citus.Cluster, museum_sample: Path) -> Iterator[Imgdb]:  # noqa: ANN001
    """imgdb on the coordinator: half the museum sample ingested before distributing, the rest after."""
    gallery = sorted((museum_sample / "images").glob("*.jpg"))
    with imgdb.connect(cluster.url, settings=client.settings) as db:
        assert db.ingest(gallery[:20], metadata_file=museum_sample / "metadata.json").added == 20
        layout = db.distribute(shards=SHARDS)
        assert layout["shards"] == SHARDS
        assert db.ingest(gallery[20:], metadata_file=museum_sample / "metadata.json").added == len(gallery) - 20
        yield db


def test_distribute_is_refused_without_citus(client) -> None:  # noqa: ANN001
    with pytest.raises(ImgdbError, match="no Citus"):
        client.distribute()
    result = CliRunner().invoke(app, ["db", "distribute", "--json"])
    assert result.exit_code == 1 and "no Citus" in result.stderr


def test_distribute_shards_the_images_and_vectors_and_says_how(on_cluster: Imgdb, cluster: citus.Cluster) -> None:
    layout = on_cluster.distribute()  # (again: nothing changes)
    assert {"images", "image_hashes", "local_features", on_cluster.index().vectors_table} <= set(layout["distributed"])
    assert {"indexes", "index_state", "networks", "sources", "refs"} <= set(layout["reference"])
    workers = {f"127.0.0.1:{w.port}" for w in cluster.workers}
    held = {node["node"]: node for node in layout["nodes"]}
    assert workers <= set(held) and all(held[w]["shards"] > 0 and held[w]["images"] > 0 for w in workers)
    with on_cluster.database.connect() as conn:
        assert sum(node["images"] for node in layout["nodes"]) == conn.exec_driver_sql(
            "SELECT count(*) FROM images").scalar_one()
    status = imgdb.database_status(imgdb.Settings(database_url=cluster.url, home=on_cluster.settings.home))
    assert status["citus"] is True and status["cluster"]["distributed"] == layout["distributed"]


def test_content_stays_deduplicated_across_shards(on_cluster: Imgdb, museum_sample: Path, tmp_path: Path) -> None:
    first = sorted((museum_sample / "images").glob("*.jpg"))[3]
    again = tmp_path / "elsewhere" / "same.jpg"
    again.parent.mkdir()
    shutil.copyfile(first, again)
    report = on_cluster.ingest([first, again], meta={"seen": "twice"})
    assert (report.added, report.duplicates) == (0, 2)
    hit = on_cluster.search(again, k=1)[0]
    assert hit.uri == str(first) and hit.distance < 1e-5 and hit.metadata["seen"] == "twice"
    with on_cluster.database.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*), count(DISTINCT sha256) FROM images").one() == \
               conn.exec_driver_sql("SELECT count(*), count(*) FROM image_hashes").one()


def _statement(db: Imgdb, vector: np.ndarray, k: int, candidates: int) -> tuple[str, dict]:
    """The statement a search by vector runs on the default index, as imgdb builds it."""
    class Recorder:
        def execute(self, sql: str, params: dict | None = None, binary: bool = False):  # noqa: ANN202
            if sql.startswith("SELECT images.id"):
                raise _Seen(sql, params)

        def transaction(self):  # noqa: ANN202
            from contextlib import nullcontext

            return nullcontext()

    index = db.catalog.layer.record("default")
    try:
        search.nearest(Recorder(), index, vector, k, candidates, settings={"hnsw.ef_search": str(candidates)})
    except _Seen as seen:
        return seen.sql, seen.params
    raise AssertionError("no statement")


class _Seen(Exception):
    def __init__(self, sql: str, params: dict | None) -> None:
        self.sql, self.params = sql, params


def test_a_search_is_one_statement_each_shard_answers_with_its_own_index(on_cluster: Imgdb) -> None:
    somewhere = np.full(on_cluster.index().dim, 0.03, np.float32)
    vector = on_cluster.embed("id:" + str(on_cluster.search(somewhere, k=1)[0].id))
    sql, params = _statement(on_cluster, vector, 5, 40)
    index = on_cluster.index()
    # (The vector as a literal: Citus cannot send an EXPLAIN's untyped parameter on to the workers.)
    literal = "'[" + ",".join(f"{x:.9g}" for x in params["q"].tolist()) + "]'::vector"

    def explain(conn):  # noqa: ANN001, ANN202
        conn.execute("SET citus.explain_all_tasks = on")
        return "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql.replace("%(q)s", literal)).fetchall())

    plan = on_cluster.database.searching(explain)
    assert plan.count("->  Task") == SHARDS and "Distributed Subplan" not in plan, plan
    assert plan.count(f"Index Scan using {index.ann_index}_") == SHARDS, plan  # each shard's own HNSW index
    assert plan.count("Index Scan using pk_images_") == SHARDS, plan  # its own image rows: co-located


def test_the_query_settings_reach_every_shard(on_cluster: Imgdb, client) -> None:  # noqa: ANN001
    """SET on the coordinator never reaches the workers; a search's settings do, and recall rises
    with the candidates asked for on the cluster as it does on one node."""
    index = on_cluster.index()

    def seen_by_the_shards(conn):  # noqa: ANN001, ANN202
        with search._settings_for(conn, index, {"hnsw.ef_search": "123"}):
            return conn.execute(f'SELECT DISTINCT current_setting(\'hnsw.ef_search\') FROM "{index.vectors_table}"'
                                " WHERE image_id > 0").fetchall()

    assert on_cluster.database.searching(seen_by_the_shards) == [("123",)]
    rng = np.random.default_rng(5)
    base = rng.normal(size=(6000, 24)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[rng.choice(len(base), 40, replace=False)] + rng.normal(scale=0.2, size=(40, 24)).astype(np.float32)
    truth = np.argsort(((queries[:, None] - base[None]) ** 2).sum(-1), axis=1)[:, :10]
    found = {}
    for name, db in (("cluster", on_cluster), ("one node", client)):
        ids = np.asarray(_placeholders(db, len(base)))
        db.create_index("random24", "external/dim=24", ann="hnsw/m=4/ef_construction=8/ef_search=10")
        db.add_vectors(ids, base, index="random24")
        row_of = {int(i): r for r, i in enumerate(ids)}
        for candidates in (10, 300):
            hits = [[row_of[h.id] for h in db.search(q, k=10, index="random24", candidates=candidates)] for q in queries]
            found[name, candidates] = float(np.mean([len(set(h) & set(t)) / 10 for h, t in zip(hits, truth)]))
        db.drop_index("random24")
    assert found["cluster", 300] >= 0.95 and found["one node", 300] >= 0.85, found  # (a sparse graph: m=4)
    assert found["cluster", 300] > found["cluster", 10] + 0.02, found  # the setting made a difference there
    assert found["cluster", 10] >= found["one node", 10] - 0.02, found  # (each shard searched its own graph)


def _placeholders(db: Imgdb, n: int) -> list[int]:
    rows = [(f"random://{i}", ImageFacts(hashlib.sha256(f"random24/{i}".encode()).hexdigest(), 1, 1, "RANDOM", 0,
                                         None, None), {}) for i in range(n)]
    with db.database.engine.begin() as conn:
        return images.upsert(conn, rows)


def test_retrieval_through_the_cluster_equals_one_node(on_cluster: Imgdb, client, museum_sample: Path,  # noqa: ANN001
                                                       sample_index: str) -> None:
    here = client.evaluate(museum_sample, index=sample_index).to_json()
    there = on_cluster.evaluate(museum_sample).to_json()
    assert there["queries"] == here["queries"] > 0
    assert {k: there[k] for k in ("mAP", "recall@1", "recall@10")} == {k: here[k] for k in ("mAP", "recall@1", "recall@10")}


def test_delete_and_indexes_made_after_distributing(on_cluster: Imgdb, museum_sample: Path) -> None:
    photo = sorted((museum_sample / "images").glob("*.jpg"))[7]
    created = on_cluster.create_index("colors", "color:hsv", ann="pq")
    assert created.vectors_table in on_cluster.distribute()["distributed"]
    on_cluster.ingest([museum_sample / "images"], index="colors")
    hit = on_cluster.search(photo, index="colors", k=1)[0]
    assert hit.uri == str(photo) and hit.distance < 1e-5
    assert on_cluster.delete([hit.id]) == 1
    assert all(h.id != hit.id for h in on_cluster.search(photo, index="colors", k=5))
    assert all(h.id != hit.id for h in on_cluster.search(photo, k=5))
    report = on_cluster.ingest([photo], index="colors")  # its content is new again
    assert report.added == 1 and on_cluster.search(photo, index="colors", k=1)[0].distance < 1e-5
    result = CliRunner().invoke(app, ["db", "status", "--json"], env={"IMGDB_DATABASE_URL": on_cluster.database.url})
    assert result.exit_code == 0 and json.loads(result.stdout)["cluster"]["shards"] == SHARDS


def test_every_method_reranker_and_query_kind_answers_as_on_one_node(on_cluster: Imgdb, client,  # noqa: ANN001
                                                                     museum_sample: Path, tmp_path: Path) -> None:
    """Each ANN method (the Python-side ones reading their codes from the shards), the re-rankers,
    fusion, filters and queries by id rank the sample as the same index on one node does; rebuild,
    verification, re-encoding with a new codebook and export/import work on distributed vectors,
    and so does the HTTP API."""
    gallery = sorted((museum_sample / "images").glob("*.jpg"))
    author = json.loads((museum_sample / "metadata.json").read_text())[f"images/{gallery[0].name}"]["author"]
    queries = gallery[::7]

    def ranked(db: Imgdb, index: str, **options: object) -> list[list[str]]:
        return [[h.uri for h in db.search(q, k=5, index=index, **options)] for q in queries]

    for method in BUILTIN:
        name = f"cluster_{method}"
        for db in (on_cluster, client):
            db.create_index(name, "color:hsv", ann=method)
            assert db.ingest([museum_sample / "images"], index=name, metadata_file=museum_sample / "metadata.json").added == len(gallery)
        assert ranked(on_cluster, name) == ranked(client, name), method
    for options in ({"rerank": "none"}, {"rerank": "exact,qe"}, {"rerank": "exact,dba"},
                    {"filters": [f"meta.author={author}"]}, {"index": "cluster_hnsw,cluster_ivfpq"}):
        options = {"index": "cluster_hnsw", **options}
        assert ranked(on_cluster, **options) == ranked(client, **options), options
    by_id = on_cluster.search(gallery[0], k=1, index="cluster_hnsw")[0]
    assert on_cluster.search(f"id:{by_id.id}", k=1, index="cluster_hnsw")[0].id == by_id.id

    rebuilt = on_cluster.rebuild_index("cluster_hnsw", "ivfflat/lists=4/probes=4")
    assert rebuilt.ann.startswith("ivfflat") and ranked(on_cluster, "cluster_hnsw") == ranked(client, "cluster_hnsw")
    report = on_cluster.verify_index("cluster_lsh", "orb/keypoints=300")
    assert report.added == len(gallery) and not report.failed
    hit = on_cluster.search(gallery[5], k=1, index="cluster_lsh", rerank="exact,verify")[0]
    assert hit.uri == str(gallery[5]) and hit.notes["verified"]
    on_cluster.create_index("cluster_vlad", "vlad:rootsift/k=16/side=480/max=800")
    assert on_cluster.ingest([museum_sample / "images"], index="cluster_vlad").added == len(gallery)
    reencoded = on_cluster.train("cluster_vlad")  # (a new codebook; every image re-encoded into a table swapped in)
    assert reencoded.added == len(gallery) and not reencoded.failed
    assert on_cluster.index("cluster_vlad").vectors_table in on_cluster.distribute()["distributed"]
    assert on_cluster.search(gallery[4], k=1, index="cluster_vlad")[0].uri == str(gallery[4])
    on_cluster.export_index("cluster_pq", tmp_path / "pq.imgdb")
    on_cluster.import_index(tmp_path / "pq.imgdb", name="cluster_pq_again")
    assert on_cluster.index("cluster_pq_again").vectors_table in on_cluster.distribute()["distributed"]
    assert ranked(on_cluster, "cluster_pq_again") == ranked(client, "cluster_pq")

    from fastapi.testclient import TestClient

    from imgdb.web.app import create_app

    with TestClient(create_app(on_cluster)) as api:
        photo = gallery[9]
        response = api.post("/search", params={"k": 3, "index": "cluster_kdtree"},
                            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
        assert response.status_code == 200 and response.json()[0]["uri"] == str(photo)
    for db in (on_cluster, client):
        for index in [i.name for i in db.indexes() if i.name.startswith("cluster_")]:
            db.drop_index(index)
