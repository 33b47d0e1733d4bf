"""Search: a query decoded and encoded as its index's gallery was, then the query path
(:mod:`imgdb.query.plan`) on a pooled search connection, or several indexes' rankings fused.

A process that only searches loads none of what writes: the registry row is read over the search
path's own psycopg connections (:meth:`imgdb.ann.layer.AnnLayer.record`) and SQLAlchemy is touched
only to create the default index or to compile a filter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image

from imgdb import lazy
from imgdb.catalog import Catalog
from imgdb.db import records
from imgdb.db import search as sql
from imgdb.db.records import IndexRecord
from imgdb.errors import ConcurrentChange, ImageNotFound, ImgdbError
from imgdb.features import keypoints
from imgdb.io import sources
from imgdb.io.reader import rgb
from imgdb.query import fusion as fusion_of
from imgdb.query import plan, scores
from imgdb.query.parts import EncodedQuery, QueryImage

if TYPE_CHECKING:
    from imgdb.db import filters as filtering
else:
    filtering = lazy.module("imgdb.db.filters")

#: What a query can be: a path, an http(s) URL, ``"id:N"``, image bytes, a Pillow image, a vector, or
#: a query encoded already (:func:`encode`).
Query = Union[str, Path, bytes, Image.Image, np.ndarray, EncodedQuery]
#: Largest k and first-stage candidate count a search takes (pgvector's HNSW stops at 1,000 anyway).
MAX_K = 1000
MAX_CANDIDATES = 100_000
#: ``id:N`` names a stored image; anything else after ``id:`` is refused, never read as a file name.
_ID_QUERY = re.compile(r"^id:(.*)$", re.DOTALL)


def search(catalog: Catalog, query: Query, *, k: int = 10, filters: Sequence[str] = (), index: str,
           rerank: str = "exact", candidates: int | None = None, fusion: str = "rrf",
           min_score: float | None = None) -> list[sql.Hit]:
    """The ``k`` images of ``index`` most similar to ``query`` that pass ``filters``, each with its
    calibrated ``score`` where the index has learned one, and only those scored ``min_score`` or
    more where given (see :meth:`imgdb.client.Imgdb.search`)."""
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise ImgdbError(f"min_score must be between 0 and 1, not {min_score}")
    if k < 1:
        raise ImgdbError(f"k must be at least 1, not {k}")
    if k > MAX_K:
        raise ImgdbError(f"k must be at most {MAX_K}, not {k}")
    if candidates is not None and not 1 <= candidates <= MAX_CANDIDATES:
        raise ImgdbError(f"candidates must be between 1 and {MAX_CANDIDATES}, not {candidates}")
    names = [name.strip() for name in index.split(",")]
    if len(names) > 1:
        if min_score is not None:
            raise ImgdbError("a score cut-off works on one index: each index's scores mean what its own distances do")
        fusion_of.check(fusion, names)
        for name in names:
            records.check_name(name)
        if isinstance(query, (str, Path)) and not _ID_QUERY.match(str(query).strip()):
            query = sources.load(query, catalog.settings.fetch)  # read once, decoded by each index
        depth = max(k, fusion_of.DEPTH)
        return fusion_of.fuse({name: search(catalog, query, k=depth, filters=filters, index=name, rerank=rerank,
                                            candidates=candidates) for name in names}, k, fusion)
    records.check_name(index)
    clauses = filtering.parse_filters(filters) if filters else []
    for attempt in (1, 2):
        target = catalog.layer.record(index)
        if target is None:
            catalog.index(index)  # creates `default`, or says what is missing
            target = catalog.layer.record(index) or catalog.index(index)
        vector, image = encode(catalog, target, query)
        try:
            hits = catalog.database.searching(lambda conn: plan.search(
                catalog.layer, conn, target, vector, k, clauses, image=image, rerank=rerank, candidates=candidates))
            return scored(target, hits, min_score)
        except ConcurrentChange:
            # Dropped (and maybe re-created) by another process since this one cached it: ask again.
            catalog.layer.forget(target)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def scored(index: IndexRecord, hits: list[sql.Hit], min_score: float | None) -> list[sql.Hit]:
    """``hits`` with their calibrated scores (:mod:`imgdb.query.scores`), those under ``min_score``
    left out."""
    model = scores.Calibration.of(index.score_state)
    if model is None:
        if min_score is not None:
            raise ImgdbError(f"index {index.name!r} has not learned its scores yet: "
                             f"run `imgdb index calibrate {index.name}`")
        return hits
    found = [replace(hit, notes={**hit.notes, "score": model.score(hit.distance, hit.notes)}) for hit in hits]
    return [hit for hit in found if min_score is None or hit.notes["score"] >= min_score]


def encode(catalog: Catalog, index: IndexRecord, query: Query) -> tuple[np.ndarray, QueryImage]:
    """The query's vector, and its image for the re-rankers that look at one (its pixels, decoded
    once, or the stored image ``id:N`` names)."""
    if isinstance(query, EncodedQuery):
        return encode(catalog, index, query.vector)[0], query.image
    if isinstance(query, np.ndarray):
        if query.shape != (index.dim,):
            raise ImgdbError(f"query vector has shape {query.shape}, index {index.name!r} needs ({index.dim},)")
        return query.astype(np.float32), QueryImage()
    if isinstance(query, str) and (match := _ID_QUERY.match(query.strip())):
        digits = match.group(1)
        if not (digits.isascii() and digits.isdigit()):
            raise ImgdbError(f"an image id is a positive integer, not {digits[:30]!r}")
        image_id = int(digits) if len(digits) <= 19 else records.MAX_ID + 1  # (longer: no such image)
        found = catalog.database.searching(lambda conn: sql.stored_vectors(conn, index, [image_id])) \
            if 0 < image_id <= records.MAX_ID else {}
        if image_id not in found:
            raise ImageNotFound(f"image {digits[:30]} is not in index {index.name!r}")
        return found[image_id], QueryImage(image_id=image_id)
    from imgdb.encoding import embed_image, embed_pixels  # (the decoding pipeline: photos only)

    extractor = catalog.extractor(index)
    if not extractor.ready:  # (an index of the default extractor before its first ingest)
        raise ImgdbError(f"index {index.name!r} has not learned its codebook yet: ingest images into it first "
                         f"(or `imgdb index train {index.name} PATHS` to learn from other images)")
    if isinstance(query, Image.Image):
        pixels = rgb(query)
        return embed_pixels(extractor, pixels, catalog.model_gate), QueryImage(pixels)
    data = query if isinstance(query, bytes) else sources.load(query, catalog.settings.fetch)
    spec = None if index.local is None else keypoints.parse_keypoints(index.local)
    try:
        vector, pixels = embed_image(extractor, data, catalog.settings, catalog.model_gate, spec)
        return vector, QueryImage(pixels)
    except ImgdbError as exc:
        where = "query image" if isinstance(query, bytes) else str(query)
        raise type(exc)(f"{where}: {exc}") from None
