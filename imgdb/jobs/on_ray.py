"""Ingest and sync on a Ray cluster (``imgdb ingest --ray``, ``imgdb sync --ray``): the same work
as :mod:`imgdb.jobs.ingest` and :mod:`imgdb.jobs.sync`, its reading, hashing, decoding, extraction
and writing spread over Ray's workers.

The driver lists the work (folders walked), lets a trainable extractor learn once from a sample and
stores what it learned, and drops the ANN index of a load that may double the index, exactly as a
local load begins (:meth:`~imgdb.jobs.ingest.Ingester.begin`). Ray Data then streams the list
through a pool of actors. Each actor opens the database itself and holds one model session (the
index's extractor, with the state the driver stored), and runs the local path's own loop on each
share it is handed (:meth:`~imgdb.jobs.ingest.Ingester.add`): content the index holds is skipped
before decoding, one bad image fails alone with its reason, and every batch of the extractor is
written with binary COPY in a transaction of its own, so a worker that dies loses at most the batch
in flight, and what Ray retries or a rerun does again counts as duplicates. The driver merges the
actors' reports into one, and at the end brings the first stage up to date (a quantizer learns
from the vectors written, the ANN index is built once) as a local load does.

A sync needs no list: its queue is in the database, and its workers already claim keys so that no
two hold one (:class:`~imgdb.jobs.sync.Syncer`). The driver lets the indexes learn, then runs one
sync worker per actor's place as a Ray task, each draining the queues with the local loop, and
follows the queue's length for its progress; a worker killed mid-claim rolls its claim back, and
the others (or its retry) take the keys.

Ray is an optional extra (``pip install 'imgdb[ray]'``), imported only here.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgdb.catalog import Catalog
from imgdb.config import Settings
from imgdb.db import attached, values
from imgdb.db.engine import Database
from imgdb.errors import ImgdbError
from imgdb.io import sources
from imgdb.jobs import duplicates
from imgdb.jobs.ingest import (Failure, Ingester, IngestReport, NearDuplicate, ProgressCallback, StatusCallback,
                               load_metadata_file)
from imgdb.jobs.sync import Syncer, SyncReport

#: Images handed to an actor at a time (at most): several of the extractor's batches, so that
#: reading and decoding run ahead of the model within a share as they do locally.
SHARE = 128
#: Tries of a share whose worker dies (Ray restarts the actor and hands it the share again).
TRIES = 3


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` of the cluster (None: Ray's own choice, the cluster this
    machine belongs to or a new one on it), ``actors`` (default: one per node, with all its cores,
    or one per ``gpus`` GPUs) and ``gpus`` per actor."""

    address: str | None = None
    actors: int | None = None
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ImgdbError(f"Ray actors must be at least 1, not {self.actors}")
        if not self.gpus >= 0:  # (NaN too)
            raise ImgdbError(f"GPUs per Ray actor must be 0 or more, not {self.gpus}")


def ingest(catalog: Catalog, paths: Iterable[str | Path], *, index: str, options: RayOptions,
           meta: dict[str, Any] | None = None, metadata_file: str | Path | None = None,
           on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None,
           near_duplicates: str | None = None) -> IngestReport:
    """Add what :func:`imgdb.io.sources.expand` finds in ``paths`` to ``index`` through Ray; the
    report of a local ingest (:func:`imgdb.jobs.ingest.ingest`). With ``near_duplicates``, the
    index learns its scores here first, and each actor screens its batches."""
    started = time.perf_counter()
    meta = values.check_metadata(meta or {}, "--meta")
    metadata = load_metadata_file(Path(metadata_file)) if metadata_file else {}
    if near_duplicates is not None:
        duplicates.screen_for(catalog, index, near_duplicates, on_status)
    ingester = Ingester(catalog, catalog.index(index))
    todo = list(sources.expand(paths))
    ingester.begin(todo, on_status)
    report = IngestReport(near_duplicates=None if near_duplicates is None else [])
    # Names PostgreSQL cannot store are refused here, as the local path refuses them (Ray Data's
    # Arrow tables cannot carry them to the actors either).
    total, kept = len(todo), []
    for uri in todo:
        try:
            kept.append(values.check_file_name(uri))
        except values.UnstorableValue as exc:
            report.failed.append(Failure(values.printable(uri), str(exc)))
    todo = kept
    try:
        if todo:
            if on_progress:
                on_progress(total - len(todo), total)
            done: set[str] = set()
            with _cluster(options.address) as ray_module:
                for share in _run(ray_module, catalog, ingester.index.name, todo, meta, metadata, options, on_status,
                                  near_duplicates):
                    if share["error"]:
                        raise _stopped("ingest", share["error"])
                    done.update(json.loads(share["uris"]))
                    report.added += share["added"]
                    report.duplicates += share["duplicates"]
                    report.failed += [Failure(path, error) for path, error in json.loads(share["failed"])]
                    if report.near_duplicates is not None:
                        report.near_duplicates += [NearDuplicate(**found) for found in json.loads(share["near"])]
                    if on_progress:
                        on_progress(total - len(todo) + len(done), total)
            # A share whose worker died at every try (a process crash on one of its images) is given up
            # by Ray: its images are failures, with the reason, and a rerun tries them again.
            report.failed += [Failure(values.printable(uri), f"its worker died {TRIES} times while ingesting its share")
                              for uri in todo if uri not in done]
    finally:
        ingester.finish()
    report.seconds = time.perf_counter() - started
    return report


