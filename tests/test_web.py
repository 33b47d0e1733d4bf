"""The HTTP API against the real database and model: search by upload, id and URL, images and
thumbnails, and every refusal (private URLs, oversized or non-image bodies, tokens, traversal)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imgdb.client import Imgdb
from imgdb.features.registry import DEFAULT_SPEC, canonical_spec
from imgdb.io import fetch as fetch_mod
from imgdb.web.app import create_app
from tests.conftest import copy_image
from tests.routes import Server, redirect_to

TOKEN = "correct horse battery staple"


def serving(client, **settings) -> Iterator[TestClient]:  # noqa: ANN001
    """A test client on an app sharing the session's database, with some settings changed."""
    db = Imgdb(client.database, replace(client.settings, **settings))
    with TestClient(create_app(db)) as http:
        yield http


@pytest.fixture(scope="module")
def api(client, sample_index: str) -> Iterator[TestClient]:  # noqa: ANN001
    yield from serving(client)


@pytest.fixture(scope="module")
def queries(museum_sample: Path) -> list[dict]:
    return json.loads((museum_sample / "queries.json").read_text())


def test_health_schema_and_page(api: TestClient, client) -> None:  # noqa: ANN001
    assert api.get("/healthz").json() == {"status": "ok"}
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "/search?" in page.text
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/search", "/images/{image_id}", "/images/{image_id}/thumbnail", "/healthz", "/indexes"} <= set(paths)
    default = next(ix for ix in api.get("/indexes").json() if ix["name"] == "default")
    assert default["extractor"] == canonical_spec(DEFAULT_SPEC) and default["images"] >= 40
    assert default["dim"] == client.index().dim


