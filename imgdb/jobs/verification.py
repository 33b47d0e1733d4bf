"""``imgdb index verify``: an index keeps its images' local features, for ``--rerank verify``.

Enabling records the spec on the index, so that ingest stores the features of every image it adds
from then on (with the vectors, in the same transaction), and fills in those of the images the
index holds already, read again as re-encoding reads them (files while they still hash to what was
ingested, URLs, attached tables' bytea). An image that cannot be read again is reported and stays
searchable; it just never verifies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from imgdb.catalog import Catalog
from imgdb.db import images, local_features
from imgdb.db.records import IndexRecord
from imgdb.features import keypoints
from imgdb.jobs.ingest import Failure, Ingester, IngestReport, ProgressCallback
from imgdb.jobs.reencode import read_back


@dataclass
class VerifyReport:
    index: str
    local: str | None
    added: int = 0
    images: int = 0
    bytes_per_image: float = 0.0
    seconds: float = 0.0
    failed: list[Failure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "local": self.local, "added": self.added, "images": self.images,
                "bytes_per_image": round(self.bytes_per_image, 1), "seconds": round(self.seconds, 3),
                "failed": [{"path": f.path, "error": f.error} for f in self.failed]}


def enable(catalog: Catalog, index: IndexRecord, text: str,
           on_progress: ProgressCallback | None = None) -> VerifyReport:
    """Make ``index`` keep local features of spec ``text`` and store those its images lack."""
    started = time.perf_counter()
    spec = keypoints.parse_keypoints(text)
    with catalog.database.engine.begin() as conn:
        local_features.set_spec(conn, index, str(spec))
    catalog.layer.forget(index)
    index = catalog.index(index.name)
    ingester = Ingester(catalog, index)
    with catalog.database.connect() as conn:
        missing = set(local_features.without_features(conn, index, str(spec)))
        held = [row for row in images.of_index(conn, index) if row.image_id in missing]
    report = IngestReport()
    added = 0

    def extract(pixels):  # noqa: ANN001, ANN202 - worker-thread part, as ingest's prepare
        return keypoints.quantize(spec.extract(pixels), spec)

    for batch in read_back(ingester, held, report, on_progress, prepare=extract,
                           outcome="it is searched but never verified"):
        rows = [(row.image_id, found.prepared.scale, found.prepared.xy, found.prepared.codes) for row, found in batch]
        with catalog.database.engine.begin() as conn:
            local_features.write(conn, str(spec), rows)
        added += len(rows)
    with catalog.database.connect() as conn:
        count, mean = local_features.footprint(conn, index, str(spec))
    return VerifyReport(index.name, str(spec), added, count, mean, time.perf_counter() - started, report.failed)


def disable(catalog: Catalog, index: IndexRecord) -> VerifyReport:
    """Stop verifying ``index`` (the stored features stay for other indexes of the same images)."""
    with catalog.database.engine.begin() as conn:
        local_features.set_spec(conn, index, None)
    catalog.layer.forget(index)
    return VerifyReport(index.name, None)
