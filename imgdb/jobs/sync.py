"""``imgdb sync``: embed what attached application tables queued, through the ingest pipeline.

A worker goes through every attached table (of one index, or of all), claims queued keys in
batches (:func:`imgdb.db.attached.claim`: no two workers ever hold one key) and, in the claim's
transaction, reads each row's image as it is now, embeds it with the same safe decoding, batching
and COPY as ``imgdb ingest``, points the row's ref at its image, and forgets what rows no longer
hold (deleted rows, images replaced). A row that fails (a missing file, not an image, a refused
URL, a path outside the attached root) is kept in ``failures`` with its reason and queued again
with back-off; it never holds up the rest. Killing a worker rolls its batch back: the keys are
queued again, and the next worker takes them.

``watch`` keeps at it: it waits on ``LISTEN`` for the triggers' ``NOTIFY`` (or the next retry
that falls due) instead of polling.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
import sqlalchemy as sa

from imgdb.catalog import Catalog
from imgdb.db import attached, derived, images, indexes, vectors
from imgdb.db.attached import Claimed
from imgdb.db.engine import bounded_lock_waits, kept_waiting, lost_to_a_conflict
from imgdb.db.records import IndexRecord, Source
from imgdb.errors import ImgdbError, first_line
from imgdb.io.sources import absolute, is_remote
from imgdb.jobs import duplicates
from imgdb.jobs.ingest import (Blob, Confined, ContentInIndex, Failure, Ingester, Item, Known, Prepared,
                               ProgressCallback, StatusCallback)

#: Keys claimed per transaction, in extractor batches: enough for decoding to run ahead of the
#: model as it does in ingest, few enough that a claim holds its keys for seconds, not minutes.
CLAIM_BATCHES = 4
#: Longest wait on LISTEN before looking again (a notification can be missed while reconnecting).
WATCH_POLL_S = 60.0


@dataclass(frozen=True)
class SyncFailure:
    table: str
    ref: Any
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "ref": self.ref, "error": self.error}


@dataclass
class SyncReport:
    """What ``imgdb sync --json`` prints (the contract in ``../shared/CONVENTIONS.md``)."""

    embedded: int = 0
    removed: int = 0
    failed: list[SyncFailure] = field(default_factory=list)
    queued: int = 0
    seconds: float = 0.0

    def add(self, other: SyncReport) -> None:
        self.embedded += other.embedded
        self.removed += other.removed
        self.failed += other.failed
        self.queued = other.queued
        self.seconds += other.seconds

    def to_json(self) -> dict[str, Any]:
        return {"embedded": self.embedded, "removed": self.removed, "failed": [f.to_json() for f in self.failed],
                "queued": self.queued, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class AttachReport:
    """What ``imgdb attach`` and ``imgdb detach`` print: the table, the index (indexes, comma-separated,
    for a table detached from several), the rows queued (attach) or queue entries dropped (detach),
    and for detach how many embedded rows were forgotten."""

    table: str
    index: str
    queued: int
    removed: int | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"table": self.table, "index": self.index, "queued": self.queued}
        if self.removed is not None:
            document["removed"] = self.removed
        return document


def locate(value: str, root: str | None) -> str | Confined:
    """Where a text column's value points: an http(s) URL or an object (``s3://``, ``gs://``) as it
    is, or an absolute file path. A relative path resolves under ``root`` (and is refused without
    one); with a root, anything whose real path falls outside it is refused, symlinks included, and
    the file is :class:`Confined` to it (checked again on the file opened, when it is read)."""
    text = value.strip()
    if is_remote(text):
        return text
    if "\x00" in text or not text:
        raise ImgdbError("not a file path or an http(s) URL")
    if "://" in text:
        raise ImgdbError(f"{text[:200]!r} is not an http(s) URL or an s3:// or gs:// object")
    if not os.path.isabs(text):
        if root is None:
            raise ImgdbError(f"relative path {text[:200]!r}: attach the table with --root DIR to resolve it")
        text = os.path.join(root, text)
    path = os.path.abspath(text)
    if root is None:
        return path
    base = os.path.realpath(root)
    if os.path.commonpath([base, os.path.realpath(path)]) != base:
        raise ImgdbError(f"{text[:200]!r} is outside the attached root {root}")
    return Confined(path, root)


class TableBusy(ImgdbError):
    """The application held an attached table longer than imgdb waits for it."""


@dataclass(frozen=True)
class _Outcome:
    """What one committed claim did: keys taken, rows now embedded (with their images' hashes),
    rows gone, rows failed (with reasons), and images whose last vector went."""

    claimed: int
    linked: list[tuple[Claimed, str]]
    gone: list[Claimed]
    failed: list[tuple[Claimed, str]]
    orphans: list[int]


def attach(catalog: Catalog, table: str, column: str, *, key: str | None, index: IndexRecord,
           root: str | None) -> AttachReport:
    """Attach ``table`` to ``index`` (:func:`imgdb.db.attached.attach`): triggers installed, every row
    queued for :class:`Syncer`. Relative paths resolve under ``root`` (a folder), and nothing
    outside it is read."""
    root_text = None
    if root is not None:
        root_text = absolute(root)
        if not os.path.isdir(root_text):
            raise ImgdbError(f"--root {root_text} is not a folder")
    source, queued = catalog.database.beside_the_application(
        lambda conn: attached.attach(conn, index, table, column, key, root_text), f"attach {table}")
    catalog.layer.forget(index)
    return AttachReport(source.table, index.name, queued)


def detach(catalog: Catalog, table: str, *, index: str | None = None) -> AttachReport:
    """Stop following ``table`` (in ``index``, or in every index it is attached to): its triggers go,
    and so does everything imgdb kept of its rows."""

    def work(conn: sa.Connection) -> tuple[list[Source], int, int]:
        target = indexes.require(conn, index) if index else None
        found = attached.find(conn, table, target)
        if not found:
            where = f" to index {index!r}" if index else ""
            raise ImgdbError(f"{table} is not attached{where}")
        dropped = removed = 0
        for source in found:
            one_dropped, one_removed = attached.detach(conn, source, indexes.require(conn, source.index_name))
            dropped, removed = dropped + one_dropped, removed + one_removed
        return found, dropped, removed

    found, dropped, removed = catalog.database.beside_the_application(work, f"detach {table}")
    catalog.layer.forget()
    return AttachReport(found[0].table, ",".join(s.index_name for s in found), dropped, removed)


class Syncer:
    """One sync worker over a catalog's database (any number may run at once, in this process or
    others: :mod:`imgdb.jobs.on_ray` runs them as Ray tasks)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.database = catalog.database
        #: The ingest pipeline of each index worked on, by index id: one model session per index.
        self.ingesters: dict[int, Ingester] = {}

    def run(self, index: str | None = None, *, retry_failed: bool = False,
            on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None) -> SyncReport:
        """Work through the queue of every attached table (of ``index``) until it is empty.
        ``retry_failed``: queue every failed row again now, whatever its back-off."""
        started = time.perf_counter()
        todo, total = self.begin(index, retry_failed=retry_failed, on_status=on_status)
        report = SyncReport()
        done = 0

        def claimed(keys: int) -> None:
            nonlocal done
            done += keys
            if on_progress:
                on_progress(done, max(total, done))

        try:
            self.drain(todo, report, on_claimed=claimed, on_status=on_status)
        finally:
            self.finish(todo)
        report.queued = self.queued(todo)
        report.seconds = time.perf_counter() - started
        return report

    def begin(self, index: str | None = None, *, retry_failed: bool = False,
              on_status: StatusCallback | None = None) -> tuple[list[Source], int]:
        """The attached tables to work through (of ``index``, or all) and the keys they queued, once
        failed rows are queued again where due (all of them with ``retry_failed``) and every index
        whose extractor learns from the collection has learnt: here, once, before any worker starts."""
        with self.database.connect() as conn:
            todo = attached.sources(conn, indexes.require(conn, index) if index else None)
        if index is not None and not todo:
            raise ImgdbError(f"no table is attached to index {index!r} (attach one with `imgdb attach TABLE --column COLUMN`)")
        with self.database.engine.begin() as conn:
            for source in todo:
                attached.requeue_failures(conn, source, all_of_them=retry_failed)
            total = attached.queued(conn, todo)
        for index_id in dict.fromkeys(s.index_id for s in todo):
            sources = [s for s in todo if s.index_id == index_id]
            ingester = self._ingester(sources[0])
            if not ingester.extractor.trained:
                self._train(ingester, sources, on_status)
        return todo, total

    def drain(self, todo: Sequence[Source], report: SyncReport, *, on_claimed: Callable[[int], None] | None = None,
              on_status: StatusCallback | None = None) -> None:
        """Claim, embed and commit batches of ``todo``'s queues until they are empty (or hold only
        rows whose retry is not due); ``on_claimed(keys)`` after each batch."""
        for source in todo:
            ingester = self._ingester(source)
            known = ContentInIndex(self.database, ingester.index)
            try:
                while claimed := self._batch(ingester, source, known, report):
                    if on_claimed:
                        on_claimed(max(claimed, 0))
            except (sa.exc.ProgrammingError, ImgdbError) as exc:
                # The table itself is in the way (dropped, a column renamed, held by the application):
                # say so, go on with the other tables. Its rows stay queued.
                reason = str(exc) if isinstance(exc, ImgdbError) else \
                    f"cannot read {source.table}: {first_line(exc.orig)} (detach it, then attach it again)"
                report.failed.append(SyncFailure(source.table, None, reason))
                if on_status:
                    on_status(reason)

    def queued(self, todo: Sequence[Source]) -> int:
        """Keys still queued in ``todo``'s tables (claimed ones too, until their claim commits)."""
        with self.database.connect() as conn:
            return attached.queued(conn, todo)

    def finish(self, todo: Sequence[Source]) -> None:
        """Bring the first stage of every index worked on up to date (:meth:`imgdb.ann.layer.Layer.sync`),
        and its groups of duplicates where they were ever asked for (:func:`imgdb.jobs.duplicates.refresh`)."""
        for name in dict.fromkeys(s.index_name for s in todo):
            self.catalog.layer.sync(self.catalog.index(name))
            duplicates.refresh(self.catalog, name)

    def _ingester(self, source: Source) -> Ingester:
        if source.index_id not in self.ingesters:
            self.ingesters[source.index_id] = Ingester(self.catalog, self.catalog.index(source.index_name))
        return self.ingesters[source.index_id]

    def watch(self, index: str | None = None, *, stop: threading.Event | None = None,
              on_round: Callable[[SyncReport], None] | None = None,
              on_status: StatusCallback | None = None) -> SyncReport:
        """Sync, then wait for the next change (LISTEN) or retry due, and again, until ``stop`` is set
        (or Ctrl-C). ``on_round(report)`` hears of every round that did something."""
        stop = stop or threading.Event()
        total = SyncReport()
        channel = derived.notify_channel(self.database.schema)
        with psycopg.connect(self.database.url, autocommit=True) as listener:
            listener.execute(f'LISTEN "{channel}"')
            while not stop.is_set():
                report = self.run(index, on_status=on_status)
                total.add(report)
                if on_round and (report.embedded or report.removed or report.failed):
                    on_round(report)
                with self.database.connect() as conn:
                    sources = attached.sources(conn, indexes.require(conn, index) if index else None)
                    due = attached.next_retry(conn, sources) if sources else None
                wait = WATCH_POLL_S if due is None else min(WATCH_POLL_S, max(float(due), 0.05))
                deadline = time.monotonic() + wait
                # Short waits, so that `stop` is seen within a second.
                while not stop.is_set() and time.monotonic() < deadline:
                    if any(True for _ in listener.notifies(timeout=min(1.0, deadline - time.monotonic()), stop_after=1)):
                        break
        return total

    # ------------------------------------------------------------ one claim

    def _batch(self, ingester: Ingester, source: Source, known: ContentInIndex, report: SyncReport) -> int:
        """Claim, embed and commit one batch of ``source``'s queue; returns how many keys it took
        (0: the queue is empty; -1: PostgreSQL broke a deadlock by aborting this batch, which rolled
        back whole, its keys queued again for the next claim)."""
        try:
            outcome = self._claim_and_embed(ingester, source, known)
        except sa.exc.OperationalError as exc:
            if lost_to_a_conflict(exc):
                return -1
            if kept_waiting(exc):
                raise TableBusy(f"the application holds {source.table} (a transaction left open?): its rows stay "
                                "queued for the next sync") from None
            raise
        if outcome is None:
            return 0
        with self.database.engine.begin() as conn:
            attached.remove_orphan_images(conn, outcome.orphans)
        report.embedded += len(outcome.linked)
        report.removed += sum(row.image_id is not None for row in outcome.gone)
        report.failed += [SyncFailure(source.table, source.ref_json(row.ref), error) for row, error in outcome.failed]
        return outcome.claimed

    def _claim_and_embed(self, ingester: Ingester, source: Source, known: ContentInIndex) -> _Outcome | None:
        """One claim's transaction: take the keys, read and embed their images (no writes yet: the
        transaction holds only its queue rows and key locks while the model runs), then write
        images, vectors, refs and failures together."""
        max_bytes = self.catalog.settings.fetch.max_bytes
        with self.database.engine.begin() as conn:
            with bounded_lock_waits(conn):  # (the application's table is read: imgdb never makes it wait)
                claimed = attached.claim(conn, source, CLAIM_BATCHES * ingester.extractor.batch_size, max_bytes)
            if not claimed:
                return None
            gone: list[Claimed] = []  # rows deleted, or without an image now
            failed: list[tuple[Claimed, str]] = []
            items: list[tuple[Claimed, Item]] = []
            for row in claimed:
                if not row.found or row.size is None:
                    gone.append(row)
                elif row.value is None:
                    failed.append((row, f"image of {row.size} bytes is over the {max_bytes}-byte limit"))
                else:
                    try:
                        items.append((row, self._item(source, row)))
                    except ImgdbError as exc:
                        failed.append((row, str(exc)))
            linked: list[tuple[Claimed, str]] = []  # row -> content hash of its image now
            seen: set[str] = set()  # content embedded once, however many rows hold it
            pending: list[Prepared] = []
            embedded: list[tuple[list[Prepared], np.ndarray, np.ndarray | None]] = []
            for (row, item), loaded in zip(items, ingester.load([item for _, item in items], known, local=True)):
                if isinstance(loaded, Failure):
                    failed.append((row, loaded.error if isinstance(item, Blob) else f"{loaded.path}: {loaded.error}"))
                    continue
                sha = loaded.sha256 if isinstance(loaded, Known) else loaded.facts.sha256
                linked.append((row, sha))
                if isinstance(loaded, Prepared) and sha not in seen:
                    seen.add(sha)
                    pending.append(loaded)
                if len(pending) >= ingester.extractor.batch_size:  # the model runs while decoding goes on
                    embedded.append((pending, *ingester.embed(pending)))
                    pending = []
            if pending:
                embedded.append((pending, *ingester.embed(pending)))
            if embedded:
                # One write for the whole claim: all its images, then all its vectors (whose trigger
                # locks the index's registry row) - the order every writer takes its locks in.
                codes = [c for _, _, c in embedded]
                ingester.write(conn, [p for batch, _, _ in embedded for p in batch],
                               np.concatenate([v for _, v, _ in embedded]),
                               None if codes[0] is None else np.concatenate(codes), direct=False)
            ids = images.ids_by_hash(conn, sorted({sha for _, sha in linked}))
            held = vectors.ids_with_vectors(conn, ingester.index, sorted(ids.values()))
            # Content another worker dropped from the index between our look-up and now: next time.
            failed += [(row, "its image left the index meanwhile (another worker); tried again later")
                       for row, sha in linked if ids.get(sha) not in held]
            linked = [(row, sha) for row, sha in linked if ids.get(sha) in held]
            changed = [(row, ids[sha]) for row, sha in linked if ids[sha] != row.image_id]
            attached.set_refs(conn, source, [row.ref for row, _ in changed], [image_id for _, image_id in changed])
            # A row whose image cannot be read now no longer shows the one it had: the index holds
            # what the table holds, and sync_failures says why the row is missing.
            dropped = [row for row in gone + [row for row, _ in failed] if row.image_id is not None]
            attached.remove_refs(conn, source, [row.ref for row in dropped])
            previous = [row.image_id for row, _ in changed if row.image_id is not None]
            orphans = attached.remove_orphan_vectors(conn, ingester.index, previous + [row.image_id for row in dropped])
            attached.record_failures(conn, source, [(row.ref, error) for row, error in failed])
            attached.clear_failures(conn, source, [row.ref for row, _ in linked] + [row.ref for row in gone])
        return _Outcome(len(claimed), linked, gone, failed, orphans)

    @staticmethod
    def _item(source: Source, row: Claimed) -> Item:
        """What ingest reads for a claimed row: its bytes (bytea), or the file or URL it names."""
        if isinstance(row.value, bytes):
            return Blob(f"table:{source.table}/{row.ref}", row.value)
        return locate(row.value, source.root)

    def _train(self, ingester: Ingester, sources: Sequence[Source], on_status: StatusCallback | None) -> None:
        """An index whose extractor learns from the collection (a codebook, a whitening) and has not
        yet: learn it from a sample of its attached tables' rows first, as ingest does from its files."""
        max_bytes = self.catalog.settings.fetch.max_bytes
        with self.database.connect() as conn:
            wanted = ingester.extractor.sample_size(attached.queued(conn, sources))
            rows = [(source, ref, value) for source in sources if wanted
                    for ref, value in attached.sample_values(conn, source, wanted, max_bytes)]
        items: list[Item] = []
        for source, ref, value in rows:
            try:
                items.append(self._item(source, Claimed(ref, True, len(value), value, None, None)))
            except ImgdbError:
                continue  # a row it cannot read: the sync proper reports it
        if wanted and not items:
            raise ImgdbError(f"index {ingester.index.name!r} must learn from its images first, and its attached "
                             "tables have no readable image yet")
        ingester.train(items[:wanted], on_status, sampled=True)