def test_upload_finds_the_painting_and_its_thumbnail(api: TestClient, museum_sample: Path, queries, client) -> None:  # noqa: ANN001
    query = queries[0]
    photo = museum_sample / query["query"]
    response = api.post("/search", params={"k": 3}, files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    hits = response.json()
    assert Path(hits[0]["uri"]).name == Path(query["relevant"][0]).name
    assert set(hits[0]) == {"id", "uri", "distance", "metadata", "thumbnail"} and len(hits) == 3
    thumb = api.get(hits[0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    cached = list((client.settings.home / "thumbnails").rglob("*.jpg"))
    assert cached and api.get(hits[0]["thumbnail"]).content == thumb.content


def test_search_by_id_with_filters(api: TestClient, sample_ids: list[int], museum_sample: Path) -> None:
    hits = api.post("/search", json={"id": sample_ids[4]}, params={"k": 2}).json()
    assert hits[0]["id"] == sample_ids[4] and hits[0]["distance"] < 1e-4
    metadata = json.loads((museum_sample / "metadata.json").read_text())
    author, _ = Counter(m["author"] for m in metadata.values() if m["author"]).most_common(1)[0]
    filtered = api.post("/search", json={"id": sample_ids[4]}, params={"k": 50, "filter": f"meta.author={author}"})
    assert filtered.status_code == 200 and filtered.json()
    assert all(h["metadata"]["author"] == author for h in filtered.json())


def test_original_is_served_from_its_ingested_path_only(api: TestClient, sample_ids: list[int]) -> None:
    hit = api.post("/search", json={"id": sample_ids[1]}, params={"k": 1}).json()[0]
    original = api.get(f"/images/{hit['id']}")
    assert original.status_code == 200 and original.content == Path(hit["uri"]).read_bytes()
    for path in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/../../etc/passwd", "/images/%2e%2e/etc/passwd"):
        response = api.get(path)
        assert response.status_code in (404, 422) and b"root:" not in response.content
    assert api.get("/images/999999999").status_code == 404
    assert api.get("/images/999999999/thumbnail").json()["error"] == "no image 999999999"


def test_hostile_queries_are_refused_with_reasons(api: TestClient, http_root, client) -> None:  # noqa: ANN001
    base, folder = http_root
    copy_image(Path(__file__).parent / "conftest.py", folder / "not-an-image.jpg")
    refusals = [
        (api.post("/search", json={"url": f"{base}/not-an-image.jpg"}), 422, "127.0.0.1"),
        (api.post("/search", json={"url": "http://169.254.169.254/latest/meta-data"}), 422, "169.254.169.254"),
        (api.post("/search", json={"url": "file:///etc/passwd"}), 422, "http"),
        (api.post("/search", json={"url": str(Path(__file__).resolve())}), 422, "http"),
        (api.post("/search", files={"file": ("x.jpg", b"<html>not an image</html>", "image/jpeg")}), 400, "image"),
        (api.post("/search", content=b"{nope", headers={"content-type": "application/json"}), 400, "JSON"),
        (api.post("/search", json={"path": "/etc/passwd"}), 400, "url"),
        (api.post("/search", content=b"raw", headers={"content-type": "text/plain"}), 415, "multipart"),
        (api.post("/search", json={"id": 1}, params={"k": 0}), 422, "k"),
        (api.post("/search", json={"id": 1}, params={"index": "nope"}), 404, "nope"),
    ]
    for response, status, words in refusals:
        assert response.status_code == status, (response.status_code, response.text)
        assert words in response.json()["error"]


@pytest.fixture
def peer() -> Iterator[Server]:
    """A loopback HTTP server whose routes misbehave on purpose."""
    server = Server()
    yield server
    server.close()


def test_redirect_to_a_private_address_is_refused(api: TestClient, peer: Server,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A public page redirecting to the cloud metadata service or the LAN. The only server a test
    may run is on loopback, so the real policy is wrapped to admit exactly 127.0.0.1 (hop one);
    the redirect's target then meets the default policy unchanged."""
    real_check = fetch_mod.check_address
    monkeypatch.setattr(fetch_mod, "check_address",
                        lambda ip, allow: None if str(ip) == "127.0.0.1" else real_check(ip, allow))
    for target in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/photo.jpg"):
        peer.routes["/photo.jpg"] = redirect_to(target)
        response = api.post("/search", json={"url": peer.url("/photo.jpg")})
        assert response.status_code == 422, response.text
        assert f"refusing {target}" in response.json()["error"]
    assert [path for path, _ in peer.requests] == ["/photo.jpg", "/photo.jpg"]


def test_slow_server_times_out(client, sample_index: str, peer: Server) -> None:  # noqa: ANN001
    peer.routes["/slow.jpg"] = lambda handler: peer.stop.wait(10)
    impatient = replace(client.settings.fetch, allow_private=True, read_timeout=0.5, total_timeout=1.0)
    for http in serving(client, fetch=impatient):
        started = time.monotonic()
        response = http.post("/search", json={"url": peer.url("/slow.jpg")})
        assert response.status_code == 422 and "timed out" in response.json()["error"], response.text
        assert time.monotonic() - started < 5


def test_oversized_bodies_are_refused_before_decoding(client, sample_index: str, museum_sample: Path) -> None:  # noqa: ANN001
    photo = next((museum_sample / "images").glob("*.jpg"))
    small = replace(client.settings.fetch, max_bytes=10_000)
    for http in serving(client, fetch=small):
        response = http.post("/search", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
        assert response.status_code == 413 and "limit" in response.json()["error"]
        # No Content-Length to refuse up front: a chunked body is cut off once it passes the limit.
        endless = (b"x" * 65536 for _ in range(64))
        chunked = http.post("/search", content=endless, headers={"content-type": "multipart/form-data; boundary=b"})
        assert chunked.status_code == 413 and "over the" in chunked.json()["error"]


def test_write_endpoints_need_the_token(client, museum: Path, tmp_path: Path) -> None:  # noqa: ANN001
    for http in serving(client):
        assert http.delete("/images/1").status_code == 403  # no token configured: writes are off
    client.create_index("web_writes", "color:hsv")
    client.ingest([copy_image(museum / "images" / "bbdd_00120.jpg", tmp_path / "a.jpg")], index="web_writes")
    [hit] = client.search(tmp_path / "a.jpg", k=1, index="web_writes")
    for http in serving(client, api_token=TOKEN):
        assert http.delete(f"/images/{hit.id}").status_code == 401
        assert http.delete(f"/images/{hit.id}", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert http.delete(f"/images/{hit.id}", headers={"Authorization": f"Bearer {TOKEN}"}).json() == {"deleted": 1}
        assert http.delete(f"/images/{hit.id}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_adding_images_by_upload_and_url(client, museum: Path, http_root) -> None:  # noqa: ANN001
    base, folder = http_root
    painting = museum / "images" / "bbdd_00130.jpg"
    copy_image(museum / "images" / "bbdd_00131.jpg", folder / "remote.jpg")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client.create_index("web_adds", "color:hsv")
    for http in serving(client, api_token=TOKEN):
        upload = {"file": ("p.jpg", painting.read_bytes(), "image/jpeg")}
        assert http.post("/images", params={"index": "web_adds"}, files=upload).status_code == 401
        added = http.post("/images", params={"index": "web_adds"}, files=upload, data={"meta": '{"room": 7}'},
                          headers=auth)
        assert added.status_code == 201, added.text
        image = added.json()
        assert image["added"] and Path(image["uri"]).read_bytes() == painting.read_bytes()
        again = http.post("/images", params={"index": "web_adds"}, files=upload, headers=auth).json()
        assert again == {**image, "added": False}
        found = http.post("/search", params={"index": "web_adds", "k": 1}, files=upload).json()[0]
        # Other tests may have ingested this painting with the museum's metadata: ours is merged in.
        assert found["id"] == image["id"] and found["metadata"]["room"] == 7
        # A URL is fetched with the CLI's guarded fetcher: loopback is refused unless allowed.
        refused = http.post("/images", params={"index": "web_adds"}, json={"url": f"{base}/remote.jpg"}, headers=auth)
        assert refused.status_code == 422 and "127.0.0.1" in refused.json()["error"]
        bad = http.post("/images", files={"file": ("x.jpg", b"GIF89a-not-really", "image/gif")}, headers=auth)
        assert bad.status_code == 400
    trusting = replace(client.settings.fetch, allow_private=True)
    for http in serving(client, api_token=TOKEN, fetch=trusting):
        fetched = http.post("/images", params={"index": "web_adds"}, json={"url": f"{base}/remote.jpg"}, headers=auth)
        assert fetched.status_code == 201, fetched.text
        hit = http.post("/search", params={"index": "web_adds", "k": 1}, json={"id": fetched.json()["id"]}).json()[0]
        assert hit["metadata"]["source_url"] == f"{base}/remote.jpg"


def test_concurrent_uploads_get_the_answers_of_sequential_ones(api: TestClient, museum_sample: Path,
                                                                queries) -> None:  # noqa: ANN001
    """The app's worker threads share one model, one gate and two connection pools: twelve uploads
    at once must rank exactly as one at a time."""
    photos = [(museum_sample / q["query"]).read_bytes() for q in queries[:6]] * 2

    def ranking(data: bytes) -> list[tuple[int, float]]:
        answer = api.post("/search", params={"k": 5}, files={"file": ("q.jpg", data, "image/jpeg")})
        assert answer.status_code == 200, answer.text
        return [(hit["id"], round(hit["distance"], 4)) for hit in answer.json()]

    one_at_a_time = [ranking(photo) for photo in photos]
    with ThreadPoolExecutor(len(photos)) as pool:
        together = list(pool.map(ranking, photos))
    assert together == one_at_a_time
