"""Every ANN method through the ordinary flow (create, ingest the museum gallery, search), and a method
and a re-ranker from outside imgdb, registered by an entry point and used from the CLI with no other
edit; and the first stage an index gets when it names none."""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import imgdb
from imgdb import Imgdb
from imgdb.ann.method import SAMPLE_BYTES
from imgdb.ann.registry import BUILTIN, STATE_OWNER, check, default_for, method, parse_ann
from imgdb.db import state, vectors
from tests.conftest import tool_env

#: Query photos per method, and how many of them must find an exact scan's top hit first.
QUERIES, AGREEING = 20, 18


@pytest.fixture(scope="module")
def gallery_db(client, new_database) -> Iterator[Imgdb]:  # noqa: ANN001
    """A database of its own: the whole gallery goes in, and other tests' images stay as they were."""
    with imgdb.connect(new_database("every_method"), settings=client.settings) as db:
        yield db


@pytest.mark.parametrize("method", list(BUILTIN))
def test_every_method_finds_the_exact_top_hit_in_the_ordinary_flow(gallery_db: Imgdb, museum: Path,
                                                                   method: str) -> None:
    """Created empty, then filled by an ingest too small to rebuild anything (the flow that left
    binary quantization with a centre learned from an empty table, and random Hamming rankings)."""
    client, name = gallery_db, f"every_{method}"
    client.create_index(name, ann=method)
    report = client.ingest([museum / "images"], index=name)
    assert report.added == len(list((museum / "images").glob("*.jpg"))) and not report.failed
    index = client.index(name)
    # (encoded by this index: the default extractor learns its codebook from each index's first load)
    photos = sorted((museum / "queries").glob("*.jpg"))[:QUERIES]
    query_vectors = np.stack([client.embed(photo, index=name) for photo in photos])
    with client.database.connect() as conn:
        ids, gallery = vectors.read(conn, index)
    exact = ids[np.argmin(np.linalg.norm(gallery[None, :, :] - query_vectors[:, None, :], axis=2), axis=1)]
    found = np.asarray([client.search(q, k=1, index=name, rerank="exact")[0].id for q in query_vectors])
    assert int((found == exact).sum()) >= AGREEING, (method, found.tolist(), exact.tolist())
    if method == "bq":  # learned from the data: the collection's mean, not the zeros of an empty table
        with client.database.connect() as conn:
            center = state.load(conn, index, STATE_OWNER)["center"]
        np.testing.assert_allclose(center, gallery.mean(axis=0), atol=1e-5)
        assert np.abs(center).max() > 0
    client.drop_index(name)


TOY = '''
"""A first stage and a re-ranker from outside imgdb: the L1 (Manhattan) distance, in numpy."""

import numpy as np

from imgdb.ann.codes import CodesMethod
from imgdb.ann.method import CodeIndex, Searcher
from imgdb.query.parts import Probe, Ranking, Reranker


class Manhattan(CodesMethod):
    name = "manhattan"
    summary = "a toy: every vector by L1 distance, in numpy"
    defaults = {"shortlist": 100}
    approximate = True

    def check(self, params, dim, storage):
        self.require(params["shortlist"] >= 1, "manhattan: shortlist must be at least 1")

    def code_index(self, ann, dim, state):
        return Flat()


class Flat(CodeIndex):
    def searcher(self, ids, data):
        return L1(ids, data)


class L1(Searcher):
    def __init__(self, ids, data):
        super().__init__(ids)
        self.data = data

    def _search(self, query, n):
        distances = np.abs(self.data - query).sum(axis=1)
        order = np.argsort(distances, kind="stable")[:n]
        return order, distances[order].astype(np.float32)


class Backwards(Reranker):
    name = "backwards"
    summary = "a toy: the ranking it is given, worst first"

    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking:
        return Ranking(ranking.ids[::-1].copy(), ranking.distances[::-1].copy(), ranking.notes)
'''


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding an installed distribution (its module and its ``dist-info``) that registers
    an ANN method and a re-ranker under imgdb's entry-point groups."""
    root = tmp_path_factory.mktemp("toy-package")
    (root / "toy_ann.py").write_text(textwrap.dedent(TOY))
    info = root / "toy_ann-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-ann\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[imgdb.ann_methods]\nmanhattan = toy_ann:Manhattan\n\n"
                                           "[imgdb.rerankers]\nbackwards = toy_ann:Backwards\n")
    return root


def test_a_registered_method_and_reranker_work_from_the_cli_with_no_other_edit(gallery_db: Imgdb, museum_sample: Path,
                                                                              toy_package: Path) -> None:
    client = gallery_db
    env = tool_env(PYTHONPATH=str(toy_package), IMGDB_DATABASE_URL=client.database.url)

    def imgdb(*args: str) -> str:
        done = subprocess.run(["imgdb", *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "manhattan (a toy" in imgdb("index", "create", "--help")
    assert "backwards: a toy" in imgdb("search", "--help")
    created = json.loads(imgdb("index", "create", "toy", "--extractor", "color:hsv", "--ann", "manhattan/shortlist=7",
                               "--json"))
    assert (created["ann"], created["ann_params"]) == ("manhattan", {"shortlist": 7})
    photos = sorted((museum_sample / "images").glob("*.jpg"))[:12]
    assert json.loads(imgdb("ingest", *map(str, photos), "--index", "toy", "--json"))["added"] == 12
    # The first stage's own distances are L1 ones: the method ranked them.
    hits = json.loads(imgdb("search", str(photos[3]), "--index", "toy", "--rerank", "none", "-k", "3", "--json"))
    query = client.embed(photos[3], index="toy")
    stored = {h["id"]: client.embed(f"id:{h['id']}", index="toy") for h in hits}
    # (the image's first uri: the gallery was ingested from elsewhere before)
    assert Path(hits[0]["uri"]).name == photos[3].name and hits[0]["distance"] < 1e-5
    np.testing.assert_allclose([h["distance"] for h in hits],
                               [np.abs(stored[h["id"]] - query).sum() for h in hits], rtol=1e-4)
    # The registered re-ranker runs in a chain after the exact re-rank.
    backwards = json.loads(imgdb("search", str(photos[3]), "--index", "toy", "--rerank", "exact,backwards",
                                 "--candidates", "3", "-k", "3", "--json"))
    assert [h["id"] for h in backwards] == [h["id"] for h in json.loads(imgdb(
        "search", str(photos[3]), "--index", "toy", "--candidates", "3", "-k", "3", "--json"))][::-1]
    client.drop_index("toy")


@pytest.mark.parametrize(("dim", "storage", "expected"), [
    (1920, "vector", "hnsw"), (8192, "vector", "ivfpq/m=256"), (3968, "vector", "ivfpq/m=248"),
    (3072, "halfvec", "hnsw"), (8192, "halfvec", "ivfpq/m=256")])
def test_an_index_created_without_ann_gets_a_first_stage_that_takes_its_length(dim: int, storage: str,
                                                                                expected: str) -> None:
    chosen = default_for(dim, storage)
    assert chosen == expected
    check(parse_ann(chosen), dim, storage)  # (and it is one the index can have)


def test_long_vectors_are_learned_from_a_sample_bounded_in_bytes() -> None:
    ivfpq = method("ivfpq")
    assert ivfpq.sample_rows(1920) == ivfpq.max_sample  # (the default extractor's: as before)
    assert ivfpq.sample_rows(8192) * 8192 * 4 == SAMPLE_BYTES