def sync(catalog: Catalog, index: str | None, *, options: RayOptions, retry_failed: bool = False,
         on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None) -> SyncReport:
    """Embed what attached tables queued (of ``index``, or all) through Ray: the report of a local
    sync (:meth:`imgdb.jobs.sync.Syncer.run`)."""
    started = time.perf_counter()
    syncer = Syncer(catalog)
    todo, total = syncer.begin(index, retry_failed=retry_failed, on_status=on_status)
    report = SyncReport()
    try:
        if total:
            with _cluster(options.address) as ray:
                actors, cpus = _pool_size(ray, options)
                _announce(on_status, "syncing", actors, cpus, options)
                worker = ray.remote(_drain).options(num_cpus=cpus, num_gpus=options.gpus or None,
                                                    max_retries=TRIES - 1, retry_exceptions=False)
                settings = _reachable(catalog)
                pending = [worker.remote(settings, [source.id for source in todo]) for _ in range(actors)]
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                    for done in ready:
                        try:
                            report.add(ray.get(done))
                        except ray.exceptions.RayError as exc:
                            for other in pending:  # (a claim interrupted rolls back: its keys stay queued)
                                ray.cancel(other)
                            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
                            raise _stopped("sync", _reason(cause)) from None
                    if on_progress:
                        on_progress(max(total - syncer.queued(todo), 0), total)
    finally:
        syncer.finish(todo)
    report.queued = syncer.queued(todo)
    report.seconds = time.perf_counter() - started
    return report


def _drain(settings: Settings, source_ids: list[int]) -> SyncReport:
    """One Ray task: a sync worker of its own (a database connection, a model session per index)
    draining the queues of the attached tables ``source_ids``."""
    catalog = Catalog(Database.from_settings(settings, migrate=False), settings)
    with catalog.database.connect() as conn:
        todo = [source for source in attached.sources(conn) if source.id in source_ids]
    report = SyncReport()
    Syncer(catalog).drain(todo, report)
    return report


def _stopped(job: str, reason: str) -> ImgdbError:
    """The error that ends a load or sync on Ray: what no retry cures (a refused write, a database a
    node cannot reach), in one line."""
    return ImgdbError(f"the {job} on Ray stopped: {reason} (what was written stays; run it again to go on)")


def _reachable(catalog: Catalog) -> Settings:
    """The settings workers start from: the database as this process reached it (the embedded
    server's address too), which they must reach."""
    return replace(catalog.settings, database_url=catalog.database.url)


def _announce(on_status: StatusCallback | None, what: str, actors: int, cpus: float, options: RayOptions) -> None:
    if on_status:
        on_status(f"{what} on Ray: {actors} actor{'s' * (actors != 1)} of {cpus:g} CPU"
                  + (f" and {options.gpus:g} GPU" if options.gpus else ""))


