"""The catalog: what every job works with, in one object below the public API.

A job (ingest, sync, re-encoding, local features, transfer, training, evaluation, search) needs
the database, the settings, the index registry, the extractors with what they learned, the stored
networks' weights and the ANN layer; the catalog holds them for one database and one process, and
is all a job is handed. The public API (:class:`imgdb.client.Imgdb`) is a facade over a catalog
and the jobs (:mod:`imgdb.jobs`); jobs never see the facade.

Extractors are built here from their spec and one :class:`~imgdb.features.base.ExtractorContext`
made from the settings, so the settings ``imgdb.connect(settings=...)`` was given govern every model
(runtime, device, graph cache), and a stored network's weights reach an extractor only through the
context (:meth:`Catalog.network`).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from imgdb import lazy
from imgdb.ann import registry as ann_methods
from imgdb.ann.layer import AnnLayer
from imgdb.config import Settings
from imgdb.db import search as sql
from imgdb.db.engine import Database
from imgdb.db.records import IndexRecord, StoredNetwork, check_name, check_storage
from imgdb.errors import ExtractorSpecError, IndexExists
from imgdb.features.base import Extractor, ExtractorContext
from imgdb.features.registry import DEFAULT_SPEC, canonical_spec, create_extractor, extractor_class
from imgdb.features.spec import parse_spec

# A process that only searches (a cold `imgdb search`) never loads what writes through SQLAlchemy.
if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from imgdb.db import attached, indexes, networks
else:
    attached, indexes, networks = (lazy.module(f"imgdb.db.{name}") for name in ("attached", "indexes", "networks"))

#: The index a command uses where none is named, created with the default extractor on first use.
DEFAULT_INDEX = "default"


def extractor_context(settings: Settings, network: Callable[[str], bytes] | None = None) -> ExtractorContext:
    """What the settings give every extractor: the runtime, the device, the graph cache under
    ``IMGDB_HOME``, and where stored networks' weights come from (none without a database)."""
    context = ExtractorContext(runtime=settings.runtime, device=settings.device,
                               graph_cache=settings.home / "cache" / "onnx")
    return context if network is None else replace(context, network=network)


@dataclass(frozen=True)
class PlannedIndex:
    """What :meth:`Catalog.plan_index` checked: the canonical spec, its dimension, the first stage."""

    extractor: str
    dim: int
    ann: str
    ann_params: dict[str, Any]
    storage: str

    def create(self, conn: Connection, name: str) -> IndexRecord:
        """Register the index in ``conn``'s transaction."""
        return indexes.create(conn, name, self.extractor, self.dim, self.ann, self.ann_params, self.storage)


