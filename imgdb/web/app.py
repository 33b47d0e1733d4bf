"""The HTTP API (``imgdb serve``): search by upload, URL or id; images and thumbnails; token-guarded writes.

The app is a thin shell over imgdb's public API (:class:`imgdb.Imgdb`), like the CLI: one client per process (the
model loads once, at start-up, before ``/healthz`` answers), its connection pools shared by all
requests, and every CPU-bound call (decoding, inference, search) run in a worker thread so the
event loop keeps accepting requests. Input is hostile until proven otherwise: bodies are read up
to a byte limit, URLs go through the SSRF-safe fetcher, files are served only from the paths
recorded at ingest, by integer id.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import psycopg
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

import imgdb
from imgdb import (DEFAULT_INDEX, MAX_CANDIDATES, MAX_ID, MAX_K, ConcurrentChange, DatabaseError, FetchError, ImageNotFound,
                   ImageReadError, Imgdb, ImgdbError, IndexNotFound)

PAGE = Path(__file__).with_name("static") / "index.html"
#: Metadata keys imgdb sets itself on what POST /images adds: a request cannot.
RESERVED_META = frozenset({"source_url"})
#: An image id in a path: a positive bigint (anything else is refused with 422, not sent to SQL).
ImageId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
log = logging.getLogger("imgdb")
#: URL downloads one process runs at once, in a pool of their own: a slow or hostile server holds
#: one of these threads (up to the fetch's deadline), never one of those that searches and
#: decoding run in. Further URL requests wait for a free one without holding any thread.
FETCH_THREADS = 16
#: Seconds a client has to send its whole request body (a trickling upload is cut off with 408).
BODY_TIMEOUT = 60.0
#: Seconds without a request in flight after which freed memory goes back to the system.
IDLE_TRIM_S = 1.0
#: Largest request head (request line and headers) the server reads: 431 past it. Room for a
#: search's every filter (``MAX_FILTER_CHARS``, URL-encoded) in its query string.
MAX_HEAD_BYTES = 64 * 1024
#: Groups of duplicates a GET /duplicates answers by default, and at most (one request, one page).
GROUPS_PAGE, MAX_GROUPS_PAGE = 100, 1000
#: Room for multipart framing around an image of the fetch byte limit.
MULTIPART_OVERHEAD = 64 * 1024


#: HTTP status of each library error; anything else the library refuses is the request's fault (400).
#: A database that is down is the server's problem, and temporary: 503 tells clients to retry.
#: What changed under a request (an index dropped while it was searched) is a conflict: 409.
_STATUS: tuple[tuple[type[ImgdbError], int], ...] = ((IndexNotFound, 404), (ImageNotFound, 404), (FetchError, 422),
                                                     (ConcurrentChange, 409), (DatabaseError, 503))


class ApiError(Exception):
    """A refusal with its HTTP status; the body is ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(db: Imgdb | None = None) -> FastAPI:
    """The ASGI app; ``db`` defaults to :func:`imgdb.connect` (closed with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = db or await run_in_threadpool(imgdb.connect)
        # Load the default index's model now: the first user should not wait for it.
        await run_in_threadpool(client.warm_up, DEFAULT_INDEX)
        app.state.db = client
        app.state.fetcher = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="imgdb-fetch")
        yield
        app.state.fetcher.shutdown(wait=False, cancel_futures=True)
        if db is None:
            client.close()

    app = FastAPI(title="imgdb", summary="Search images with an image, inside PostgreSQL.", lifespan=lifespan)
    _errors(app)
    _routes(app)
    _give_memory_back_when_idle(app)
    _refuse_large_heads(app)
    return app


def _refuse_large_heads(app: FastAPI) -> None:
    """A head over MAX_HEAD_BYTES is a 431 with the JSON reason, whether it came in one read (here)
    or trickled past the HTTP parser's own limit (:mod:`imgdb.web.protocol`)."""

    @app.middleware("http")
    async def check(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's middleware signature
        scope = request.scope
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if size > MAX_HEAD_BYTES:
            return JSONResponse({"error": f"request head of {size:,} bytes is over the {MAX_HEAD_BYTES:,}-byte limit"},
                                status_code=431)
        return await call_next(request)


def _give_memory_back_when_idle(app: FastAPI) -> None:
    """Once no request has been in flight for IDLE_TRIM_S, return freed memory to the system: the
    decodes and forward passes of a burst of uploads leave it in the allocator's arenas otherwise,
    and the server would stay at its peak."""
    in_flight = {"n": 0, "generation": 0}

    @app.middleware("http")
    async def count(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's middleware signature
        in_flight["n"] += 1
        try:
            return await call_next(request)
        finally:
            in_flight["n"] -= 1
            if in_flight["n"] == 0:
                in_flight["generation"] += 1
                generation = in_flight["generation"]
                asyncio.get_running_loop().call_later(
                    IDLE_TRIM_S,
                    lambda: in_flight["n"] == 0 and in_flight["generation"] == generation and imgdb.return_memory())


def _errors(app: FastAPI) -> None:
    """Every failure is a one-line JSON ``{"error": ...}``: 4xx for what the request did wrong, 503
    while the database is unreachable, and 500 (without a traceback) only for imgdb's own faults."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(ImgdbError)
    async def imgdb_error(_: Request, exc: ImgdbError) -> JSONResponse:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 400)
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(sa.exc.DataError)
    @app.exception_handler(psycopg.DataError)
    async def driver_failure(_: Request, exc: Exception) -> JSONResponse:
        # The database being down is the server's problem and temporary (503: retry); a value
        # PostgreSQL refused is the request's (400).
        kind, reason = imgdb.driver_failure(exc) or ("unavailable", str(exc))
        return JSONResponse({"error": reason}, status_code=503 if kind == "unavailable" else 400)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error answering a request", exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)


def _db(request: Request) -> Imgdb:
    return request.app.state.db


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body is over the {limit}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"request body not received within {BODY_TIMEOUT:.0f} s") from None
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - Starlette's own cache: form() and json() read it from here
    return body


async def _query(request: Request) -> tuple[str, Any]:
    """What a search or add request carries: ``("file", bytes)``, ``("url", str)`` or ``("id", int)``,
    plus any other JSON/form fields."""
    db = _db(request)
    await _body(request, db.settings.fetch.max_bytes + MULTIPART_OVERHEAD)
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "multipart body without a `file` field")
        data = await upload.read()
        if len(data) > db.settings.fetch.max_bytes:
            raise ApiError(413, f"upload of {len(data)} bytes is over the {db.settings.fetch.max_bytes}-byte limit")
        return "file", (data, {k: v for k, v in form.items() if k != "file"})
    if kind.startswith("application/json"):
        document = imgdb.parse_json(await request.body(), "the JSON body")
        if not isinstance(document, dict) or ("url" in document) == ("id" in document):
            raise ApiError(400, 'JSON body must be {"url": "http(s)://..."} or {"id": N}')
        return _typed(document)
    raise ApiError(415, "send a multipart upload (field `file`) or a JSON body with `url` or `id`")


def _typed(document: dict[str, Any]) -> tuple[str, Any]:
    """A JSON body's query field, of its declared type or refused with 422: ``url`` an http(s) URL,
    ``id`` a positive integer. Neither is ever a path on this machine (`{"id": -5}` is not `id:-5`,
    a file name, and `{"url": "/home/..."}` is not a file)."""
    if "url" in document:
        url = document["url"]
        if not isinstance(url, str) or not imgdb.is_url(url):
            raise ApiError(422, f"url must be an http(s) URL, not {_shown(url)}")
        return "url", (url, document)
    image_id = document["id"]
    if type(image_id) is not int or not 1 <= image_id <= MAX_ID:  # (bool is an int to Python, not to JSON)
        raise ApiError(422, f"id must be a positive integer image id, not {_shown(image_id)}")
    return "id", (image_id, document)


def _shown(value: Any) -> str:
    """A refused JSON value as the client sent it, cut short."""
    return json.dumps(value)[:200]


def _require_token(request: Request) -> None:
    """Write endpoints: off without IMGDB_API_TOKEN; otherwise ``Authorization: Bearer TOKEN``,
    compared in constant time."""
    expected = _db(request).settings.api_token
    if not expected:
        raise ApiError(403, "write endpoints are off: the server has no IMGDB_API_TOKEN")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "missing token: send Authorization: Bearer <IMGDB_API_TOKEN>")
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise ApiError(403, "wrong token")


def _routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The search page: plain HTML and JavaScript over this API, no build step."""
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        """200 once the model is loaded and the database answers; 503 while it does not."""
        try:
            await run_in_threadpool(_db(request).ping)
        except DatabaseError as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/indexes")
    async def indexes(request: Request) -> list[dict[str, Any]]:
        """Every index: name, extractor spec, dimension, image count, ANN method (``imgdb index list``)."""
        return [info.to_json() for info in await run_in_threadpool(_db(request).indexes)]

    @app.post("/search")
    async def search(request: Request, k: int = Query(10, ge=1, le=MAX_K), index: str = DEFAULT_INDEX,
                     filter: list[str] = Query(default_factory=list),  # noqa: A002 - CONVENTIONS' name
                     rerank: str = Query("exact", max_length=200), fusion: str = Query("rrf", max_length=20),
                     candidates: int | None = Query(None, ge=1, le=MAX_CANDIDATES),
                     min_score: float | None = Query(None, ge=0.0, le=1.0)) -> list[dict[str, Any]]:
        """The k images most similar to an upload (`file`), a URL or a stored image id; ``index``
        may name several (``a,b``), fused by ``fusion``; ``rerank=verify`` marks verified hits;
        ``min_score`` keeps only hits scored that or more (an index that has learned its scores)."""
        db = _db(request)
        query = await _search_query(request)
        hits = await run_in_threadpool(db.search, query, k=k, filters=filter, index=index, rerank=rerank,
                                       candidates=candidates, fusion=fusion, min_score=min_score)
        thumbnail = _thumbnails(request)
        return [{**hit.to_json(), "thumbnail": thumbnail(hit.id)} for hit in hits]

    @app.get("/duplicates")
    async def duplicates(request: Request, index: str = Query(DEFAULT_INDEX, max_length=40),
                         level: str | None = Query(None, max_length=20),
                         limit: int = Query(GROUPS_PAGE, ge=0, le=MAX_GROUPS_PAGE),
                         offset: int = Query(0, ge=0, le=MAX_ID)) -> dict[str, Any]:
        """A page of the index's groups of duplicates as the last ``imgdb duplicates`` run left them
        (comparing is a job for the command, not for a request), each image with its thumbnail;
        ``total`` says how many groups there are, as a large collection's do not fit one answer."""
        found = await run_in_threadpool(lambda: _db(request).duplicates(index, level=level, update=False,
                                                                        limit=limit, offset=offset))
        thumbnail = _thumbnails(request)
        for group in found.groups:
            for image in group["images"]:
                image["thumbnail"] = thumbnail(image["id"])
        return {"groups": found.groups, "index": found.index, "total": found.total, "offset": offset}

    @app.post("/duplicates/{group}/resolve", dependencies=[Depends(_require_token)])
    async def resolve(request: Request, group: ImageId, keep: int = Query(..., ge=1, le=MAX_ID),
                      index: str = Query(DEFAULT_INDEX, max_length=40), level: str = Query("near", max_length=20),
                      delete_others: bool = False, merge_metadata: bool = False) -> dict[str, Any]:
        """Settle a group: keep one image, optionally merge the others' metadata into it and delete
        them (token required, as for DELETE)."""
        done = await run_in_threadpool(lambda: _db(request).resolve_duplicates(
            group, keep=keep, index=index, level=level, delete_others=delete_others, merge_metadata=merge_metadata))
        return done.to_json()

    @app.post("/explain")
    async def explain(request: Request, image_id: int = Query(..., ge=1, le=MAX_ID),
                      index: str = DEFAULT_INDEX) -> Response:
        """A PNG of the local-feature matches between the query (the body, as for /search) and a
        stored image, with the inlier count in ``X-Inliers`` and ``X-Verified``."""
        db = _db(request)
        query = await _search_query(request)
        found = await run_in_threadpool(db.explain, query, image_id, index=index)
        return Response(found.png, media_type="image/png",
                        headers={"X-Inliers": str(found.inliers), "X-Verified": str(found.verified).lower()})

    @app.get("/images/{image_id}", name="original")
    async def original_image(request: Request, image_id: ImageId) -> Response:
        """The original, while it is still the image that was ingested (its file, or for an image of
        an attached table's bytea column, the table's bytes, hashing to the stored sha256)."""
        try:
            found = await run_in_threadpool(_db(request).original, image_id)
        except ImageReadError as exc:
            raise ApiError(404, f"image {image_id}: {exc}") from None
        return Response(found.data, media_type=found.media_type)

    @app.get("/images/{image_id}/thumbnail", name="thumbnail")
    async def thumb(request: Request, image_id: ImageId) -> FileResponse:
        """A JPEG of at most 256 px a side, made once and cached."""
        try:
            path = await run_in_threadpool(_db(request).thumbnail, image_id)
        except ImageReadError as exc:
            raise ApiError(404, f"no thumbnail for image {image_id}: {exc}") from None
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    @app.post("/images", status_code=201, dependencies=[Depends(_require_token)])
    async def add(request: Request, index: str = DEFAULT_INDEX) -> dict[str, Any]:
        """Add an image (upload `file`, or JSON `url`) with optional `meta` (a JSON object; token required)."""
        db = _db(request)
        kind, (value, extra) = await _query(request)
        if kind == "id":
            raise ApiError(400, "an image to add is an upload or a URL, not an id")
        meta = extra.get("meta") or {}
        if isinstance(meta, str):
            meta = imgdb.parse_json(meta, "meta")
        meta = imgdb.check_metadata(meta, "meta")
        if reserved := sorted(RESERVED_META & set(meta)):
            raise ApiError(400, f"meta.{reserved[0]} is set by imgdb, not by the request")
        if kind == "url":
            meta = {**meta, "source_url": value}
        data = await _fetched(request, value) if kind == "url" else value
        return await run_in_threadpool(lambda: db.add_image(data, meta=meta, index=index))

    @app.delete("/images/{image_id}", dependencies=[Depends(_require_token)])
    async def delete(request: Request, image_id: ImageId) -> dict[str, int]:
        """Remove an image and its vectors (token required)."""
        deleted = await run_in_threadpool(_db(request).delete, [image_id])
        if not deleted:
            raise ApiError(404, f"no image {image_id}")
        return {"deleted": deleted}


def _thumbnails(request: Request) -> Callable[[int], str]:
    """Each image's thumbnail URL, relative to the server (or IMGDB_PUBLIC_URL): never built from the
    request's Host header, which the client chooses. One route lookup per response, not per image."""
    prefix, _, suffix = request.app.url_path_for("thumbnail", image_id=0).rpartition("/0/")
    public = _db(request).settings.public_url
    base = public.rstrip("/") if public else ""
    return lambda image_id: f"{base}{prefix}/{image_id}/{suffix}"


async def _search_query(request: Request) -> str | bytes:
    """What a search or an explanation looks for: ``id:N``, or the bytes uploaded or fetched."""
    kind, (value, _) = await _query(request)
    if kind == "id":
        return f"id:{value}"
    return await _fetched(request, value) if kind == "url" else value


async def _fetched(request: Request, url: str) -> bytes:
    """A URL's bytes, downloaded in the fetch pool (with every check of the guarded fetcher)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.fetcher, _db(request).fetch, url)
