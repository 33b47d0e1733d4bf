"""Retrieval quality on a data set in the layout of ``../shared/CONVENTIONS.md``: mAP, recall@k and all@k.

The gallery (``images/``) is ingested into the index if needed, with ``metadata.json`` as its user
metadata. Gallery images are matched to database rows by content hash, so a gallery ingested earlier
from another path still counts. Every query runs through the search path users get (first stage and
re-rank, with the ``rerank``/``candidates`` options of a search) for the top of its ranking; mAP
needs the full ranking, so the rest of the gallery follows in exact distance order. A query that is
itself a gallery image is left out of its own ranking, and ``junk`` images are removed before
scoring (the Oxford/Paris protocol).

recall@k is the retrieval literature's: the share of queries with a relevant image among the first
k. all@k is stricter, for queries with several relevant images (a photo of two paintings): the
share of queries whose relevant images are all among the first k + (relevant - 1), so that a photo
of two paintings counts at 1 only when both are its first two results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgdb.catalog import Catalog
from imgdb.db import images
from imgdb.db import search as sql
from imgdb.errors import ImgdbError
from imgdb.io import sources
from imgdb.io.reader import read_file, sha256_hex
from imgdb.jobs.ingest import ProgressCallback, StatusCallback, ingest
from imgdb.jobs.search import encode, search
from imgdb.query.parts import EncodedQuery



def average_precision(relevant_mask: np.ndarray) -> float:
    """Non-interpolated AP of a ranking given as a boolean mask of relevant positions (best first)."""
    hits = np.flatnonzero(relevant_mask)
    if hits.size == 0:
        return 0.0
    precision_at_hits = np.arange(1, hits.size + 1) / (hits + 1)
    return float(precision_at_hits.mean())


@dataclass
class EvalReport:
    index: str
    extractor: str
    queries: int
    mAP: float
    recall_at_1: float
    recall_at_10: float
    all_at_1: float
    all_at_10: float
    per_query: list[dict[str, Any]] = field(default_factory=list)
    #: The ranking scored: the re-ranking chain (and the fusion, over several indexes).
    rerank: str = "exact"

    def to_json(self, per_query: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mAP": round(self.mAP, 4), "recall@1": round(self.recall_at_1, 4),
            "recall@10": round(self.recall_at_10, 4), "all@1": round(self.all_at_1, 4),
            "all@10": round(self.all_at_10, 4), "queries": self.queries,
            "index": self.index, "extractor": self.extractor, "rerank": self.rerank,
        }
        if per_query:
            out["per_query"] = self.per_query
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImgdbError(f"cannot read {path}: {exc}") from None


#: Results taken from the search path per query; the rest of the ranking is exact.
SEARCH_DEPTH = 100


def evaluate(catalog: Catalog, dataset: str | Path, *, index: str, rerank: str = "exact",
             candidates: int | None = None, fusion: str = "rrf", on_progress: ProgressCallback | None = None,
             on_status: StatusCallback | None = None) -> EvalReport:
    """Ingest ``dataset``'s gallery into ``index`` if needed, run its queries, and score them.
    ``index`` may name several indexes (``a,b``): each gets the gallery, the queries' rankings are
    fused (``fusion``), and the first index's exact distances order the rest of the ranking."""
    root = Path(sources.absolute(dataset))  # symlinks kept, as the gallery walk keeps them
    gallery_dir = root / "images"
    if not gallery_dir.is_dir() or not (root / "queries.json").is_file():
        raise ImgdbError(f"{root} is not a data set: it needs an images/ folder and a queries.json")
    queries = _read_json(root / "queries.json")
    metadata_file = root / "metadata.json"
    names = [name.strip() for name in index.split(",")]
    for name in names:
        report = ingest(catalog, [gallery_dir], index=name,
                        metadata_file=metadata_file if metadata_file.exists() else None,
                        on_progress=on_progress, on_status=on_status)
        if report.failed:
            raise ImgdbError(f"{len(report.failed)} gallery image(s) could not be ingested into {name!r}, e.g. "
                             f"{report.failed[0].path}: {report.failed[0].error}")

    # Gallery path (relative to the data set) -> image id, through the content hash.
    paths = [Path(p) for p in sources.expand([gallery_dir])]
    hashes = {p: sha256_hex(read_file(p)) for p in paths}
    target = catalog.index(names[0])
    with catalog.database.connect() as conn:
        ids_by_hash = images.ids_by_hash(conn, list(set(hashes.values())))
    id_of = {p.relative_to(root).as_posix(): ids_by_hash[h] for p, h in hashes.items()}
    gallery_ids = sorted(set(id_of.values()))
    stored = catalog.database.searching(lambda conn: sql.stored_vectors(conn, target, gallery_ids))
    gallery = np.stack([stored[i] for i in gallery_ids])
    row_of = {image_id: row for row, image_id in enumerate(gallery_ids)}
    path_of = {image_id: path for path, image_id in id_of.items()}

    aps: list[float] = []
    first_ranks: list[int | None] = []
    all_ranks: list[int | None] = []
    per_query: list[dict[str, Any]] = []
    for entry in queries:
        query_path = entry["query"]
        self_id = id_of.get(query_path)
        source = f"id:{self_id}" if self_id is not None else root / query_path
        query = EncodedQuery(*encode(catalog, target, source))
        vector = query.vector
        head = [hit.id for hit in search(catalog, query if len(names) == 1 else source,
                                         k=min(SEARCH_DEPTH, len(gallery_ids)), index=index, rerank=rerank,
                                         candidates=candidates, fusion=fusion)
                if hit.id in row_of]
        tail = [gallery_ids[r] for r in np.argsort(np.linalg.norm(gallery - vector, axis=1), kind="stable")]
        excluded = {id_of[p] for p in entry.get("junk", []) if p in id_of}
        if self_id is not None:
            excluded.add(self_id)
        relevant = {id_of[p] for p in entry["relevant"] if p in id_of}
        order = [i for i in dict.fromkeys(head + tail) if i not in excluded]
        mask = np.fromiter((image_id in relevant for image_id in order), dtype=bool, count=len(order))
        ap = average_precision(mask)
        ranks = np.flatnonzero(mask) + 1
        aps.append(ap)
        first_ranks.append(int(ranks[0]) if ranks.size else None)
        # all@k's rank: where the last relevant image is, less the places the others take before it.
        wanted = len(relevant)
        all_ranks.append((int(ranks[wanted - 1]) - (wanted - 1)) if wanted and ranks.size >= wanted else None)
        extra = {k: v for k, v in entry.items() if k not in ("query", "relevant", "junk")}
        per_query.append({"query": query_path, "ap": round(ap, 4), "first_relevant_rank": first_ranks[-1],
                          "found_rank": all_ranks[-1], "top": [path_of[i] for i in order[:5]], **extra})

    def share(found: list[int | None], k: int) -> float:
        return float(np.mean([r is not None and r <= k for r in found])) if found else 0.0

    return EvalReport(index=index, extractor=",".join(catalog.index(name).extractor for name in names),
                      queries=len(queries), mAP=float(np.mean(aps)) if aps else 0.0,
                      recall_at_1=share(first_ranks, 1), recall_at_10=share(first_ranks, 10),
                      all_at_1=share(all_ranks, 1), all_at_10=share(all_ranks, 10), per_query=per_query,
                      rerank=rerank + (f", fused by {fusion}" if len(names) > 1 else ""))