class Catalog:
    """One database's indexes, extractors, networks and first stages, for one process (thread-safe:
    the web server's threads share it)."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        #: First stages and what queries cache of them.
        self.layer = AnnLayer(database)
        self.context = extractor_context(settings, self.network)
        #: Query forward passes running at once, across the threads sharing this catalog.
        self.model_gate = threading.BoundedSemaphore(settings.inference_threads)
        #: Extractors that learn nothing, one per spec (a model load per process), and trainable
        #: ones, one per index (their learned state differs per index).
        self._shared: dict[str, Extractor] = {}
        self._trained: dict[int, Extractor] = {}
        self._networks: dict[str, bytes] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------ the registry

    def index(self, name: str = DEFAULT_INDEX) -> IndexRecord:
        """The named index; ``default`` is created with the default extractor on first use."""
        with self.database.connect() as conn:
            found = indexes.get(conn, name)
        if found is None and name == DEFAULT_INDEX:
            with contextlib.suppress(IndexExists):  # another process created it at the same moment
                return self.create_index(name)
        if found is None:
            with self.database.connect() as conn:
                found = indexes.require(conn, name)
        return found

    def indexes(self) -> list[IndexRecord]:
        """Every index, with its number of vectors."""
        with self.database.connect() as conn:
            return indexes.all_indexes(conn)

    def create_index(self, name: str, extractor: str | None = None, ann: str | None = None,
                     storage: str = "vector") -> IndexRecord:
        """Create an index: ``extractor`` a spec (stored in canonical form, a weights file it names
        stored as a network), ``ann`` an ANN spec (None: by the vectors' length,
        :func:`imgdb.ann.registry.default_for`), ``storage`` ``vector`` or ``halfvec``."""
        check_name(name)
        spec = parse_spec(canonical_spec(extractor or DEFAULT_SPEC, self.context))
        spec, files = extractor_class(spec.family).store_files(spec, self.context)
        for network in files:
            self.store_network(network)
        planned = self.plan_index(str(spec), ann, storage)
        with self.database.engine.begin() as conn:
            index = planned.create(conn, name)
        self.layer.sync(index)  # (the empty structure of a method that needs no data to build one)
        return self.counted(index)

    def plan_index(self, extractor: str, ann: str | None = None, storage: str = "vector") -> PlannedIndex:
        """An index of a spec that names no local file, checked (its model loaded, its first stage
        against its dimension and storage) and ready to be created in a transaction of the caller's
        (an import creates it with its data, or not at all)."""
        check_storage(storage)
        spec = canonical_spec(extractor, self.context)
        dim = self.shared_extractor(spec).dim
        first_stage = ann_methods.parse_ann(ann or ann_methods.default_for(dim, storage))
        ann_methods.check(first_stage, dim, storage)
        return PlannedIndex(spec, dim, first_stage.method, first_stage.params, storage)

    def counted(self, index: IndexRecord) -> IndexRecord:
        """The index as it is now, with its number of vectors."""
        with self.database.connect() as conn:
            return indexes.counted(conn, indexes.require(conn, index.name))

    def drop_index(self, name: str) -> None:
        """Delete an index and its vectors (the images stay), detaching its tables first."""
        with self.database.engine.begin() as conn:
            index = indexes.require(conn, name)
            for source in attached.sources(conn, index):
                attached.detach(conn, source, index)
            indexes.drop(conn, index)
        self.forget(index)

    def forget(self, index: IndexRecord | None = None) -> None:
        """Drop what this process keeps of an index (it was dropped, re-encoded or learned again):
        its extractor's learned state and its first stage's caches; of every index with None."""
        with self._lock:
            if index is None:
                self._trained.clear()
            else:
                self._trained.pop(index.id, None)
        self.layer.forget(index)

    # ------------------------------------------------------------ extractors

    def shared_extractor(self, spec: str) -> Extractor:
        """The extractor of a spec, built once per process and shared by every index that has the
        spec (its learned state, for one that learns, is not loaded: :meth:`extractor`)."""
        found = self._shared.get(spec)
        if found is None:
            with self._lock:
                found = self._shared.get(spec)
                if found is None:
                    self._shared[spec] = found = create_extractor(spec, self.context)
        return found

    def extractor(self, index: IndexRecord) -> Extractor:
        """The index's extractor, with any state it learned from the collection loaded."""
        shared = self.shared_extractor(index.extractor)
        if not shared.trainable:
            return shared
        with self._lock:
            if index.id not in self._trained:
                self._trained[index.id] = self.new_extractor(index)
            trainable = self._trained[index.id]
        if not trainable.trained:
            # (From the primary: a writer encodes with what was learned, even a moment ago.)
            trainable.load_state(self.database.searching(lambda conn: sql.state(conn, index), primary=True))
        return trainable

    def new_extractor(self, index: IndexRecord) -> Extractor:
        """A new instance of the index's extractor, with nothing learned: to learn it again in."""
        spec = parse_spec(index.extractor)
        return extractor_class(spec.family).from_spec(spec, self.context)

    # ------------------------------------------------------------ networks

    def network(self, sha256: str) -> bytes:
        """The weights of stored network ``sha256`` (read from the database once per process, and
        checked against their name)."""
        found = self._networks.get(sha256)
        if found is None:
            with self.database.connect() as conn:
                found = networks.weights(conn, sha256)
            if hashlib.sha256(found).hexdigest() != sha256:
                raise ExtractorSpecError(f"network {sha256[:12]}: its stored weights do not match their sha256")
            self._networks[sha256] = found
        return found

    def hold_network(self, network: StoredNetwork) -> None:
        """Let this process's extractors load a network not stored yet (an import stores it in the
        transaction that creates its index, once the model loaded with it is checked)."""
        if hashlib.sha256(network.weights).hexdigest() != network.sha256:
            raise ExtractorSpecError(f"network {network.sha256[:12]}: its weights do not match their sha256")
        self._networks[network.sha256] = network.weights

    def store_network(self, network: StoredNetwork) -> None:
        """Keep a network's weights in the database (once: the same bytes converge on one row)."""
        if hashlib.sha256(network.weights).hexdigest() != network.sha256:
            raise ExtractorSpecError(f"network {network.sha256[:12]}: its weights do not match their sha256")
        with self.database.engine.begin() as conn:
            networks.save(conn, network)
        self._networks[network.sha256] = network.weights

    def close(self) -> None:
        self.database.dispose()
