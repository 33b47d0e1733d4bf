"""Search by image on real photos: stored ids, query photos, filters, URLs, and refusals."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from imgdb.client import Imgdb
from imgdb.errors import FetchError, FilterError, ImgdbError
from tests.conftest import copy_image


@pytest.fixture(scope="module")
def queries(museum_sample: Path) -> list[dict]:
    return json.loads((museum_sample / "queries.json").read_text())


def test_id_query_finds_itself_first(client, sample_ids: list[int]) -> None:  # noqa: ANN001
    for image_id in (sample_ids[0], sample_ids[5], sample_ids[17]):
        hits = client.search(f"id:{image_id}", k=3)
        assert hits[0].id == image_id and hits[0].distance < 1e-4
        assert hits[1].distance >= hits[0].distance


def test_query_photos_find_their_painting(client, sample_index: str, museum_sample: Path, queries) -> None:  # noqa: ANN001
    assert len(queries) >= 5
    first = []
    for query in queries:
        hit = client.search(museum_sample / query["query"], k=1)[0]
        first.append(Path(hit.uri).name == Path(query["relevant"][0]).name)
    assert np.mean(first) >= 0.9, first


def test_author_filter_returns_only_that_author(client, sample_index: str, museum_sample: Path, queries) -> None:  # noqa: ANN001
    metadata = json.loads((museum_sample / "metadata.json").read_text())
    authors = Counter(m["author"] for m in metadata.values() if m["author"])
    author, expected = authors.most_common(1)[0]
    assert expected >= 2
    hits = client.search(museum_sample / queries[0]["query"], k=50, filters=[f"meta.author={author}"])
    assert len(hits) == expected
    assert {h.metadata["author"] for h in hits} == {author}


def test_column_filters_and_ranges(client, sample_ids: list[int]) -> None:  # noqa: ANN001
    hits = client.search(f"id:{sample_ids[0]}", k=100, filters=["width>=500", "format=JPEG"])
    assert hits and len(hits) < 40
    with client.database.connect() as conn:
        widths = dict(conn.exec_driver_sql("SELECT id, width FROM images").all())
    assert all(widths[h.id] >= 500 for h in hits)


def test_quotes_and_semicolons_in_filters_are_just_values(client, sample_ids: list[int]) -> None:  # noqa: ANN001
    assert client.search(f"id:{sample_ids[0]}", filters=["meta.title=O'Brien\"; DROP TABLE images; --"]) == []
    assert client.search(f"id:{sample_ids[0]}", k=1)  # images still there


@pytest.mark.parametrize("bad", ["nonsense", "meta.=x", "color=red", "width>=wide", "taken_at<yesterday"])
def test_bad_filters_are_one_line_errors(client, sample_ids: list[int], bad: str) -> None:  # noqa: ANN001
    with pytest.raises(FilterError) as caught:
        client.search(f"id:{sample_ids[0]}", filters=[bad])
    assert "\n" not in str(caught.value)


def test_url_queries_refuse_loopback_and_work_when_allowed(client, sample_index: str, http_root, museum_sample: Path) -> None:  # noqa: ANN001
    base, folder = http_root
    copy_image(museum_sample / "images" / "bbdd_00007.jpg", folder / "q.jpg")
    with pytest.raises(FetchError, match="loopback"):
        client.search(f"{base}/q.jpg")
    with pytest.raises(FetchError, match="127.0.0.1"):
        client.search("http://127.0.0.1:9/x.jpg")
    trusting = Imgdb(client.database, replace(client.settings, fetch=replace(client.settings.fetch,
                                                                              allow_private=True)))
    hit = trusting.search(f"{base}/q.jpg", k=1)[0]
    with pytest.raises(FetchError, match="connection refused"):
        trusting.search("http://127.0.0.1:9/x.jpg")
    assert Path(hit.uri).name == "bbdd_00007.jpg" and hit.distance < 1e-4


def test_unreachable_url_is_a_one_line_error(client, sample_index: str) -> None:  # noqa: ANN001
    with pytest.raises(FetchError, match="cannot resolve") as caught:
        client.search("http://does-not-exist.invalid/painting.jpg")
    assert "\n" not in str(caught.value)


def test_unknown_id_and_index_are_clear(client, sample_ids: list[int]) -> None:  # noqa: ANN001
    with pytest.raises(ImgdbError, match="not in index"):
        client.search("id:999999")
    with pytest.raises(ImgdbError, match="no index named 'nope'"):
        client.search(f"id:{sample_ids[0]}", index="nope")


def test_a_photo_query_before_the_codebook_is_learned_says_what_to_do(client,  # noqa: ANN001
                                                                     museum_sample: Path) -> None:
    """The default extractor learns from an index's first load: until then a photo cannot be encoded."""
    client.create_index("unlearned")
    try:
        for call in (client.search, client.embed):
            with pytest.raises(ImgdbError, match="'unlearned' has not learned its codebook yet: ingest images into it"):
                call(museum_sample / "images" / "bbdd_00002.jpg", index="unlearned")
    finally:
        client.drop_index("unlearned")


def test_embed_matches_the_stored_vector(client, sample_ids: list[int], museum_sample: Path) -> None:  # noqa: ANN001
    path = museum_sample / "images" / "bbdd_00002.jpg"
    stored = client.embed(f"id:{sample_ids[2]}")
    fresh = client.embed(path)
    assert fresh.shape == stored.shape == (client.index().dim,)
    assert abs(np.linalg.norm(fresh) - 1) < 1e-5
    np.testing.assert_allclose(fresh, stored, atol=1e-5)
