"""Evaluation: average precision on hand-made rankings, the data-set protocol (junk, queries inside
the gallery, extra keys), and retrieval quality of both extractors on the real museum photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imgdb.jobs.evaluate import average_precision


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        ([1, 0, 0], 1.0),
        ([0, 1, 0], 0.5),
        ([0, 0, 0], 0.0),
        ([1, 0, 1, 0], (1 / 1 + 2 / 3) / 2),
        ([0, 1, 1], (1 / 2 + 2 / 3) / 2),
    ],
)
def test_average_precision_by_hand(mask: list[int], expected: float) -> None:
    assert average_precision(np.array(mask, dtype=bool)) == pytest.approx(expected)


def test_protocol_junk_self_and_extra_keys(client, museum: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """A gallery query is left out of its own ranking, junk is removed before scoring, and extra
    query keys reach the per-query output."""
    (tmp_path / "images").mkdir()
    names = [f"bbdd_{i:05d}.jpg" for i in (50, 51, 52, 53)]
    for name in names:
        (tmp_path / "images" / name).symlink_to(museum / "images" / name)
    client.create_index("protocol", "color:hsv")
    # Rank everything once to learn the true order for images/bbdd_00050.jpg.
    client.ingest([tmp_path / "images"], index="protocol")
    hits = client.search(tmp_path / "images" / names[0], index="protocol", k=4)
    order = [Path(h.uri).name for h in hits]
    assert order[0] == names[0]
    nearest, second = order[1], order[2]
    queries = [
        # The nearest other image is junk, the second relevant: with junk removed it ranks first.
        {"query": f"images/{names[0]}", "relevant": [f"images/{second}"], "junk": [f"images/{nearest}"],
         "transform": "none"},
    ]
    (tmp_path / "queries.json").write_text(json.dumps(queries))
    report = client.evaluate(tmp_path, index="protocol")
    assert report.queries == 1 and report.mAP == 1.0 and report.recall_at_1 == 1.0
    row = report.per_query[0]
    assert row["transform"] == "none" and row["first_relevant_rank"] == 1
    assert f"images/{names[0]}" not in row["top"] and f"images/{nearest}" not in row["top"]


def test_recall_counts_one_relevant_image_and_all_counts_every_one(client, museum: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """recall@k as the literature has it (a relevant image among the first k), and all@k, the
    stricter count for a query with several relevant images (every one of them in)."""
    (tmp_path / "images").mkdir()
    names = [f"bbdd_{i:05d}.jpg" for i in (60, 61, 62, 63, 64, 65)]
    for name in names:
        (tmp_path / "images" / name).symlink_to(museum / "images" / name)
    client.create_index("counts", "color:hsv")
    client.ingest([tmp_path / "images"], index="counts")
    order = [Path(h.uri).name for h in client.search(tmp_path / "images" / names[0], index="counts", k=6)][1:]
    # Relevant: the nearest other image and the farthest: one is first, the other fifth.
    queries = [{"query": f"images/{names[0]}", "relevant": [f"images/{order[0]}", f"images/{order[4]}"]}]
    (tmp_path / "queries.json").write_text(json.dumps(queries))
    report = client.evaluate(tmp_path, index="counts")
    assert (report.recall_at_1, report.all_at_1) == (1.0, 0.0)
    assert (report.recall_at_10, report.all_at_10) == (1.0, 1.0)
    row = report.per_query[0]
    assert (row["first_relevant_rank"], row["found_rank"]) == (1, 4)  # (the fifth, less one place the other took)
    assert {"recall@1": 1.0, "all@1": 0.0}.items() <= report.to_json().items()


@pytest.fixture(scope="module")
def museum_scores(client, museum: Path) -> dict[str, float]:  # noqa: ANN001
    client.create_index("museum_cnn")  # the default extractor
    client.create_index("museum_color", "color:hsv")
    return {name: client.evaluate(museum, index=name) for name in ("museum_cnn", "museum_color")}


def test_cnn_default_finds_the_painting_first_for_nine_queries_in_ten(museum_scores) -> None:  # noqa: ANN001
    cnn = museum_scores["museum_cnn"]
    assert cnn.queries == 60
    assert cnn.recall_at_1 >= 0.9
    assert cnn.mAP >= 0.92


def test_colour_histogram_is_clearly_worse_than_the_cnn(museum_scores) -> None:  # noqa: ANN001
    cnn, color = museum_scores["museum_cnn"], museum_scores["museum_color"]
    assert color.mAP < cnn.mAP - 0.2
    assert color.recall_at_1 < cnn.recall_at_1 - 0.2

