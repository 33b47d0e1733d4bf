"""``imgdb index train``: learn an index's extractor state again, and re-encode its images with it.

Nothing of the index changes until the new state has encoded everything it can: the state is
learned into a fresh extractor (searches keep the old one), every image is read again (its file
or URL while it still hashes to the stored sha256, or its attached table's bytea) and encoded into
a table of its own, and only then, in one transaction, are the new state and the new table swapped
in. An image that cannot be read again keeps its old vector, and the report names it: no image
vanishes because its file moved or its URL died. Searches meanwhile use the old state and vectors;
after the swap, by exact scan until the ANN index is built again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL import Image

from imgdb.catalog import Catalog
from imgdb.db import attached, images, staging, state, vectors
from imgdb.db.images import StoredImage
from imgdb.db.records import IndexRecord
from imgdb.errors import ImgdbError
from imgdb.io import sources
from imgdb.io.fetch import is_url
from imgdb.jobs.ingest import Blob, Failure, Ingester, IngestReport, Item, Prepared, ProgressCallback, StatusCallback


def retrain(catalog: Catalog, index: IndexRecord, paths: Sequence[str] = (), *,
            on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None) -> IngestReport:
    """Learn ``index``'s extractor state from ``paths`` (files, folders, URLs), or from a sample of
    the images it holds, re-encode them with it into a new table, and swap both in; the report
    counts the images re-encoded and lists those that kept their old vectors."""
    started = time.perf_counter()
    if not catalog.extractor(index).trainable:
        raise ImgdbError(f"index {index.name!r} ({index.extractor}) has nothing to train")
    fresh = catalog.new_extractor(index)
    ingester = Ingester(catalog, index, fresh)
    with catalog.database.connect() as conn:
        held = images.of_index(conn, index)
    given = list(sources.expand(paths))
    if not given and not held:
        raise ImgdbError(f"nothing to train {index.name!r} on: give images, or ingest some first")
    rng = random.Random(0)
    sample = (rng.sample(given, fresh.sample_size(len(given))) if given
              else list(stored_items(ingester, rng.sample(held, fresh.sample_size(len(held))))))
    if on_status:
        on_status(f"training {fresh.spec} on {len(sample)} images")
    fresh.fit([item.prepared for item in ingester.load(sample) if isinstance(item, Prepared)])

    with catalog.database.engine.begin() as conn:
        staging.create_next(conn, index)
    if on_status:
        on_status(f"re-encoding the {len(held)} images of {index.name!r}")
    report = IngestReport()
    for batch in read_back(ingester, held, report, on_progress):
        encoded = fresh.embed([loaded.prepared for _, loaded in batch])
        with catalog.database.engine.begin() as conn:
            vectors.copy(conn, index, [row.image_id for row, _ in batch], encoded,
                         direct=[row.direct for row, _ in batch], table=staging.next_table(index))
        report.added += len(batch)
    with catalog.database.engine.begin() as conn:
        state.lock_learning(conn, index)
        kept = staging.keep_unencoded(conn, index)
        state.save(conn, index, fresh.state())
        staging.swap_in_next(conn, index)
    catalog.forget(index)
    catalog.layer.sync(index, relearn=True)
    if on_status and kept:
        on_status(f"{kept} images kept their old vectors: they could not be read again")
    report.seconds = time.perf_counter() - started
    return report


def read_back(ingester: Ingester, held: Sequence[StoredImage], report: IngestReport,
              on_progress: ProgressCallback | None, prepare: Callable[[Image.Image], Any] | None = None,
              outcome: str = "its old vector is kept") -> Iterator[list[tuple[StoredImage, Prepared]]]:
    """The index's images read again and prepared (by ``prepare``, default the extractor's), in
    extractor batches; those that cannot be read, or are no longer the image that was ingested, go
    to ``report.failed``, their reason followed by ``outcome``."""
    batch: list[tuple[StoredImage, Prepared]] = []
    loads = ingester.load(stored_items(ingester, held), prepare=prepare)
    for done, (row, loaded) in enumerate(zip(held, loads), start=1):
        if isinstance(loaded, Failure):
            report.failed.append(Failure(loaded.path, f"{loaded.error}; {outcome}"))
        elif not isinstance(loaded, Prepared) or loaded.facts.sha256 != row.sha256:
            report.failed.append(Failure(row.uri, f"the file has changed since it was ingested; {outcome}"))
        else:
            batch.append((row, loaded))
            if len(batch) >= ingester.extractor.batch_size:
                yield batch
                batch = []
        if on_progress:
            on_progress(done, len(held))
    if batch:
        yield batch


def stored_items(ingester: Ingester, held: Sequence[StoredImage]) -> Iterator[Item]:
    """What to read for each image: its file or URL, or (an attached table's bytea, under a
    ``table:`` uri) the bytes the table holds now. Lazily: the reader stays a few batches ahead."""
    for row in held:
        if is_url(row.uri) or sources.original_path(row.uri) is not None:
            yield row.uri
            continue
        with ingester.database.connect() as conn:
            data = attached.image_bytes(conn, row.image_id, ingester.settings.fetch.max_bytes)
        yield Blob(row.uri, data) if data is not None else row.uri  # (no bytes: read fails, with a reason)

