"""The Python API: ``imgdb.connect()`` and what the CLI and the web app call.

::

    import imgdb
    db = imgdb.connect()                       # IMGDB_DATABASE_URL, or the embedded server
    db.ingest(["photos/"], meta={"album": "2024"})
    for hit in db.search("query.jpg", k=5, filters=["meta.album=2024"]):
        print(hit.distance, hit.uri)
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import psycopg
from PIL import Image

from imgdb import lazy
from imgdb.ann.layer import AnnLayer
from imgdb.ann.spec import AnnSpec, parse_ann
from imgdb.config import Settings
from imgdb.db import records
from imgdb.db import search as sql
from imgdb.db.engine import Database
from imgdb.errors import ImgdbError, IndexExists
from imgdb.features import keypoints, known
from imgdb.features.base import Extractor
from imgdb.features.registry import DEFAULT_SPEC, canonical_spec, create_extractor, extractor_class
from imgdb.features.spec import parse_spec
from imgdb.io import sources
from imgdb.query import fusion as fusion_of
from imgdb.query import plan
from imgdb.query.parts import EncodedQuery, QueryImage

# A process that only searches (a cold `imgdb search`) loads none of what writes: ingest, sync,
# re-encoding, local features and transfer are imported by the methods that use them, and the
# modules that write through SQLAlchemy are stand-ins until first used (:mod:`imgdb.lazy`).
if TYPE_CHECKING:
    from imgdb.db import attached, derived, networks, store
    from imgdb.db import filters as filtering
    from imgdb.explain import Explanation
    from imgdb.ingest import IngestReport, ProgressCallback, StatusCallback
    from imgdb.local_index import VerifyReport
    from imgdb.sync import AttachReport, SyncReport
    from imgdb.orm import SearchIndex
    from imgdb.training.job import TrainReport
    from imgdb.training.trainer import EpochCallback, TrainOptions
else:
    attached, derived, filtering, networks, store = (
        lazy.module(f"imgdb.db.{name}") for name in ("attached", "derived", "filters", "networks", "store"))

#: What a query can be: a path, an http(s) URL, ``"id:N"``, image bytes, a Pillow image, a vector, or
#: a query encoded already (:meth:`Imgdb.encode_query`).
Query = Union[str, Path, bytes, Image.Image, np.ndarray, EncodedQuery]
DEFAULT_INDEX = "default"
#: Largest k and first-stage candidate count a search takes (pgvector's HNSW stops at 1,000 anyway).
MAX_K = 1000
MAX_CANDIDATES = 100_000
_ID_QUERY = re.compile(r"^id:([0-9]+)$")


@dataclass(frozen=True)
class IndexInfo:
    """One row of ``imgdb index list``."""

    name: str
    extractor: str
    dim: int
    images: int
    ann: AnnSpec
    storage: str
    #: The local features its hits are verified with, if any (``imgdb index verify``).
    local: str | None = None

    @classmethod
    def of(cls, index: SearchIndex, images: int) -> IndexInfo:
        return cls(index.name, index.extractor, index.dim, images, parse_ann(index.ann, index.ann_params), index.storage,
                   index.local)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "extractor": self.extractor, "dim": self.dim, "images": self.images,
                "ann": self.ann.method, "ann_params": self.ann.params, "storage": self.storage, "local": self.local}


class Imgdb:
    """A handle on one imgdb database. Cheap to keep around; models load on first use, once."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        #: Trainable extractors, one instance per index (their learned state differs per index).
        self._trained: dict[int, Extractor] = {}
        #: First stages and re-ranking (pgvector, and the Python-side codes of this process).
        self.layer = AnnLayer(database)
        #: Query forward passes running at once, across the threads sharing this handle (the web app).
        self._model_gate = threading.BoundedSemaphore(settings.inference_threads)

    # ------------------------------------------------------------ indexes

    def create_index(self, name: str, extractor: str | None = None, ann: str = "hnsw",
                     storage: str = "vector") -> IndexInfo:
        """Create an index. ``extractor`` is a spec (stored in canonical form), ``ann`` an ANN spec
        such as ``hnsw/m=32`` or ``ivfpq/lists=1024`` (see :mod:`imgdb.ann.spec`), ``storage``
        ``vector`` or ``halfvec`` (half the bytes, indexable up to 4000 dimensions)."""
        store.check_name(name)
        spec = canonical_spec(extractor or DEFAULT_SPEC)
        if parse_spec(spec).options.get("weights"):
            spec = self._store_weights_file(spec)
        self._provide_network(spec)
        dim = create_extractor(spec).dim
        first_stage = parse_ann(ann)
        with self.database.engine.begin() as conn:
            index = store.create_index(conn, name, spec, dim, first_stage.method, first_stage.params, storage)
        return IndexInfo.of(index, 0)

    def indexes(self) -> list[IndexInfo]:
        with self.database.connect() as conn:
            return [IndexInfo.of(i, n) for i, n in store.list_indexes(conn)]

    def drop_index(self, name: str) -> None:
        """Delete an index and its vectors (the images stay), detaching its tables first."""
        with self.database.engine.begin() as conn:
            index = store.require_index(conn, name)
            for source in attached.sources(conn, index):
                attached.detach(conn, source, index)
            store.drop_index(conn, name)
        self.layer.forget(index)

    def rebuild_index(self, name: str, ann: str | None = None,
                      on_status: StatusCallback | None = None) -> IndexInfo:
        """Rebuild an index's first stage from its stored vectors, optionally switching to another
        ANN spec (parameters not given keep their current values when the method stays)."""
        target = self.index(name)
        current = parse_ann(target.ann, target.ann_params)
        wanted = current if ann is None else parse_ann(
            ann, target.ann_params if ann.split("/")[0].strip().lower() == current.method else None)
        if on_status:
            on_status(f"rebuilding {name!r} as {wanted}")
        with self.database.engine.begin() as conn:
            store.drop_ann(conn, target)
            target = store.set_ann(conn, target, wanted.method, wanted.params)
            if not wanted.python_side:
                store.clear_codes(conn, target)
        self.layer.forget(target)
        self.layer.sync(target, retrain=True)
        with self.database.connect() as conn:
            return IndexInfo.of(target, store.count_vectors(conn, target))

    def verify_index(self, name: str, local: str | None = "rootsift",
                     on_progress: ProgressCallback | None = None) -> VerifyReport:
        """Make index ``name`` keep its images' local features (spec such as
        ``rootsift/side=640/keypoints=500``, see :mod:`imgdb.features.keypoints`) for
        ``rerank="verify"``, storing those of the images it holds; ``local=None`` stops it."""
        from imgdb import local_index

        index = self.index(name)
        if local is None:
            return local_index.disable(self, index)
        return local_index.enable(self, index, local, on_progress)

    def export_index(self, name: str, path: str | Path) -> dict[str, Any]:
        """Write an index, with its learned state and network, to one file (:mod:`imgdb.transfer`)."""
        from imgdb import transfer

        return transfer.export_index(self, name, path)

    def import_index(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        """Create an index from :meth:`export_index`'s file (under ``name``, default its own)."""
        from imgdb import transfer

        return transfer.import_index(self, path, name)

    def index(self, name: str = DEFAULT_INDEX) -> SearchIndex:
        """The named index; ``default`` is created with the default extractor on first use."""
        with self.database.connect() as conn:
            found = store.get_index(conn, name)
        if found is None and name == DEFAULT_INDEX:
            with contextlib.suppress(IndexExists):  # another process created it at the same moment
                self.create_index(name)
        if found is None:
            with self.database.connect() as conn:
                found = store.require_index(conn, name)
        return found

    def extractor(self, index: SearchIndex) -> Extractor:
        """The index's extractor, with any state it learned from the collection loaded.

        Extractors that learn nothing are shared by every index with the same spec (one model load
        per process); trainable ones get an instance per index.
        """
        self._provide_network(index.extractor)
        extractor = create_extractor(index.extractor)
        if not extractor.trainable:
            return extractor
        if index.id not in self._trained:
            spec = parse_spec(index.extractor)
            self._trained[index.id] = extractor_class(spec.family).from_spec(spec)
        trainable = self._trained[index.id]
        if not trainable.trained:
            trainable.load_state(self.database.searching(lambda conn: sql.state(conn, index)))
        return trainable

    def _store_weights_file(self, spec: str) -> str:
        """A spec's ``weights=PATH`` stored in the database, and the spec naming it by hash."""
        from imgdb.features.cnn import CnnConfig
        from imgdb.features.torch_net import network_from_file  # torch, loaded when used

        config, sha, blob = network_from_file(CnnConfig.parse(parse_spec(spec)))
        path = parse_spec(spec).options["weights"]
        with self.database.engine.begin() as conn:
            networks.save(conn, {"sha256": sha, "backbone": config.backbone, "weights": blob, "method": "file",
                                 "params": {"file": path}, "images": 0, "loss": [], "seconds": 0.0})
        known.provide(sha, blob)
        return str(config)

    def _provide_network(self, spec: str) -> None:
        """Load the fine-tuned network a spec names (``net=<sha256>``) from the database, once."""
        sha = parse_spec(spec).options.get("net")
        if sha is None or known.provided(sha):
            return
        with self.database.connect() as conn:
            known.provide(sha, networks.weights(conn, sha))

    # ------------------------------------------------------------ offline stage

    def ingest(self, paths: Iterable[str | Path], *, index: str = DEFAULT_INDEX,
               meta: dict[str, Any] | None = None, metadata_file: str | Path | None = None,
               on_progress: ProgressCallback | None = None,
               on_status: StatusCallback | None = None) -> IngestReport:
        """Add files, folders (recursively) and URLs to ``index``; see :class:`~imgdb.ingest.Ingester`."""
        from imgdb.ingest import Ingester, load_metadata_file

        target = self.index(index)
        metadata = load_metadata_file(Path(metadata_file)) if metadata_file else None
        ingester = Ingester(self.database, target, self.extractor(target), self.settings, self.layer)
        return ingester.run(paths, meta=meta, metadata=metadata, on_progress=on_progress, on_status=on_status)

    def train(self, index: str, paths: Iterable[str | Path] = (), *,
              on_progress: ProgressCallback | None = None,
              on_status: StatusCallback | None = None) -> IngestReport:
        """(Re)learn a trainable index's codebook from ``paths``, or from the images it holds, and
        re-encode its images with it; returns the report of that re-encoding. Nothing changes
        until it is complete, and images that cannot be read again keep their old vectors
        (:mod:`imgdb.reencode`)."""
        from imgdb.reencode import retrain

        target = self.index(index)
        if not self.extractor(target).trainable:
            raise ImgdbError(f"index {target.name!r} ({target.extractor}) has nothing to train")
        return retrain(self, target, [str(p) for p in paths], on_progress=on_progress, on_status=on_status)

    def train_network(self, name: str, source: str, *, method: str = "triplet", label_keys: Sequence[str] = (),
                      student: str | None = None, options: TrainOptions | None = None,
                      on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None,
                      on_epoch: EpochCallback | None = None) -> TrainReport:
        """Fine-tune index ``source``'s network on its images into a new index ``name``
        (:mod:`imgdb.training.job`); ``source`` is left as it is."""
        from imgdb.training.job import train_network  # torch training code, loaded when used

        return train_network(self, name, source, method=method, label_keys=label_keys, student=student,
                             options=options, on_status=on_status, on_progress=on_progress, on_epoch=on_epoch)

    def forget_extractor(self, index: SearchIndex) -> None:
        """Drop this process's copy of an index's learned state (it was learned again)."""
        self._trained.pop(index.id, None)

    def add_vectors(self, ids: Sequence[int], vectors: np.ndarray, *, index: str) -> int:
        """Store vectors computed elsewhere for images already in the database (an ``external``
        index, or precomputed descriptors); returns how many were added (ids already in the index
        are left as they are). A load that at least doubles the index builds its ANN index once at
        the end; a Python-side first stage that is not trained yet learns from these vectors first."""
        target = self.index(index)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != target.dim or len(vectors) != len(ids):
            raise ImgdbError(f"index {target.name!r} needs {len(ids)} vectors of {target.dim} dimensions, "
                             f"got an array of shape {vectors.shape}")
        codes_index = self.layer.train_from(target, vectors)
        ids_array = np.asarray(ids, dtype=np.int64)
        with self.database.engine.begin() as conn:
            present = store.ids_with_vectors(conn, target, ids_array.tolist())
            if len(ids_array) - len(present) >= store.count_vectors(conn, target):
                store.drop_ann(conn, target)
        keep = np.flatnonzero(~np.isin(ids_array, list(present)))
        try:
            for start in range(0, len(keep), 100_000):
                rows = keep[start:start + 100_000]
                codes = codes_index.codes_for(vectors[rows]) if codes_index is not None else None
                with self.database.engine.begin() as conn:
                    store.copy_vectors(conn, target, ids_array[rows].tolist(), vectors[rows], codes)
        finally:
            self.layer.sync(target)
        return len(keep)

    def delete(self, ids: Sequence[int]) -> int:
        """Remove images and their vectors from every index; returns how many existed."""
        with self.database.engine.begin() as conn:
            return store.delete_images(conn, ids)

    # ------------------------------------------------------------ application tables

    def attach(self, table: str, column: str, *, key: str | None = None, index: str = DEFAULT_INDEX,
               root: str | Path | None = None) -> AttachReport:
        """Index an application's table where it stands: ``column`` holds each row's image (a file
        path or an http(s) URL, or the image as ``bytea``), ``key`` identifies the row (default: the
        primary key). Installs triggers that queue every change and queues every row there is now;
        :meth:`sync` embeds them. Relative paths resolve under ``root`` (and nothing outside it is read)."""
        from imgdb.sync import AttachReport

        target = self.index(index)
        root_text = None
        if root is not None:
            root_text = sources.absolute(root)
            if not Path(root_text).is_dir():
                raise ImgdbError(f"--root {root_text} is not a folder")
        with self.database.engine.begin() as conn:
            source, queued = attached.attach(conn, target, table, column, key, root_text)
        self.layer.forget(target)
        return AttachReport(source.table, target.name, queued)

    def detach(self, table: str, *, index: str | None = None) -> AttachReport:
        """Stop following a table (in ``index``, or in every index it is attached to): its triggers
        go, and so does everything imgdb kept of its rows. The table itself is left as it was."""
        from imgdb.sync import AttachReport

        with self.database.engine.begin() as conn:
            target = store.require_index(conn, index) if index else None
            found = attached.find(conn, table, target)
            if not found:
                where = f" to index {index!r}" if index else ""
                raise ImgdbError(f"{table} is not attached{where}")
            dropped = removed = 0
            for source in found:
                one_dropped, one_removed = attached.detach(conn, source, store.require_index(conn, source.index_name))
                dropped, removed = dropped + one_dropped, removed + one_removed
        self.layer.forget()
        return AttachReport(found[0].table, ",".join(s.index_name for s in found), dropped, removed)

    def sync(self, index: str | None = None, *, watch: bool = False, retry_failed: bool = False,
             stop: threading.Event | None = None, on_progress: ProgressCallback | None = None,
             on_status: StatusCallback | None = None,
             on_round: Callable[[SyncReport], None] | None = None) -> SyncReport:
        """Embed what attached tables queued (those of ``index``, or every one); with ``watch``, keep
        doing it as changes come, until ``stop`` is set. See :mod:`imgdb.sync`."""
        from imgdb.sync import Syncer

        syncer = Syncer(self)
        if watch:
            return syncer.watch(index, stop=stop, on_round=on_round, on_status=on_status)
        return syncer.run(index, retry_failed=retry_failed, on_progress=on_progress, on_status=on_status)

    def sync_status(self, index: str | None = None) -> list[dict[str, Any]]:
        """Per attached table: rows queued, failed and embedded (the ``sync_status`` view)."""
        with self.database.connect() as conn:
            return attached.status(conn, store.require_index(conn, index) if index else None)

    def sync_failures(self, index: str | None = None) -> list[dict[str, Any]]:
        """Every row that could not be embedded, with its reason (the ``sync_failures`` view)."""
        with self.database.connect() as conn:
            return attached.failures(conn, store.require_index(conn, index) if index else None)

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

    def embed(self, query: Query, *, index: str = DEFAULT_INDEX) -> np.ndarray:
        """The descriptor ``index`` would store for ``query`` (unit length, float32)."""
        return self._query(self.index(index), query)[0]

    def explain(self, query: Query, image_id: int, *, index: str = DEFAULT_INDEX) -> Explanation:
        """Why stored image ``image_id`` verifies for ``query`` (or not): a PNG of the inlier
        matches side by side, with the inlier count (:mod:`imgdb.explain`)."""
        from imgdb.explain import explain  # OpenCV's drawing: only for this

        return explain(self, query, image_id, index)

    def encode_query(self, query: Query, *, index: str = DEFAULT_INDEX) -> EncodedQuery:
        """``query`` encoded for ``index`` once: its vector, and its image for the re-rankers that
        look at pixels; :meth:`search` takes it as a query."""
        return EncodedQuery(*self._query(self.index(index), query))

    def search(self, query: Query, *, k: int = 10, filters: Sequence[str] = (), index: str = DEFAULT_INDEX,
               rerank: str = "exact", candidates: int | None = None, fusion: str = "rrf") -> list[sql.Hit]:
        """The ``k`` images most similar to ``query`` that pass ``filters`` (CLI ``--filter`` syntax).

        ``rerank``: ``exact`` re-ranks the first stage's ``candidates`` by their exact distance to
        the stored vectors, ``pq`` keeps them in product-quantization order, ``none`` in the first
        stage's own order, ``verify`` checks them geometrically; a comma-separated chain runs
        several (see :mod:`imgdb.query`). ``index`` may name several indexes of the same images
        (``"a,b"``): each is searched, and their rankings fused by ``fusion`` (``rrf`` or ``mean``,
        :mod:`imgdb.query.fusion`).
        """
        if k < 1:
            raise ImgdbError(f"k must be at least 1, not {k}")
        if k > MAX_K:
            raise ImgdbError(f"k must be at most {MAX_K}, not {k}")
        if candidates is not None and not 1 <= candidates <= MAX_CANDIDATES:
            raise ImgdbError(f"candidates must be between 1 and {MAX_CANDIDATES}, not {candidates}")
        names = [name.strip() for name in index.split(",")]
        if len(names) > 1:
            fusion_of.check(fusion, names)
            for name in names:
                records.check_name(name)
            if isinstance(query, (str, Path)) and not _ID_QUERY.match(str(query).strip()):
                query = sources.load(query, self.settings.fetch)  # read once, decoded by each index
            depth = max(k, fusion_of.DEPTH)
            return fusion_of.fuse({name: self.search(query, k=depth, filters=filters, index=name, rerank=rerank,
                                                     candidates=candidates) for name in names}, k, fusion)
        records.check_name(index)
        clauses = filtering.parse_filters(filters) if filters else []
        for attempt in (1, 2):
            target = self.layer.target(index)
            if target is None:
                self.index(index)  # creates `default`, or says what is missing
                target = self.layer.target(index) or sql.Target(self.index(index), has_ann=False)
            vector, image = self._query(target.index, query)
            try:
                return self.database.searching(lambda conn: plan.search(
                    self.layer, conn, target, vector, k, clauses, image=image, rerank=rerank, candidates=candidates))
            except psycopg.errors.UndefinedTable:
                # Dropped (and maybe re-created) by another process since this one cached it: ask again.
                self.layer.forget(target.index)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _query(self, index: SearchIndex, query: Query) -> tuple[np.ndarray, QueryImage]:
        """The query's vector, and its image for the re-rankers that look at one (its pixels,
        decoded once, or the stored image ``id:N`` names)."""
        if isinstance(query, EncodedQuery):
            return self._query(index, query.vector)[0], query.image
        if isinstance(query, np.ndarray):
            if query.shape != (index.dim,):
                raise ImgdbError(f"query vector has shape {query.shape}, index {index.name!r} needs ({index.dim},)")
            return query.astype(np.float32), QueryImage()
        if isinstance(query, str) and (match := _ID_QUERY.match(query.strip())):
            digits = match.group(1)
            image_id = int(digits) if len(digits) <= 19 else records.MAX_ID + 1  # (longer: no such image)
            found = self.database.searching(lambda conn: sql.stored_vectors(conn, index, [image_id])) \
                if 0 < image_id <= records.MAX_ID else {}
            if image_id not in found:
                raise ImgdbError(f"image {digits[:30]} is not in index {index.name!r}")
            return found[image_id], QueryImage(image_id=image_id)
        from imgdb.encoding import embed_image, embed_pixels  # (the decoding pipeline: photos only)

        extractor = self.extractor(index)
        if isinstance(query, Image.Image):
            pixels = query.convert("RGB")
            return embed_pixels(extractor, pixels, self._model_gate), QueryImage(pixels)
        data = query if isinstance(query, bytes) else sources.load(query, self.settings.fetch)
        spec = None if index.local is None else keypoints.parse_keypoints(index.local)
        try:
            vector, pixels = embed_image(extractor, data, self.settings, self._model_gate, spec)
            return vector, QueryImage(pixels)
        except ImgdbError as exc:
            where = "query image" if isinstance(query, bytes) else str(query)
            raise type(exc)(f"{where}: {exc}") from None

    def close(self) -> None:
        self.database.dispose()

    def __enter__(self) -> Imgdb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str | None = None, *, settings: Settings | None = None) -> Imgdb:
    """Open imgdb's database: ``url``, else ``IMGDB_DATABASE_URL``, else the embedded server under
    ``IMGDB_HOME``. The schema is migrated on first use."""
    settings = settings or Settings.from_env()
    if url:
        settings = replace(settings, database_url=url)
    return Imgdb(Database.from_settings(settings), settings)