class _cluster:
    """Ray for one load, left as found: a process that was not connected to a cluster joins one
    (or starts one, which goes again) and leaves it when the load ends."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.joined = False
        #: Ray Data's own log level, put back afterwards: it narrates every dataset at INFO, and warns
        #: that its progress bars are off, which is this job's doing (the caller shows one).
        self.data_log = logging.getLogger("ray.data")
        self.data_level = self.data_log.level

    def __enter__(self) -> Any:
        try:
            import ray
            import ray.data  # (which sets up its logging: the level is set after)
        except ImportError:
            raise ImgdbError("--ray needs Ray: pip install 'imgdb[ray]'") from None
        self.data_log.setLevel(logging.ERROR)
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ImgdbError(f"cannot join the Ray cluster at {self.address or 'its default address'}: "
                                 f"{values.printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None
            self.joined = True
        context = ray.data.DataContext.get_current()
        self.context = (context, context.enable_progress_bars, context.max_errored_blocks)
        # No bars of Ray's (the caller shows one); a share Ray gave up on does not stop the others.
        context.enable_progress_bars, context.max_errored_blocks = False, -1
        return ray

    def __exit__(self, *exc: object) -> None:
        self.data_log.setLevel(self.data_level)
        context, *self.context = self.context
        context.enable_progress_bars, context.max_errored_blocks = self.context
        if self.joined:
            import ray

            ray.shutdown()


def _run(ray: Any, catalog: Catalog, index: str, todo: list[str], meta: dict[str, Any],
         metadata: dict[str, dict[str, Any]], options: RayOptions, on_status: StatusCallback | None,
         near_duplicates: str | None) -> Iterator[dict[str, Any]]:
    """Stream ``todo`` through the actor pool; yields one report per share, as shares finish."""
    actors, cpus = _pool_size(ray, options)
    _announce(on_status, "ingesting", actors, cpus, options)
    # Shares of SHARE images, smaller where that keeps every actor busy on a small load.
    share = max(1, min(SHARE, math.ceil(len(todo) / actors)))
    items = ray.data.from_items([{"uri": uri, "meta": json.dumps(metadata[uri]) if uri in metadata else ""}
                                 for uri in todo], override_num_blocks=math.ceil(len(todo) / share))
    settings = _reachable(catalog)
    with warnings.catch_warnings():
        # Ray Data has no named parameter for an actor task's retries (its default is forever, which
        # a share that crashes its worker would take), and warns about the remote args that set them.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        shares = items.map_batches(
            _Actor, fn_constructor_kwargs={"settings": settings, "index": index, "meta": meta,
                                           "near_duplicates": near_duplicates},
            batch_size=share, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus, num_gpus=options.gpus or None, max_restarts=-1, max_task_retries=TRIES - 1)
    yield from shares.iter_rows()


def _pool_size(ray: Any, options: RayOptions) -> tuple[int, float]:
    """Actors and CPUs per actor: by default one actor per node, with as many CPUs as the smallest
    node has (an actor then uses its node as a local ingest uses this machine: decoding threads, a
    batch per core), or one per ``gpus`` GPUs of the cluster."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    cpus = min((node.get("CPU", 0) for node in nodes), default=0)
    if cpus < 1:
        raise ImgdbError("the Ray cluster has no node with a CPU to ingest on")
    if options.gpus:
        available = sum(node.get("GPU", 0) for node in nodes)
        actors = options.actors or int(available // options.gpus)
        if actors < 1 or options.gpus * actors > available:
            raise ImgdbError(f"the Ray cluster has {available:g} GPUs, not {options.gpus:g} for each of "
                             f"{max(actors, 1)} actors")
        return actors, 1
    actors = options.actors or len(nodes)
    return actors, max(1.0, min(cpus, math.floor(sum(node.get("CPU", 0) for node in nodes) / actors)))


class _Actor:
    """One Ray actor: a database connection and one model session, ingesting the shares it is given
    with the local path's loop. What goes wrong outside an image (a database this node cannot reach,
    a write refused) is not worth retrying share after share: the share's report carries it, and the
    driver stops with it."""

    def __init__(self, settings: Settings, index: str, meta: dict[str, Any], near_duplicates: str | None) -> None:
        self.meta = meta
        self.ingester: Ingester | None = None
        self.error = ""
        try:
            catalog = Catalog(Database.from_settings(settings, migrate=False), settings)
            target = catalog.index(index)
            screen = None if near_duplicates is None else duplicates.NearDuplicateScreen(catalog, target, near_duplicates)
            self.ingester = Ingester(catalog, target, screen=screen)
        except Exception as exc:  # noqa: BLE001 - reported with the first share
            self.error = _reason(exc)

    def __call__(self, share: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        """The share's report, one row: its counts and failures, or the error that stopped it."""
        uris = [str(uri) for uri in share["uri"]]
        metadata = {uri: json.loads(text) for uri, text in zip(uris, share["meta"]) if text}
        error = self.error
        if self.ingester is not None:
            try:
                found = self.ingester.add(uris, self.ingester.known_content(len(uris)), meta=self.meta,
                                          metadata=metadata)
                return {"uris": [json.dumps(uris)], "added": [found.added], "duplicates": [found.duplicates],
                        "failed": [json.dumps([(f.path, f.error) for f in found.failed])],
                        "near": [json.dumps([asdict(n) for n in found.near_duplicates or []])], "error": [""]}
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops with it
                error = _reason(exc)
        return {"uris": ["[]"], "added": [0], "duplicates": [0], "failed": ["[]"], "near": ["[]"], "error": [error]}


def _reason(exc: Exception) -> str:
    """One line on an error: imgdb's own message, or the exception's type and first line."""
    first = (str(exc).splitlines() or [""])[0]
    return values.printable(first if isinstance(exc, ImgdbError) else f"{type(exc).__name__}: {first}")
