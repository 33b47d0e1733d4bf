"""The Python API: ``imgdb.connect()`` and the :class:`Imgdb` handle, which the CLI and the web app
call too.

::

    import imgdb
    db = imgdb.connect()                       # IMGDB_DATABASE_URL, or the embedded server
    db.ingest(["photos/"], meta={"album": "2024"})
    for hit in db.search("query.jpg", k=5, filters=["meta.album=2024"]):
        print(hit.distance, hit.uri)

Every method delegates: to the catalog (:mod:`imgdb.catalog`: indexes, extractors, networks, the
ANN layer) or to a job (:mod:`imgdb.jobs`) run with it. A process that only searches loads none of
what writes: the jobs that write are imported by the methods that run them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgdb import lazy
from imgdb.catalog import DEFAULT_INDEX, Catalog
from imgdb.config import Settings
from imgdb.db.engine import Database
from imgdb.db.records import IndexRecord
from imgdb.db.search import Hit
from imgdb.errors import ImgdbError
from imgdb.jobs.search import Query, encode, search
from imgdb.query.parts import EncodedQuery

if TYPE_CHECKING:
    from imgdb.db import attached, cluster, derived, images
    from imgdb.jobs.calibrate import CalibrationReport
    from imgdb.jobs.duplicates import DuplicatesReport, Resolution
    from imgdb.jobs.evaluate import EvalReport
    from imgdb.jobs.explain import Explanation
    from imgdb.jobs.ingest import IngestReport, ProgressCallback, StatusCallback
    from imgdb.jobs.originals import Original
    from imgdb.jobs.on_ray import RayOptions
    from imgdb.jobs.sync import AttachReport, SyncReport
    from imgdb.jobs.train import TrainReport
    from imgdb.jobs.verification import VerifyReport
    from imgdb.training.trainer import EpochCallback, TrainOptions
else:
    attached, cluster, derived, images = (lazy.module(f"imgdb.db.{name}")
                                          for name in ("attached", "cluster", "derived", "images"))


class Imgdb:
    """A handle on one imgdb database. Cheap to keep around; models load on first use, once."""

    def __init__(self, database: Database, settings: Settings) -> None:
        #: What the jobs it runs work with (:mod:`imgdb.catalog`).
        self.catalog = Catalog(database, settings)

    @property
    def database(self) -> Database:
        """The database it works on (its URL, connections, schema)."""
        return self.catalog.database

    @property
    def settings(self) -> Settings:
        return self.catalog.settings

    # ------------------------------------------------------------ indexes

    def create_index(self, name: str, extractor: str | None = None, ann: str | None = None,
                     storage: str = "vector") -> IndexRecord:
        """Create an index. ``extractor`` is a spec (stored in canonical form), ``ann`` an ANN spec
        such as ``hnsw/m=32`` or ``ivfpq/lists=1024`` (:mod:`imgdb.ann.registry`; None: ``hnsw``
        where the vectors fit it, ``ivfpq`` where they are longer), ``storage``
        ``vector`` or ``halfvec`` (half the bytes, indexable up to 4000 dimensions)."""
        return self.catalog.create_index(name, extractor, ann, storage)

    def indexes(self) -> list[IndexRecord]:
        """Every index, with its number of vectors."""
        return self.catalog.indexes()

    def index(self, name: str = DEFAULT_INDEX) -> IndexRecord:
        """The named index; ``default`` is created with the default extractor on first use."""
        return self.catalog.index(name)

    def drop_index(self, name: str) -> None:
        """Delete an index and its vectors (the images stay), detaching its tables first."""
        self.catalog.drop_index(name)

    def rebuild_index(self, name: str, ann: str | None = None,
                      on_status: StatusCallback | None = None) -> IndexRecord:
        """Rebuild an index's first stage from its stored vectors, optionally switching to another
        ANN spec (parameters not given keep their current values when the method stays)."""
        from imgdb.jobs.vectors import rebuild

        return rebuild(self.catalog, name, ann, on_status)

    def verify_index(self, name: str, local: str | None = "rootsift",
                     on_progress: ProgressCallback | None = None) -> VerifyReport:
        """Make index ``name`` keep its images' local features (spec such as
        ``rootsift/side=640/keypoints=500``, see :mod:`imgdb.features.keypoints`) for
        ``rerank="verify"``, storing those of the images it holds; ``local=None`` stops it."""
        from imgdb.jobs import verification

        index = self.index(name)
        if local is None:
            return verification.disable(self.catalog, index)
        return verification.enable(self.catalog, index, local, on_progress)

    def calibrate(self, name: str, *, sample: int | None = None, among: Iterable[int] | None = None,
                  on_progress: ProgressCallback | None = None,
                  on_status: StatusCallback | None = None) -> CalibrationReport:
        """Have index ``name`` learn what its distances mean, from edited copies of ``sample`` of its
        images (of ``among``, where given), so that hits carry a ``score`` and searches take a
        ``min_score`` (:mod:`imgdb.jobs.calibrate`)."""
        from imgdb.jobs.calibrate import SAMPLE, calibrate

        return calibrate(self.catalog, self.index(name), sample=SAMPLE if sample is None else sample,
                         among=None if among is None else set(among), on_progress=on_progress, on_status=on_status)

    def calibrated(self, name: str = DEFAULT_INDEX) -> bool:
        """Whether index ``name`` has learned its scores (:meth:`calibrate`)."""
        found = self.catalog.layer.record(name) or self.index(name)
        return bool(found.score_state)

    def duplicates(self, index: str = DEFAULT_INDEX, *, level: str | None = None, k: int | None = None,
                   update: bool = True, limit: int | None = None, offset: int = 0,
                   on_progress: ProgressCallback | None = None,
                   on_status: StatusCallback | None = None) -> DuplicatesReport:
        """The index's groups of duplicate images (of ``level``: ``exact``, ``near`` or ``similar``;
        default every level), each with its representative and every member's evidence; with
        ``update`` (the default), after comparing the images added since the last run with their
        ``k`` nearest (:mod:`imgdb.jobs.duplicates`). ``limit`` and ``offset`` ask for a page of the
        groups (``total`` says how many there are). The groups are kept in SQL (the index's
        ``duplicates_<name>`` view)."""
        from imgdb.jobs.duplicates import K, find

        return find(self.catalog, index, level=level, k=K if k is None else k, update=update, limit=limit,
                    offset=offset, on_progress=on_progress, on_status=on_status)

    def resolve_duplicates(self, group: int, *, keep: int, index: str = DEFAULT_INDEX, level: str = "near",
                           delete_others: bool = False, merge_metadata: bool = False) -> Resolution:
        """Settle one group of :meth:`duplicates`: keep image ``keep``, optionally give it the others'
        metadata and delete the others; the group's images never group together again. Nothing is
        deleted but by ``delete_others``."""
        from imgdb.jobs.duplicates import resolve

        return resolve(self.catalog, index, group, keep=keep, level=level, delete_others=delete_others,
                       merge_metadata=merge_metadata)

    def export_index(self, name: str, path: str | Path) -> dict[str, Any]:
        """Write an index, with its learned state and network, to one file (:mod:`imgdb.jobs.transfer`)."""
        from imgdb.jobs.transfer import export_index

        return export_index(self.catalog, name, path)

    def import_index(self, path: str | Path, name: str | None = None, *,
                     originals: str | Path | None = None) -> dict[str, Any]:
        """Create an index from :meth:`export_index`'s file (under ``name``, default its own).
        ``originals``: the folder of this machine holding the images' files, if any: only paths
        inside it are ever read (originals, thumbnails); others are kept as ``archive://PATH``."""
        from imgdb.jobs.transfer import import_index

        return import_index(self.catalog, path, name, originals)

    def warm_up(self, index: str = DEFAULT_INDEX) -> None:
        """Load an index's model now, so that the first query does not wait for it (a server)."""
        self.catalog.extractor(self.index(index))

    # ------------------------------------------------------------ offline stage

    def ingest(self, paths: Iterable[str | Path], *, index: str = DEFAULT_INDEX,
               meta: dict[str, Any] | None = None, metadata_file: str | Path | None = None,
               on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None,
               ray: RayOptions | None = None, near_duplicates: str | None = None) -> IngestReport:
        """Add files, folders (recursively), URLs, ``s3://``/``gs://`` objects and ``.txt`` lists of them
        (:func:`imgdb.io.sources.expand`) to ``index``; see :class:`~imgdb.jobs.ingest.Ingester`.
        With ``ray``, the work runs on a Ray cluster's actors (:mod:`imgdb.jobs.on_ray`).
        ``near_duplicates``: ``skip`` leaves out an image that is the same picture as one the index
        holds (or one before it in the load), ``link`` writes it and records the pair; either is
        reported per image (the index learns its scores first where it has not)."""
        if ray is not None:
            from imgdb.jobs import on_ray

            return on_ray.ingest(self.catalog, paths, index=index, options=ray, meta=meta,
                                 metadata_file=metadata_file, on_progress=on_progress, on_status=on_status,
                                 near_duplicates=near_duplicates)
        from imgdb.jobs.ingest import ingest

        screen = None
        if near_duplicates is not None:
            from imgdb.jobs.duplicates import screen_for

            screen = screen_for(self.catalog, index, near_duplicates, on_status)
        return ingest(self.catalog, paths, index=index, meta=meta, metadata_file=metadata_file,
                      on_progress=on_progress, on_status=on_status, screen=screen)

    def add_image(self, data: bytes, *, meta: dict[str, Any] | None = None,
                  index: str = DEFAULT_INDEX) -> dict[str, Any]:
        """Add an image given as bytes (an upload): kept under ``IMGDB_HOME/uploads`` and ingested
        from there; its ``id``, whether it was ``added`` (new to the index) and its ``uri``."""
        from imgdb.jobs.originals import add

        return add(self.catalog, data, meta or {}, index)

    def train(self, index: str, paths: Iterable[str | Path] = (), *,
              on_progress: ProgressCallback | None = None,
              on_status: StatusCallback | None = None) -> IngestReport:
        """(Re)learn a trainable index's codebook from ``paths``, or from the images it holds, and
        re-encode its images with it; returns the report of that re-encoding. Nothing changes
        until it is complete, and images that cannot be read again keep their old vectors
        (:mod:`imgdb.jobs.reencode`)."""
        from imgdb.db import duplicates as judged
        from imgdb.jobs.reencode import retrain

        calibrated = self.calibrated(index)
        report = retrain(self.catalog, self.index(index), [str(p) for p in paths],
                         on_progress=on_progress, on_status=on_status)
        # Its distances changed: what they mean is learned again, and its pairs judged again.
        with self.database.engine.begin() as conn:
            judged.forget(conn, self.index(index))
        if calibrated:
            self.calibrate(index, on_status=on_status)
        return report

    def train_network(self, name: str, source: str, *, method: str = "triplet", label_keys: Sequence[str] = (),
                      student: str | None = None, options: TrainOptions | None = None,
                      on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None,
                      on_epoch: EpochCallback | None = None) -> TrainReport:
        """Fine-tune index ``source``'s network on its images into a new index ``name``
        (:mod:`imgdb.jobs.train`); ``source`` is left as it is."""
        from imgdb.jobs.train import train_network  # torch training code, loaded when used

        return train_network(self.catalog, name, source, method=method, label_keys=label_keys, student=student,
                             options=options, on_status=on_status, on_progress=on_progress, on_epoch=on_epoch)

    def add_vectors(self, ids: Sequence[int], vectors: np.ndarray, *, index: str) -> int:
        """Store vectors computed elsewhere for images already in the database (an ``external``
        index, or precomputed descriptors); returns how many were added (ids already in the index
        are left as they are). A load that at least doubles the index builds its ANN index once at
        the end; a first stage that learns from the data and has not yet learns from these vectors."""
        from imgdb.jobs.vectors import add_vectors

        return add_vectors(self.catalog, ids, vectors, index=index)

    def delete(self, ids: Sequence[int]) -> int:
        """Remove images and their vectors from every index; returns how many existed."""
        with self.database.engine.begin() as conn:
            return images.delete(conn, ids)

    def evaluate(self, dataset: str | Path, *, index: str = DEFAULT_INDEX, rerank: str = "exact",
                 candidates: int | None = None, fusion: str = "rrf", on_progress: ProgressCallback | None = None,
                 on_status: StatusCallback | None = None) -> EvalReport:
        """Retrieval quality on a data set (mAP, recall@k, all@k), its gallery ingested into
        ``index`` if needed (:mod:`imgdb.jobs.evaluate`)."""
        from imgdb.jobs.evaluate import evaluate

        return evaluate(self.catalog, dataset, index=index, rerank=rerank, candidates=candidates, fusion=fusion,
                        on_progress=on_progress, on_status=on_status)

    # ------------------------------------------------------------ application tables

    def attach(self, table: str, column: str, *, key: str | None = None, index: str = DEFAULT_INDEX,
               root: str | Path | None = None) -> AttachReport:
        """Index an application's table where it stands: ``column`` holds each row's image (a file
        path or an http(s) URL, or the image as ``bytea``), ``key`` identifies the row (default: the
        primary key). Installs triggers that queue every change and queues every row there is now;
        :meth:`sync` embeds them. Relative paths resolve under ``root`` (and nothing outside it is read)."""
        from imgdb.jobs.sync import attach

        return attach(self.catalog, table, column, key=key, index=self.index(index),
                      root=None if root is None else str(root))

    def detach(self, table: str, *, index: str | None = None) -> AttachReport:
        """Stop following a table (in ``index``, or in every index it is attached to): its triggers
        go, and so does everything imgdb kept of its rows. The table itself is left as it was."""
        from imgdb.jobs.sync import detach

        return detach(self.catalog, table, index=index)

    def sync(self, index: str | None = None, *, watch: bool = False, retry_failed: bool = False,
             stop: threading.Event | None = None, on_progress: ProgressCallback | None = None,
             on_status: StatusCallback | None = None,
             on_round: Callable[[SyncReport], None] | None = None, ray: RayOptions | None = None) -> SyncReport:
        """Embed what attached tables queued (those of ``index``, or every one); with ``watch``, keep
        doing it as changes come, until ``stop`` is set. See :mod:`imgdb.jobs.sync`. With ``ray``,
        the work runs on a Ray cluster (:mod:`imgdb.jobs.on_ray`): a large table's first fill."""
        from imgdb.jobs.sync import Syncer

        if ray is not None:
            if watch:
                raise ImgdbError("a sync on Ray drains the queue once; --watch runs here")
            from imgdb.jobs import on_ray

            return on_ray.sync(self.catalog, index, options=ray, retry_failed=retry_failed, on_progress=on_progress,
                               on_status=on_status)
        syncer = Syncer(self.catalog)
        if watch:
            return syncer.watch(index, stop=stop, on_round=on_round, on_status=on_status)
        return syncer.run(index, retry_failed=retry_failed, on_progress=on_progress, on_status=on_status)

    def sync_status(self, index: str | None = None) -> list[dict[str, Any]]:
        """Per attached table: rows queued, failed and embedded (the ``sync_status`` view)."""
        target = self.index(index) if index else None
        with self.database.connect() as conn:
            return attached.status(conn, target)

    def sync_failures(self, index: str | None = None) -> list[dict[str, Any]]:
        """Every row that could not be embedded, with its reason (the ``sync_failures`` view)."""
        target = self.index(index) if index else None
        with self.database.connect() as conn:
            return attached.failures(conn, target)

    def distribute(self, shards: int | None = None) -> dict[str, Any]:
        """Distribute imgdb's tables over the Citus cluster this database coordinates (images and
        every index's vectors sharded by image id, the registry replicated: :mod:`imgdb.db.cluster`),
        and return how the data lies. Running it again changes nothing; indexes created later are
        distributed when created."""
        with self.database.engine.begin() as conn:
            cluster.distribute(conn, shards)
        self.database.look_again()
        self.catalog.forget()
        with self.database.connect() as conn:
            return cluster.layout(conn)

    def grant(self, role: str) -> None:
        """Give an application role read access: the views (per index, sync status) and
        ``similar()``, nothing else; views made later are granted too."""
        with self.database.engine.begin() as conn:
            derived.grant(conn, role)

    def revoke(self, role: str) -> None:
        """Take back what :meth:`grant` gave."""
        with self.database.engine.begin() as conn:
            derived.revoke(conn, role)

    # ------------------------------------------------------------ online stage

    def search(self, query: Query, *, k: int = 10, filters: Sequence[str] = (), index: str = DEFAULT_INDEX,
               rerank: str = "exact", candidates: int | None = None, fusion: str = "rrf",
               min_score: float | None = None) -> list[Hit]:
        """The ``k`` images most similar to ``query`` that pass ``filters`` (CLI ``--filter`` syntax).

        ``rerank``: ``exact`` re-ranks the first stage's ``candidates`` by their exact distance to
        the stored vectors, ``pq`` keeps them in product-quantization order, ``none`` in the first
        stage's own order, ``verify`` checks them geometrically; a comma-separated chain runs
        several (see :mod:`imgdb.query`). ``index`` may name several indexes of the same images
        (``"a,b"``): each is searched, and their rankings fused by ``fusion`` (``rrf`` or ``mean``,
        :mod:`imgdb.query.fusion`).

        Where the index has learned its scores (:meth:`calibrate`), each hit carries ``score``, the
        probability that it is the query's picture; ``min_score`` keeps only hits scored that or
        more, however few.
        """
        return search(self.catalog, query, k=k, filters=filters, index=index, rerank=rerank,
                      candidates=candidates, fusion=fusion, min_score=min_score)

    def embed(self, query: Query, *, index: str = DEFAULT_INDEX) -> np.ndarray:
        """The descriptor ``index`` would store for ``query`` (unit length, float32)."""
        return encode(self.catalog, self.index(index), query)[0]

    def encode_query(self, query: Query, *, index: str = DEFAULT_INDEX) -> EncodedQuery:
        """``query`` encoded for ``index`` once: its vector, and its image for the re-rankers that
        look at pixels; :meth:`search` takes it as a query."""
        return EncodedQuery(*encode(self.catalog, self.index(index), query))

    def explain(self, query: Query, image_id: int, *, index: str = DEFAULT_INDEX) -> Explanation:
        """Why stored image ``image_id`` verifies for ``query`` (or not): a PNG of the inlier
        matches side by side, with the inlier count (:mod:`imgdb.jobs.explain`)."""
        from imgdb.jobs.explain import explain  # OpenCV's drawing: only for this

        return explain(self.catalog, query, image_id, index)

    def fetch(self, url: str) -> bytes:
        """An http(s) URL's bytes, through the guarded fetcher (size limit, no private addresses
        unless the settings allow them)."""
        from imgdb.io import sources

        return sources.load(url, self.settings.fetch)

    # ------------------------------------------------------------ stored images

    def image(self, image_id: int) -> dict[str, Any]:
        """An image's record: uri, content hash, facts, user metadata."""
        from imgdb.jobs.originals import record

        return record(self.catalog, image_id)

    def original(self, image_id: int) -> Original:
        """An image's bytes while they are still the image that was ingested, with their media type."""
        from imgdb.jobs.originals import original

        return original(self.catalog, image_id)

    def thumbnail(self, image_id: int) -> Path:
        """A JPEG of at most 256 px a side of the image, made once and cached under ``IMGDB_HOME``."""
        from imgdb.jobs.originals import thumbnail

        return thumbnail(self.catalog, image_id)

    def ping(self) -> None:
        """Ask the database whether it answers (DatabaseError when it does not)."""
        self.database.searching(lambda conn: conn.execute("SELECT 1"))

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Imgdb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str | None = None, *, settings: Settings | None = None) -> Imgdb:
    """Open imgdb's database: ``url``, else ``IMGDB_DATABASE_URL``, else the embedded server under
    ``IMGDB_HOME``. The schema is migrated on first use. ``settings`` govern everything the handle
    does (where models run, limits on input); default: the environment's."""
    settings = settings or Settings.from_env()
    if url:
        settings = replace(settings, database_url=url)
    return Imgdb(Database.from_settings(settings), settings)
