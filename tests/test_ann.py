"""The index layer on real vectors: PQ / IVF-PQ / OPQ / LSH / KD-tree first stages against exact
search, codes kept current through adds and deletes, pgvector's halfvec and binary quantization,
rebuilds, and the search options."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from imgdb.ann.registry import STATE_OWNER
from imgdb.db import images, pgvector, state, vectors
from imgdb.errors import ImgdbError
from imgdb.io.reader import ImageFacts
from imgdb_cli.main import app

QUERIES = 60


@pytest.fixture(scope="module")
def sift(museum_sample: Path) -> tuple[np.ndarray, np.ndarray]:
    """Real SIFT descriptors of museum paintings (the base) and of a query photo (the queries)."""
    detector = cv2.SIFT_create()

    def describe(path: Path) -> np.ndarray:
        found = detector.detectAndCompute(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), None)[1]
        return np.empty((0, 128), np.float32) if found is None else found  # a flat painting has none

    paintings = sorted((museum_sample / "images").glob("*.jpg"))[:6]
    base = np.concatenate([describe(p) for p in paintings])[:6000]
    assert len(base) == 6000
    photo = describe(sorted((museum_sample / "queries").glob("*.jpg"))[0])
    queries = photo[np.random.default_rng(0).choice(len(photo), QUERIES, replace=False)]
    return base.astype(np.float32), queries.astype(np.float32)


def placeholder_images(client, tag: str, n: int) -> list[int]:  # noqa: ANN001
    """Image rows to hang externally computed vectors on (one per descriptor)."""
    rows = [(f"sift://{tag}/{i}", ImageFacts(hashlib.sha256(f"{tag}/{i}".encode()).hexdigest(), 1, 1, "SIFT", 0,
                                              None, None), {"tag": tag, "half": i % 2}) for i in range(n)]
    with client.database.engine.begin() as conn:
        return images.upsert(conn, rows)


def exact_top(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    distances = ((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1)
    return ids[np.argsort(distances, axis=1)[:, :k]]


def recall(client, index: str, queries: np.ndarray, truth: np.ndarray, **options) -> float:  # noqa: ANN001
    found = [[h.id for h in client.search(q, k=10, index=index, **options)] for q in queries]
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth.tolist())]))


def make_index(client, sift, name: str, ann: str, storage: str = "vector") -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    base, queries = sift
    client.create_index(name, "external/dim=128", ann=ann, storage=storage)
    ids = np.asarray(placeholder_images(client, "base", len(base)))
    assert client.add_vectors(ids, base, index=name) == len(base)
    return ids, exact_top(base, ids, queries)


@pytest.mark.parametrize(("ann", "floor"), [("pq", 0.95), ("pq/opq=1", 0.95), ("ivfpq/lists=32/probes=8", 0.9),
                                            ("lsh", 0.9), ("kdtree", 1.0)])
def test_python_side_first_stage_with_exact_rerank_finds_the_true_neighbours(client, sift, ann: str, floor: float) -> None:  # noqa: ANN001
    name = "s_" + ann.split("/")[0] + ("_opq" if "opq" in ann else "")
    ids, truth = make_index(client, sift, name, ann)
    assert recall(client, name, sift[1], truth) >= floor
    # Without the re-rank the first stage alone is approximate, but not useless.
    assert recall(client, name, sift[1], truth, rerank="none") >= (0.99 if ann == "kdtree" else 0.3)


def test_pq_codes_in_postgres_are_faiss_codes_and_ranking_is_adc(client, sift) -> None:  # noqa: ANN001
    base, queries = sift
    ids, truth = make_index(client, sift, "pq_check", "pq")
    index = client.index("pq_check")
    with client.database.connect() as conn:
        stored_ids, blob = vectors.read_codes(conn, index)
        quantizer = faiss.deserialize_index(state.load(conn, index, STATE_OWNER)["faiss"])
    assert quantizer.sa_code_size() == 128 * 4 // 16  # 1/16 of the float32 vector
    order = np.argsort(ids)
    codes = np.frombuffer(blob, np.uint8).reshape(len(stored_ids), -1)
    assert np.array_equal(stored_ids, ids[order]) and np.array_equal(codes, quantizer.sa_encode(base[order]))
    # `--rerank pq` reports asymmetric distances: the query against each code's reconstruction.
    hits = client.search(queries[0], k=5, index="pq_check", rerank="pq")
    decoded = quantizer.sa_decode(codes)
    position = {int(i): p for p, i in enumerate(stored_ids)}
    adc = [float(np.linalg.norm(queries[0] - decoded[position[h.id]])) for h in hits]
    assert np.allclose([h.distance for h in hits], adc, rtol=1e-3)
    assert adc == sorted(adc)
    # Exact re-rank reports true distances.
    row_of = {int(i): r for r, i in enumerate(ids)}
    exact = client.search(queries[0], k=5, index="pq_check")
    assert np.allclose([h.distance for h in exact],
                       [np.linalg.norm(queries[0] - base[row_of[h.id]]) for h in exact], rtol=1e-4)


def test_codes_follow_adds_and_deletes(client, sift) -> None:  # noqa: ANN001
    base, queries = sift
    ids, _ = make_index(client, sift, "churn", "ivfpq/lists=16/probes=16")
    before = client.search(queries[0], k=10, index="churn")  # loads the searcher
    # Add: the new rows get codes at write time, and a query equal to one finds it first.
    fresh = np.asarray(placeholder_images(client, "fresh", 300))
    extra = base[:300] * np.float32(0.5) + np.float32(3.0)
    assert client.add_vectors(fresh, extra, index="churn") == 300
    index = client.index("churn")
    with client.database.connect() as conn:
        coded, _ = vectors.read_codes(conn, index)
        assert set(fresh.tolist()) <= set(coded.tolist())
        assert vectors.read(conn, index, without_codes=True)[0].size == 0
    assert client.search(extra[7], k=1, index="churn")[0].id == fresh[7]
    # Delete: the nearest images go, and no query returns them any more.
    gone = [h.id for h in before[:5]] + [int(fresh[7])]
    assert client.delete(gone) == len(gone)
    after = client.search(queries[0], k=10, index="churn")
    assert not {h.id for h in after} & set(gone) and len(after) == 10
    assert client.search(extra[7], k=1, index="churn")[0].id != fresh[7]


def test_rows_written_by_plain_sql_are_searchable_before_they_get_codes(client, sift) -> None:  # noqa: ANN001
    base, queries = sift
    make_index(client, sift, "by_sql", "pq")
    client.search(queries[0], k=1, index="by_sql")
    [new_id] = placeholder_images(client, "sql", 1)
    target = queries[3] * 0.5
    table = client.index("by_sql").vectors_table
    with client.database.engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {table} (image_id, embedding) VALUES (%s, %s)",
                             (new_id, "[" + ",".join(map(str, target.tolist())) + "]"))
    assert client.search(target, k=1, index="by_sql")[0].id == new_id


def test_filters_apply_to_python_side_candidates_and_never_cost_results(client, sift) -> None:  # noqa: ANN001
    make_index(client, sift, "filtered_pq", "pq")
    hits = client.search(sift[1][0], k=10, index="filtered_pq", filters=["meta.half=1"])
    assert len(hits) == 10 and all(h.metadata["half"] == 1 for h in hits)
    distances = [h.distance for h in hits]
    assert distances == sorted(distances)


def test_halfvec_hnsw_and_binary_quantization(client, sift) -> None:  # noqa: ANN001
    base, queries = sift
    ids, truth = make_index(client, sift, "half", "hnsw", storage="halfvec")
    assert recall(client, "half", queries, truth) >= 0.95
    half = client.index("half")
    with client.database.connect() as conn:
        plan = "\n".join(conn.exec_driver_sql(
            f"EXPLAIN SELECT image_id FROM {half.vectors_table} ORDER BY embedding <-> %s::halfvec LIMIT 10",
            ("[" + ",".join(map(str, queries[0].tolist())) + "]",)).scalars())
        size = conn.exec_driver_sql(f"SELECT avg(pg_column_size(embedding)) FROM {half.vectors_table}").scalar_one()
    assert half.ann_index in plan and size == 8 + 2 * 128  # varlena header, dim, 2 bytes per value
    # Binary quantization keeps sign bits around the collection's mean (SIFT values are all >= 0: the
    # bare signs would be nearly constant), re-ranked by the full vectors in the same statement.
    make_index(client, sift, "bits", "bq")
    assert recall(client, "bits", queries, truth, candidates=400) >= 0.9
    with client.database.connect() as conn:
        center = state.load(conn, client.index("bits"), STATE_OWNER)["center"]
    np.testing.assert_allclose(center, base.mean(0), rtol=1e-4)
    hamming = client.search(queries[0], k=5, index="bits", rerank="none")
    mismatches = ((queries[0] > center) != (base > center)).sum(1)
    row_of = {int(i): r for r, i in enumerate(ids)}
    assert [h.distance for h in hamming] == [float(mismatches[row_of[h.id]]) for h in hamming]
    assert hamming[0].distance == mismatches.min()


def test_rebuild_switches_methods_and_rerank_pq_needs_codes(client, sift) -> None:  # noqa: ANN001
    base, queries = sift
    ids, truth = make_index(client, sift, "switch", "hnsw")
    with pytest.raises(ImgdbError, match="needs product-quantization codes"):
        client.search(queries[0], index="switch", rerank="pq")
    info = client.rebuild_index("switch", "ivfpq/lists=16")
    assert info.ann == "ivfpq" and info.ann_params["lists"] == 16 and info.images == len(base)
    index = client.index("switch")
    with client.database.connect() as conn:
        assert not pgvector.has_ann(conn, index)
        assert vectors.read(conn, index, without_codes=True)[0].size == 0
    assert recall(client, "switch", queries, truth) >= 0.9
    client.rebuild_index("switch", "hnsw/ef_search=100")
    with client.database.connect() as conn:
        index = client.index("switch")
        assert pgvector.has_ann(conn, index) and vectors.read_codes(conn, index)[0].size == 0
    assert recall(client, "switch", queries, truth) >= 0.95


def test_small_collections_search_exactly_until_a_quantizer_can_be_trained(client, sift) -> None:  # noqa: ANN001
    base, queries = sift
    client.create_index("tiny", "external/dim=128", ann="ivfpq")
    ids = placeholder_images(client, "tiny", 10)
    client.add_vectors(ids, base[:10], index="tiny")
    hits = client.search(base[3], k=3, index="tiny")
    assert hits[0].id == ids[3] and hits[0].distance < 1e-3 and len(hits) == 3


def test_bad_ann_specs_and_options_are_one_line_errors(client) -> None:  # noqa: ANN001
    for spec, message in [("annoy", "unknown ANN method"), ("hnsw/m=1", "between 2 and 100"),
                          ("pq/bits=4", "bad option"), ("ivfpq/lists=x", "must be an integer")]:
        with pytest.raises(ImgdbError, match=message):
            client.create_index("bad_ann", "color:hsv", ann=spec)
    with pytest.raises(ImgdbError, match="at most 2000 dimensions.*--storage halfvec, --ann bq, pq, ivfpq, lsh"):
        client.create_index("too_wide", "external/dim=3000", ann="hnsw")
    assert client.create_index("too_wide", "external/dim=3000").ann == "ivfpq"  # (asked for nothing: what fits)
    with pytest.raises(ImgdbError, match="unknown storage"):
        client.create_index("bad_storage", "color:hsv", storage="float8")
    client.create_index("wide_half", "external/dim=3000", storage="halfvec")
    with pytest.raises(ImgdbError, match="unknown re-rank"):
        client.search(np.zeros(3000, np.float32), index="wide_half", rerank="best")


def test_cli_index_options(client, sift) -> None:  # noqa: ANN001
    runner = CliRunner()
    created = runner.invoke(app, ["index", "create", "cli_pq", "--extractor", "external/dim=128",
                                  "--ann", "ivfpq/lists=16", "--json"])
    assert created.exit_code == 0, created.output
    assert '"ann": "ivfpq"' in created.stdout and '"lists": 16' in created.stdout
    base, _ = sift
    ids = placeholder_images(client, "base", len(base))
    client.add_vectors(ids, base, index="cli_pq")
    found = runner.invoke(app, ["search", f"id:{ids[10]}", "--index", "cli_pq", "--rerank", "exact",
                                "--candidates", "50", "-k", "3", "--json"])
    assert found.exit_code == 0, found.output
    assert f'"id": {ids[10]}' in found.stdout.split("}")[0]
    rebuilt = runner.invoke(app, ["index", "rebuild", "cli_pq", "--ann", "pq", "--json"])
    assert rebuilt.exit_code == 0 and '"ann": "pq"' in rebuilt.stdout
