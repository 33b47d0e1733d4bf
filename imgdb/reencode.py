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
from typing import TYPE_CHECKING, Any

from PIL import Image

from imgdb.db import attached, store
from imgdb.db.store import Stored
from imgdb.errors import ImgdbError
from imgdb.features.base import Extractor
from imgdb.features.registry import extractor_class
from imgdb.features.spec import parse_spec
from imgdb.ingest import Blob, Failure, Ingester, IngestReport, Item, Prepared, ProgressCallback, StatusCallback
from imgdb.io import sources
from imgdb.io.fetch import is_url

if TYPE_CHECKING:
    from imgdb.client import Imgdb
    from imgdb.orm import SearchIndex


def retrain(db: Imgdb, index: SearchIndex, paths: Sequence[str] = (), *,
            on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None) -> IngestReport:
    """Learn ``index``'s extractor state from ``paths`` (files, folders, URLs), or from a sample of
    the images it holds, re-encode them with it into a new table, and swap both in; the report
    counts the images re-encoded and lists those that kept their old vectors."""
    started = time.perf_counter()
    spec = parse_spec(index.extractor)
    fresh: Extractor = extractor_class(spec.family).from_spec(spec)
    ingester = Ingester(db.database, index, fresh, db.settings, db.layer)
    with db.database.connect() as conn:
        images = store.stored_images(conn, index)
    given = list(sources.expand(paths))
    if not given and not images:
        raise ImgdbError(f"nothing to train {index.name!r} on: give images, or ingest some first")
    rng = random.Random(0)
    sample = (rng.sample(given, fresh.sample_size(len(given))) if given
              else list(stored_items(ingester, rng.sample(images, fresh.sample_size(len(images))))))
    if on_status:
        on_status(f"training {fresh.spec} on {len(sample)} images")
    fresh.fit([item.prepared for item in ingester.load(sample) if isinstance(item, Prepared)])

    with db.database.engine.begin() as conn:
        store.create_next(conn, index)
    if on_status:
        on_status(f"re-encoding the {len(images)} images of {index.name!r}")
    report = IngestReport()
    for batch in read_back(ingester, images, report, on_progress):
        vectors = fresh.embed([loaded.prepared for _, loaded in batch])
        with db.database.engine.begin() as conn:
            store.copy_vectors(conn, index, [row.image_id for row, _ in batch], vectors,
                               direct=[row.direct for row, _ in batch], table=store.next_table(index))
        report.added += len(batch)
    with db.database.engine.begin() as conn:
        store.lock_training(conn, index)
        kept = store.keep_unencoded(conn, index)
        store.save_state(conn, index, fresh.state())
        store.swap_in_next(conn, index)
    db.forget_extractor(index)
    db.layer.forget(index)
    db.layer.sync(index, retrain=True)
    if on_status and kept:
        on_status(f"{kept} images kept their old vectors: they could not be read again")
    report.seconds = time.perf_counter() - started
    return report


def read_back(ingester: Ingester, images: Sequence[Stored], report: IngestReport,
              on_progress: ProgressCallback | None, prepare: Callable[[Image.Image], Any] | None = None,
              outcome: str = "its old vector is kept") -> Iterator[list[tuple[Stored, Prepared]]]:
    """The index's images read again and prepared (by ``prepare``, default the extractor's), in
    extractor batches; those that cannot be read, or are no longer the image that was ingested, go
    to ``report.failed``, their reason followed by ``outcome``."""
    batch: list[tuple[Stored, Prepared]] = []
    loads = ingester.load(stored_items(ingester, images), prepare=prepare)
    for done, (row, loaded) in enumerate(zip(images, loads), start=1):
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
            on_progress(done, len(images))
    if batch:
        yield batch


def stored_items(ingester: Ingester, images: Sequence[Stored]) -> Iterator[Item]:
    """What to read for each image: its file or URL, or (an attached table's bytea, under a
    ``table:`` uri) the bytes the table holds now. Lazily: the reader stays a few batches ahead."""
    for row in images:
        if is_url(row.uri) or sources.original_path(row.uri) is not None:
            yield row.uri
            continue
        with ingester.db.connect() as conn:
            data = attached.image_bytes(conn, row.image_id, ingester.settings.fetch.max_bytes)
        yield Blob(row.uri, data) if data is not None else row.uri  # (no bytes: read fails, with a reason)

