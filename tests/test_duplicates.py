"""Duplicates and the calibrated score: an index learns what its distances mean from edited copies
of its own images; hits carry a score and searches a cut-off; ``imgdb duplicates`` groups the same
picture (``near``) apart from the same scene (``similar``) and the same bytes (``exact``), keeps the
groups in SQL, and compares only what is new on the next run.

The collection is real museum paintings: some with edited copies (the library's own edits, drawn
from a fixed seed), two replaced by two overlapping "shots" each, the rest left alone.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgdb.errors import ImgdbError
from imgdb.query.scores import Calibration
from imgdb.training.edits import EDITS
from imgdb_cli.main import app
from tests.conftest import copy_image

#: Paintings given edited copies, and the edits each gets.
EDITED, KINDS = 5, ("reencode", "crop", "rotate", "caption", "inset")
#: Paintings replaced by two shots of the scene.
SCENES = 2
#: Paintings left alone.
OTHERS = 14


def _shots(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Two shots that each show a third of the painting the other lacks."""
    w, h = image.size
    return image.crop((0, 0, int(w * 0.67), h)), image.crop((int(w * 0.33), 0, w, h))


@pytest.fixture(scope="module")
def collection(museum: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The files by painting: ``edited`` paintings (source first, then copies), ``scenes`` (two
    shots each), ``others``."""
    root = tmp_path_factory.mktemp("dups")
    paintings = sorted((museum / "images").glob("*.jpg"))[100:100 + EDITED + SCENES + OTHERS]
    rng = np.random.default_rng(7)
    found: dict[str, list[Path]] = {}
    for number, path in enumerate(paintings):
        image = Image.open(path).convert("RGB")
        image.thumbnail((800, 800))
        if number < EDITED:
            files = [root / path.name]
            image.save(files[0], quality=92)
            for kind in KINDS:
                files.append(root / f"{path.stem}__{kind}.png")
                Image.fromarray(EDITS[kind](np.asarray(image), rng)).save(files[-1])
        elif number < EDITED + SCENES:
            files = [root / f"{path.stem}__shot{i}.jpg" for i in (1, 2)]
            for shot, target in zip(_shots(image), files):
                shot.save(target, quality=92)
        else:
            files = [root / path.name]
            image.save(files[0], quality=92)
        found[path.stem] = files
    return found


@pytest.fixture(scope="module")
def dups(client, collection: dict[str, list[Path]]) -> str:  # noqa: ANN001
    """An index of the collection that keeps local features, calibrated."""
    client.create_index("near_dups")
    client.verify_index("near_dups")
    report = client.ingest(sorted(p for files in collection.values() for p in files), index="near_dups")
    assert not report.failed
    found = client.calibrate("near_dups", sample=20)
    assert found.verified and found.images == 20 and found.same == 20 * len(EDITS)
    return "near_dups"


def _ids(client, index: str) -> dict[str, int]:  # noqa: ANN001
    with client.database.connect() as conn:
        return {Path(uri).name: image_id for image_id, uri in conn.exec_driver_sql(f"SELECT id, uri FROM images_{index}")}


def test_hits_carry_a_score_and_the_cut_off_keeps_only_what_passes(client, dups: str,  # noqa: ANN001
                                                                  collection: dict[str, list[Path]], tmp_path: Path) -> None:
    source = next(files[0] for files in collection.values() if len(files) == 1 + len(KINDS))
    hits = client.search(source, k=10, index=dups)
    scores = [hit.notes["score"] for hit in hits]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)  # (an exact ranking: the score falls with the distance)
    # A new crop of the painting, not in the index: the cut-off keeps its source, and not the others.
    crop = tmp_path / "crop.png"
    Image.open(source).crop((40, 30, 400, 330)).save(crop)
    kept = client.search(crop, k=10, index=dups, min_score=0.5, rerank="verify")
    ids = _ids(client, dups)
    family = {ids[p.name] for p in collection[source.stem]}
    assert kept and kept[0].id in family
    assert all(hit.notes["score"] >= 0.5 for hit in kept)
    assert {hit.id for hit in kept} <= family
    everything = client.search(crop, k=10, index=dups, rerank="verify")
    assert len(everything) == 10 and len(kept) < 10


def test_the_score_needs_one_calibrated_index(client, dups: str, sample_index: str, museum_sample: Path) -> None:  # noqa: ANN001
    query = sorted((museum_sample / "images").iterdir())[0]
    with pytest.raises(ImgdbError, match="between 0 and 1"):
        client.search(query, index=dups, min_score=1.5)
    with pytest.raises(ImgdbError, match="one index"):
        client.search(query, index=f"{dups},{sample_index}", min_score=0.5)
    if not client.calibrated(sample_index):
        with pytest.raises(ImgdbError, match="imgdb index calibrate"):
            client.search(query, index=sample_index, min_score=0.5)
        assert "score" not in client.search(query, index=sample_index)[0].notes


def _pairs(groups: list[dict], level: str) -> set[frozenset[int]]:
    return {frozenset(p) for g in groups if g["level"] == level
            for p in itertools.combinations([image["id"] for image in g["images"]], 2)}


def test_duplicates_groups_the_same_picture_apart_from_the_same_scene(client, dups: str,  # noqa: ANN001
                                                                      collection: dict[str, list[Path]]) -> None:
    report = client.duplicates(dups, k=10)
    ids = _ids(client, dups)
    assert report.checked == len(ids)
    near, similar = _pairs(report.groups, "near"), _pairs(report.groups, "similar")
    truth = {frozenset(p) for files in collection.values() if len(files) > 2
             for p in itertools.combinations([ids[f.name] for f in files], 2)}
    shots = {frozenset(ids[f.name] for f in files) for files in collection.values() if len(files) == 2}
    # Nothing but the same picture in near groups: every two members of a group (no chaining).
    assert near and near <= truth
    assert len(near) >= 0.6 * len(truth)
    assert not shots & near  # two shots of a scene are never the same picture
    assert shots & similar
    for group in report.groups:
        members = [image["id"] for image in group["images"]]
        assert len(set(members)) == len(members) >= 2 and members[0] == group["representative"] == group["group"]
        assert all(0.0 <= image["score"] <= 1.0 for image in group["images"])
    # Kept in SQL: the view has the groups the report gave.
    with psycopg.connect(client.database.url) as conn:
        rows = conn.execute(f'SELECT "group", level, image_id, score, representative FROM imgdb.duplicates_{dups}'
                            " WHERE level <> 'exact'").fetchall()
    assert {(g, level, i) for g, level, i, _, _ in rows} == {
        (group["group"], group["level"], image["id"]) for group in report.groups for image in group["images"]}
    assert all(representative == (g == i) for g, _, i, _, representative in rows)

    # The next run compares nothing it compared before, and finds the same groups.
    again = client.duplicates(dups, k=10)
    assert again.checked == 0 and again.groups == report.groups


def test_sync_brings_the_groups_up_to_date(client, dups: str, collection: dict[str, list[Path]],  # noqa: ANN001
                                           tmp_path: Path) -> None:
    source = next(files[0] for files in collection.values() if len(files) == 1 + len(KINDS))
    copy = tmp_path / "resized.png"
    image = Image.open(source)
    image.resize((image.width // 2, image.height // 2)).save(copy)
    other = next(files[0] for files in collection.values() if len(files) == 1)
    client.duplicates(dups, k=10)  # (duplicates asked for once: sync keeps them up to date from then on)
    with psycopg.connect(client.database.url, autocommit=True) as app_sql:
        app_sql.execute("DROP TABLE IF EXISTS public.dup_posts")
        app_sql.execute("CREATE TABLE public.dup_posts (id int PRIMARY KEY, picture text)")
        app_sql.cursor().executemany("INSERT INTO public.dup_posts VALUES (%s, %s)",
                                     [(7, str(copy)), (8, str(source)), (9, str(other))])
        client.attach("dup_posts", "picture", index=dups)
        client.sync(dups)
        # "More like this" from SQL carries the index's score, and cuts on it as the API does.
        nearest = app_sql.execute("SELECT ref, distance, score FROM imgdb.similar(%s, 7, 10)", (dups,)).fetchall()
        kept = app_sql.execute("SELECT ref, score FROM imgdb.similar(%s, 7, 10, min_score => 0.5)", (dups,)).fetchall()
        model = Calibration.of(client.catalog.layer.record(dups).score_state)
        assert [ref for ref, _, _ in nearest] == [8, 9]  # (its own picture first)
        assert [score for _, _, score in nearest] == pytest.approx([model.score(d, {}) for _, d, _ in nearest], abs=1e-4)
        assert kept == [(ref, score) for ref, _, score in nearest if score >= 0.5] and kept[0][0] == 8
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="between 0 and 1"):
            app_sql.execute("SELECT * FROM imgdb.similar(%s, 7, 10, min_score => 1.5)", (dups,))
        ids = _ids(client, dups)
        listed = client.duplicates(dups, level="near", update=False)
        assert listed.checked == 0 and all(g["level"] == "near" for g in listed.groups)
        group = next(g for g in listed.groups if ids["resized.png"] in {i["id"] for i in g["images"]})
        assert ids[source.name] in {i["id"] for i in group["images"]}
        member = next(i for i in group["images"] if i["id"] == ids["resized.png"])
        assert (member["table"], member["ref"]) == ("dup_posts", 7)
        app_sql.execute("DELETE FROM public.dup_posts")
        client.sync(dups)
        after = client.duplicates(dups, level="near", update=False)
        assert ids["resized.png"] not in {i["id"] for g in after.groups for i in g["images"]}
        client.detach("dup_posts", index=dups)
        app_sql.execute("DROP TABLE public.dup_posts")


def test_exact_duplicates_are_the_same_bytes_at_several_paths_or_rows(client, museum: Path,  # noqa: ANN001
                                                                        tmp_path: Path) -> None:
    painting = Image.open(sorted((museum / "images").glob("*.jpg"))[130])
    first = tmp_path / "a.jpg"
    painting.crop((0, 0, painting.width - 3, painting.height)).save(first)  # (bytes no other test stores)
    second = copy_image(first, tmp_path / "b" / "a-copy.jpg")
    client.create_index("exact_dups", "color:hsv/bins=4x4x4")
    report = client.ingest([first, second], index="exact_dups")
    assert (report.added, report.duplicates) == (1, 1)
    assert client.ingest([first, second], index="exact_dups").added == 0  # (a rerun records nothing twice)
    with psycopg.connect(client.database.url, autocommit=True) as app_sql:
        app_sql.execute("DROP TABLE IF EXISTS public.dup_photos")
        app_sql.execute("CREATE TABLE public.dup_photos (id int PRIMARY KEY, path text)")
        app_sql.execute("INSERT INTO public.dup_photos VALUES (1, %s), (2, %s)", (str(first), str(first)))
        client.attach("dup_photos", "path", index="exact_dups")
        client.sync("exact_dups")
        [group] = client.duplicates("exact_dups").groups  # (too few images for scores: exact groups only)
        assert group["level"] == "exact" and len({image["id"] for image in group["images"]}) == 1
        assert [(image["uri"], image.get("table"), image.get("ref")) for image in group["images"]] == [
            (str(first), None, None), (str(second), None, None), (str(first), "dup_photos", 1),
            (str(first), "dup_photos", 2)]
        rows = app_sql.execute("SELECT p.id, d.representative FROM imgdb.duplicates_exact_dups d"
                               " JOIN public.dup_photos p ON p.id = d.ref ORDER BY p.id").fetchall()
        assert rows == [(1, False), (2, False)]  # (the first path is the representative)
        with pytest.raises(ImgdbError, match="exact group is one image"):
            client.resolve_duplicates(group["group"], keep=group["representative"], index="exact_dups", level="exact")
        client.detach("dup_photos", index="exact_dups")
        app_sql.execute("DROP TABLE public.dup_photos")


def test_cli_duplicates_and_calibrate(client, dups: str) -> None:  # noqa: ANN001
    runner = CliRunner()
    result = runner.invoke(app, ["duplicates", "--index", dups, "--level", "near", "-k", "10", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["groups"] and all(set(g) >= {"group", "level", "representative", "images"} for g in document["groups"])
    assert all(set(i) >= {"id", "uri", "score"} for g in document["groups"] for i in g["images"])
    result = runner.invoke(app, ["duplicates", "--index", dups, "--level", "near", "--no-update", "--limit", "1"])
    assert result.exit_code == 0 and f"groups 1-1 of {document['total']} shown" in result.output, result.output
    result = runner.invoke(app, ["duplicates", "--index", dups, "--level", "twins"])
    assert result.exit_code != 0 and "unknown level" in result.output
    result = runner.invoke(app, ["index", "calibrate", "nosuchindex"])
    assert result.exit_code != 0 and "nosuchindex" in result.output


def test_resolve_keeps_one_and_deletes_only_when_told(client, dups: str) -> None:  # noqa: ANN001
    near = [g for g in client.duplicates(dups, level="near", k=10).groups if len(g["images"]) >= 2]
    assert len(near) >= 2
    settled, removed = near[0], near[1]
    keep = settled["images"][-1]["id"]
    others = [image["id"] for image in settled["images"] if image["id"] != keep]
    with client.database.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE images SET metadata = '{{\"album\": \"x\"}}' WHERE id = {others[0]}")
    with pytest.raises(ImgdbError, match="is not in near group"):
        client.resolve_duplicates(settled["group"], keep=-5, index=dups)
    with pytest.raises(ImgdbError, match="no near group"):
        client.resolve_duplicates(-5, keep=keep, index=dups)
    done = client.resolve_duplicates(settled["group"], keep=keep, index=dups, merge_metadata=True)
    assert (done.kept, done.deleted, done.merged) == (keep, [], True)
    assert client.image(keep)["metadata"]["album"] == "x"
    assert all(client.image(i) for i in others)  # (nothing deleted without asking)
    regrouped = client.duplicates(dups, level="near", k=10).groups
    assert not any(len({keep, *others} & {i["id"] for i in g["images"]}) > 1 for g in regrouped)

    result = CliRunner().invoke(app, ["duplicates", "resolve", str(removed["group"]), "--keep",
                                      str(removed["representative"]), "--index", dups, "--delete-others", "--json"])
    assert result.exit_code == 0, result.output
    gone = json.loads(result.stdout)["deleted"]
    assert gone and sorted(gone) == sorted(i["id"] for i in removed["images"][1:])
    with pytest.raises(ImgdbError):
        client.image(gone[0])


def test_the_http_api_scores_lists_and_resolves_with_the_token(client, dups: str,  # noqa: ANN001
                                                               collection: dict[str, list[Path]]) -> None:
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from imgdb.client import Imgdb
    from imgdb.web.app import create_app

    token = "a token for the tests"
    source = next(files[0] for files in collection.values() if len(files) == 1 + len(KINDS))
    with TestClient(create_app(Imgdb(client.database, replace(client.settings, api_token=token)))) as http:
        with source.open("rb") as f:
            hits = http.post(f"/search?index={dups}&min_score=0.5", files={"file": ("q.jpg", f, "image/jpeg")}).json()
        assert hits and all(hit["score"] >= 0.5 for hit in hits)
        assert http.post(f"/search?index={dups}&min_score=2", json={"id": hits[0]["id"]}).status_code == 422
        listed = http.get(f"/duplicates?index={dups}&level=near").json()
        assert listed["groups"] and all(image["thumbnail"].endswith("/thumbnail")
                                        for g in listed["groups"] for image in g["images"])
        assert listed["total"] == len(listed["groups"]) >= 2 and listed["offset"] == 0
        # A page at a time: the second group alone, and nothing past the end; a page has a bound.
        second = http.get(f"/duplicates?index={dups}&level=near&limit=1&offset=1").json()
        assert second["groups"] == listed["groups"][1:2] and second["total"] == listed["total"]
        assert http.get(f"/duplicates?index={dups}&level=near&offset={listed['total']}").json()["groups"] == []
        assert http.get(f"/duplicates?index={dups}&limit=100000").status_code == 422
        assert http.get(f"/duplicates?index={dups}&level=twins").status_code == 400
        group = listed["groups"][0]
        keep = group["images"][1]["id"]
        path = f"/duplicates/{group['group']}/resolve?index={dups}&keep={keep}"
        assert http.post(path).status_code == 401
        assert http.post(path, headers={"Authorization": "Bearer wrong"}).status_code == 403
        done = http.post(path, headers={"Authorization": f"Bearer {token}"}).json()
        assert done == {"group": group["group"], "level": "near", "kept": keep, "deleted": [], "merged": False}
        assert http.post(path, headers={"Authorization": f"Bearer {token}"}).status_code == 400  # (gone: settled)


def test_retraining_an_index_learns_its_scores_again_and_judges_its_pairs_again(client, museum_sample: Path) -> None:  # noqa: ANN001
    client.create_index("vlad_dups", "vlad:rootsift/k=8/side=320/max=300")
    paintings = sorted((museum_sample / "images").glob("*.jpg"))[:12]
    client.ingest(paintings, index="vlad_dups")
    client.calibrate("vlad_dups", sample=10)
    before = client.catalog.layer.record("vlad_dups").score_state["distance"]
    assert client.duplicates("vlad_dups", k=5).checked == 12
    client.train("vlad_dups")
    client.catalog.layer.forget()
    after = client.catalog.layer.record("vlad_dups").score_state["distance"]
    assert not np.allclose(before, after)  # (a new codebook: new distances, a new model)
    assert client.duplicates("vlad_dups", k=5).checked == 12  # (every pair judged again)


def test_ingest_skips_or_links_near_duplicates_and_says_which(client, dups: str, museum: Path,  # noqa: ANN001
                                                              collection: dict[str, list[Path]], tmp_path: Path) -> None:
    source = next(files[0] for files in collection.values() if len(files) == 1 + len(KINDS))
    image = Image.open(source)
    crop = tmp_path / "crop.png"
    image.crop((20, 10, image.width - 30, image.height - 20)).save(crop)
    fresh = Image.open(sorted((museum / "images").glob("*.jpg"))[200]).convert("RGB")
    fresh.thumbnail((700, 700))
    new, new_copy = tmp_path / "new.png", tmp_path / "new-smaller.png"
    fresh.save(new)
    fresh.resize((fresh.width * 2 // 3, fresh.height * 2 // 3)).save(new_copy)
    ids = _ids(client, dups)

    report = client.ingest([crop, new, new_copy], index=dups, near_duplicates="skip")
    assert report.added == 1  # (the new painting alone)
    by_path = {Path(n.path).name: n for n in report.near_duplicates}
    assert set(by_path) == {"crop.png", "new-smaller.png"}
    assert by_path["crop.png"].match == ids[source.name] and by_path["crop.png"].action == "skipped"
    assert by_path["new-smaller.png"].match is None and by_path["new-smaller.png"].match_uri == str(new)
    assert all(n.score >= 0.5 for n in report.near_duplicates)
    assert "crop.png" not in _ids(client, dups)

    result = CliRunner().invoke(app, ["ingest", str(crop), "--index", dups, "--near-duplicates", "link", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["added"] == 1 and [n["action"] for n in document["near_duplicates"]] == ["linked"]
    assert document["near_duplicates"][0]["match"] == ids[source.name]
    with client.database.connect() as conn:
        linked = conn.exec_driver_sql(
            "SELECT level FROM duplicate_pairs WHERE index_id = (SELECT id FROM indexes WHERE name = %s)"
            " AND %s IN (image_id, other_id)", (dups, _ids(client, dups)["crop.png"])).scalars().all()
    assert linked == ["near"]
    with pytest.raises(ImgdbError, match="skip or link"):
        client.ingest([crop], index=dups, near_duplicates="maybe")
    assert "near_duplicates" not in client.ingest([crop], index=dups).to_json()  # (only when asked)
