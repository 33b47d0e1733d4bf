"""The query path as a composition: first stage, a chain of re-rankers, the join last."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import imgdb
from imgdb.errors import ImgdbError
from imgdb.query import registry
from imgdb.query.parts import Probe, Ranking, Reranker


class Reverse(Reranker):
    """A re-ranker from outside imgdb's own modules: the ranking it is given, worst first."""

    name = "reverse"
    summary = "worst first"

    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking:
        return Ranking(ranking.ids[::-1].copy(), ranking.distances[::-1].copy())


class Same(Reranker):
    name = "same"
    summary = "the order it is given"

    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking:
        return ranking


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.BUILTIN, "reverse", f"{__name__}:Reverse")
    monkeypatch.setitem(registry.BUILTIN, "same", f"{__name__}:Same")


def test_a_chain_through_the_parts_answers_as_the_single_statement(client, sample_index: str,  # noqa: ANN001
                                                                  sample_ids: list[int], registered: None) -> None:
    query = f"id:{sample_ids[2]}"
    fast = client.search(query, k=5, index=sample_index)  # one statement: HNSW + exact + join
    composed = client.search(query, k=5, index=sample_index, rerank="same")  # exact, same, then the join
    assert [h.id for h in composed] == [h.id for h in fast] and fast[0].id == sample_ids[2]
    assert [h.metadata for h in composed] == [h.metadata for h in fast]
    np.testing.assert_allclose([h.distance for h in composed], [h.distance for h in fast], atol=1e-5)
    reversed_ = client.search(query, k=5, index=sample_index, rerank="exact,reverse", candidates=5)
    assert [h.id for h in reversed_] == [h.id for h in fast][::-1]


def test_filters_apply_to_a_composed_ranking(client, sample_index: str, sample_ids: list[int],  # noqa: ANN001
                                             registered: None) -> None:
    query = f"id:{sample_ids[0]}"
    author = client.search(query, k=1, index=sample_index)[0].metadata["author"]
    hits = client.search(query, k=3, index=sample_index, rerank="same", filters=[f"meta.author!={author}"])
    assert len(hits) == 3 and all(h.metadata.get("author") != author for h in hits)


def test_bad_chains_are_refused_with_the_reason() -> None:
    for chain, message in [("exact,pq", "can only come first"), ("bogus", "unknown re-rank"),
                           (",".join(["exact"] * 9), "at most 8")]:
        with pytest.raises(ImgdbError, match=message):
            registry.rerankers(chain)
    assert [r.name for r in registry.rerankers("none")] == ["none"]


def test_the_database_layer_knows_sql_only() -> None:
    """imgdb.db imports nothing of the index layer, the query parts or the extractors."""
    for path in (Path(imgdb.__file__).parent / "db").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("imgdb.ann", "imgdb.query", "imgdb.features")), f"{path.name} imports {name}"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_query_expansion_and_augmentation_rank_as_their_formulas(client, sample_index: str,  # noqa: ANN001
                                                                 sample_ids: list[int]) -> None:
    from imgdb.db import search as sql
    from imgdb.query import expansion

    query = f"id:{sample_ids[4]}"
    base = client.search(query, k=10, index=sample_index, candidates=10)
    ids = [h.id for h in base]
    stored = client.database.searching(lambda conn: sql.stored_vectors(conn, client.index(sample_index), ids))
    x = np.stack([stored[i] for i in ids])
    q = stored[sample_ids[4]]
    top = x[: expansion.TOP]
    weights = np.clip(top @ q, 0, None) ** expansion.ALPHA
    similarity = x @ x.T
    neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, : expansion.TOP + 1]
    augmented = _unit(np.stack([(np.clip(similarity[i, n], 0, None)[:, None] ** expansion.ALPHA * x[n]).sum(0)
                                for i, n in enumerate(neighbours)]))
    expected = {"qe": _unit(q + top.sum(0)), "aqe": _unit(q + (weights[:, None] * top).sum(0))}
    for name, expanded in expected.items():
        hits = client.search(query, k=10, index=sample_index, candidates=10, rerank=name)
        distances = np.linalg.norm(x - expanded, axis=1)
        assert [h.id for h in hits] == [ids[i] for i in np.argsort(distances, kind="stable")], name
        np.testing.assert_allclose([h.distance for h in hits], np.sort(distances), atol=1e-4)
    hits = client.search(query, k=10, index=sample_index, candidates=10, rerank="dba")
    assert [h.id for h in hits] == [ids[i] for i in np.argsort(np.linalg.norm(augmented - q, axis=1), kind="stable")]


@pytest.fixture(scope="module")
def colour_index(client, museum_sample: Path, sample_index: str) -> str:  # noqa: ANN001
    """A second index of the same images, with another descriptor, to fuse with the CNN's."""
    client.create_index("fuse_colour", "color:hsv")
    client.ingest([museum_sample / "images"], index="fuse_colour")
    return "fuse_colour"


def test_fusion_of_two_indexes_is_reciprocal_rank_or_mean_distance(client, sample_index: str,  # noqa: ANN001
                                                                   colour_index: str, sample_ids: list[int]) -> None:
    from typer.testing import CliRunner

    from imgdb.query import fusion
    from imgdb_cli.main import app

    query = f"id:{sample_ids[7]}"
    alone = {name: client.search(query, k=fusion.DEPTH, index=name) for name in (sample_index, colour_index)}
    rrf: dict[int, float] = {}
    for hits in alone.values():
        for rank, hit in enumerate(hits, start=1):
            rrf[hit.id] = rrf.get(hit.id, 0.0) + 1 / (fusion.RRF_K + rank)
    fused = client.search(query, k=5, index=f"{sample_index},{colour_index}")
    assert [h.id for h in fused] == sorted(rrf, key=lambda i: -rrf[i])[:5] and fused[0].id == sample_ids[7]
    assert fused[0].distance == pytest.approx(0.0) and fused[0].notes["ranks"] == {sample_index: 1, colour_index: 1}
    mean: dict[int, list[float]] = {}
    for hits in alone.values():
        low, high = hits[0].distance, max(h.distance for h in hits)
        for hit in hits:
            mean.setdefault(hit.id, []).append((hit.distance - low) / (high - low))
    score = {i: (sum(v) + 2 - len(v)) / 2 for i, v in mean.items()}
    by_mean = client.search(query, k=5, index=f"{sample_index},{colour_index}", fusion="mean")
    assert [h.id for h in by_mean] == sorted(score, key=lambda i: score[i])[:5]
    cli = CliRunner().invoke(app, ["search", query, "--index", f"{sample_index},{colour_index}", "-k", "3", "--json"])
    assert cli.exit_code == 0, cli.output
    assert [h["id"] for h in json.loads(cli.output)] == [h.id for h in fused[:3]]
    for index, fusion_method, message in [(f"{sample_index},{sample_index}", "rrf", "named twice"),
                                          (f"{sample_index},{colour_index}", "max", "unknown fusion")]:
        with pytest.raises(ImgdbError, match=message):
            client.search(query, index=index, fusion=fusion_method)


def test_the_query_path_imports_no_opencv_until_it_verifies() -> None:
    """Local features and their drawing load OpenCV only when a query verifies or explains."""
    code = "import sys, imgdb.client, imgdb_cli.main; print('cv2' in sys.modules, 'torch' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.split() == ["False", "False"]
