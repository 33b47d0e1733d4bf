"""The offline stage: images in, descriptors and metadata out, written to PostgreSQL.

Per image, in worker threads: read (or fetch) the bytes, hash them, skip content the index already
holds, decode safely, and let the extractor prepare the pixels (and, for an index that verifies its
hits, extract the image's local features from the same decode). In the main thread, in order: batch
the prepared images through the extractor and write each batch in its own transaction (images upserted
by content hash, vectors and their first-stage codes by binary COPY, local features beside them). A
crash or Ctrl-C therefore loses at most the batch in flight, and a rerun skips everything committed.
When a load of BULK_LOAD images or more at least doubles an index, its ANN index is dropped first and
built once at the end, instead of growing the graph vector by vector; a first stage that learns from
the data (a quantizer, binary quantization's centre) learns at the end of the first load that leaves
the index enough vectors (:meth:`imgdb.ann.layer.AnnLayer.sync`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np
from PIL import Image
from sqlalchemy.engine import Connection

from imgdb.catalog import Catalog
from imgdb.db import attached, duplicates, images, local_features, pgvector, state, values, vectors
from imgdb.db.engine import Database
from imgdb.db.records import IndexRecord
from imgdb.encoding import decode_scale
from imgdb.errors import ImgdbError
from imgdb.features import keypoints
from imgdb.features.base import Extractor
from imgdb.io import sources
from imgdb.io.reader import ImageFacts, decode, sha256_hex
from imgdb.parallel import ordered_map

#: Loads of at least this many images read every content hash of the index up front (smaller ones
#: ask per image: an upload must not cost a read of the whole collection), and when they at least
#: double it, build its ANN index once at the end instead of growing it image by image; smaller ones
#: never touch the ANN index (no DDL, no lock).
BULK_LOAD = 1000
#: A first load smaller than this teaches a trainable extractor too little to be left as it is:
#: measured (benchmarks/codebook_sources.py), RootSIFT-VLAD learned from 21 images of the museum
#: gallery fell from mAP 0.990 to 0.684 on held-out copies (its PCA keeps at most 20 components).
FEW_TO_LEARN = 100
#: ``(done, total)``: called as images are processed, for progress bars.
ProgressCallback = Callable[[int, int], None]
#: One line on what a long step is doing (training a codebook...), for the user.
StatusCallback = Callable[[str], None]


@dataclass(frozen=True)
class Failure:
    path: str
    error: str


@dataclass(frozen=True)
class NearDuplicate:
    """An image given to ingest that is the same picture as one the index holds (``match``), or as
    one given before it in the same load (``match`` None where that one was not written), and what
    became of it (``--near-duplicates``: ``skipped`` or ``linked``)."""

    path: str
    match: int | None
    match_uri: str
    distance: float
    score: float
    inliers: int | None
    action: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "match": self.match, "match_uri": self.match_uri, "distance": round(self.distance, 4),
                "score": round(self.score, 4), **({"inliers": self.inliers} if self.inliers is not None else {}),
                "action": self.action}


@dataclass
class IngestReport:
    """What ``imgdb ingest --json`` prints (the contract in ``../shared/CONVENTIONS.md``), and with
    ``--near-duplicates``, the images it found to be the same picture as another."""

    added: int = 0
    duplicates: int = 0
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    near_duplicates: list[NearDuplicate] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "duplicates": self.duplicates,
            "failed": [{"path": f.path, "error": f.error} for f in self.failed],
            "seconds": round(self.seconds, 3),
            **({} if self.near_duplicates is None else {"near_duplicates": [n.to_json() for n in self.near_duplicates]}),
        }


class Screen(Protocol):
    """What judges a batch before it is written (``--near-duplicates``:
    :class:`imgdb.jobs.duplicates.NearDuplicateScreen`)."""

    @property
    def skip(self) -> bool:
        """Whether an image found to be the same picture as another is left out (else it is linked)."""

    def check(self, batch: Sequence[Prepared], vectors: np.ndarray) -> list[NearDuplicate | None]:
        """Per image, the image it is the same picture as, if any."""

    def link(self, conn: Connection, batch: Sequence[Prepared], ids: Sequence[int],
             found: Sequence[NearDuplicate | None]) -> None:
        """Keep the near pairs of a written batch, in its transaction."""


@dataclass(frozen=True)
class Blob:
    """An image whose bytes are at hand already (a ``bytea`` column of an attached table), with the
    uri it is recorded under."""

    uri: str
    data: bytes


@dataclass(frozen=True)
class Confined:
    """A file that must lie inside ``root`` (an attached table's row names it): checked on the file
    opened, not on its name (:func:`imgdb.io.reader.read_file`), so that a symlink swapped in after
    a check cannot bring a file from outside."""

    uri: str
    root: str


#: What ingest reads: a file path, an http(s) URL, a file confined to a folder, or bytes at hand.
Item = Union[str, Blob, Confined]


@dataclass(frozen=True)
class Prepared:
    """An image read, decoded and prepared for the extractor, with its local features where the
    index verifies its hits."""

    uri: str
    facts: ImageFacts
    prepared: Any
    local: keypoints.QuantizedFeatures | None = None


@dataclass(frozen=True)
class Known:
    """An image whose content the index holds already."""

    uri: str
    sha256: str


class ContentInIndex:
    """``sha256 in known``, asked of PostgreSQL per image (an index probe, next to a decode it may
    save): for loads too small to read every hash of the index for (a web upload, a sync claim),
    and never stale, whatever other processes do meanwhile."""

    def __init__(self, database: Database, index: IndexRecord) -> None:
        self.database = database
        self.index = index

    def __contains__(self, sha256: object) -> bool:
        with self.database.connect() as conn:
            return images.in_index(conn, self.index, str(sha256))


def load_metadata_file(path: Path) -> dict[str, dict[str, Any]]:
    """Read a ``--metadata`` file: image paths relative to its folder → metadata objects, keyed here
    by absolute path."""
    try:
        data = values.loads(path.read_bytes(), f"metadata file {path}")
    except OSError as exc:
        raise ImgdbError(f"cannot read metadata file {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ImgdbError(f"metadata file {path} must be a JSON object mapping image paths to objects")
    base = Path(sources.absolute(path)).parent
    return {sources.absolute(base / key): value for key, value in data.items()}


def ingest(catalog: Catalog, paths: Iterable[str | Path], *, index: str, meta: dict[str, Any] | None = None,
           metadata_file: str | Path | None = None, on_progress: ProgressCallback | None = None,
           on_status: StatusCallback | None = None, screen: Screen | None = None) -> IngestReport:
    """Add files, folders (recursively) and URLs to ``index`` (:class:`Ingester`), with ``meta`` for
    every image and a ``--metadata`` file's per-image metadata; ``screen`` judges each batch first."""
    started = time.perf_counter()
    metadata = load_metadata_file(Path(metadata_file)) if metadata_file else None
    report = Ingester(catalog, catalog.index(index), screen=screen).run(
        paths, meta=meta, metadata=metadata, on_progress=on_progress, on_status=on_status)
    report.seconds = time.perf_counter() - started  # (the model's loading included: what the user waited for)
    return report


class Ingester:
    """Ingest sources into one index with one extractor (default: the index's own)."""

    def __init__(self, catalog: Catalog, index: IndexRecord, extractor: Extractor | None = None,
                 screen: Screen | None = None) -> None:
        self.catalog = catalog
        #: What judges each batch before it is written (``--near-duplicates``), if anything.
        self.screen = screen
        self.database = catalog.database
        self.settings = catalog.settings
        self.index = index
        self.extractor = extractor or catalog.extractor(index)
        #: The index's in-process first stage, if it keeps codes: new vectors are written with theirs.
        self.codes = catalog.layer.code_index(index)
        #: The local features it keeps for spatial verification, if any: written with the vectors.
        self.keypoints = None if index.local is None else keypoints.parse_keypoints(index.local)
        self.scale_hint = decode_scale(self.extractor, self.keypoints)

    def train(self, todo: Sequence[Item], on_status: StatusCallback | None = None, *,
              sampled: bool = False) -> None:
        """Fit a trainable extractor on a random sample of ``todo`` (all of it, when ``sampled``
        already) and store what it learned: the first learning of an index (learning again is
        :mod:`imgdb.jobs.reencode`'s).

        Processes take the index's training lock in turn; one that finds the state learned
        meanwhile takes it instead of learning its own (every vector of an index must come from
        one state)."""
        with self.database.engine.begin() as conn:
            state.lock_learning(conn, self.index)
            learned = state.load(conn, self.index)
            if learned:
                self.extractor.load_state(learned)
                return
            sample = list(todo) if sampled else random.Random(0).sample(list(todo), self.extractor.sample_size(len(todo)))
            if on_status and sample:
                on_status(f"training {self.extractor.spec} on {len(sample)} images")
            learned_from = [item.prepared for item in self.load(sample) if isinstance(item, Prepared)]
            self.extractor.fit(learned_from)
            state.save(conn, self.index, self.extractor.state())
        if on_status and 0 < len(learned_from) < FEW_TO_LEARN:
            on_status(f"{self.index.name!r} learned from only {len(learned_from)} images: once the collection has "
                      f"grown, `imgdb index train {self.index.name}` learns again from it")

    def run(self, paths: Iterable[str | Path], *, meta: dict[str, Any] | None = None,
            metadata: dict[str, dict[str, Any]] | None = None,
            on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None) -> IngestReport:
        """Ingest files, folders and URLs. ``meta`` applies to every image; ``metadata`` maps absolute
        paths to per-image metadata, which wins over ``meta`` key by key. An extractor that has not
        learned its codebook yet learns it first, from a sample of these images."""
        started = time.perf_counter()
        meta = values.check_metadata(meta or {}, "--meta")
        todo = list(sources.expand(paths))
        self.begin(todo, on_status)
        try:
            report = self.add(todo, self.known_content(len(todo)), meta=meta, metadata=metadata or {},
                              on_progress=on_progress)
        finally:
            self.finish()
        report.seconds = time.perf_counter() - started
        return report

    def begin(self, todo: Sequence[Item], on_status: StatusCallback | None = None) -> None:
        """Before a load of ``todo``: the extractor learns, if it has not yet, from a sample of it;
        a load of BULK_LOAD images or more that may double the index drops its ANN index, for
        :meth:`finish` to build once."""
        if not self.extractor.trained:
            self.train(todo, on_status)
        if len(todo) >= BULK_LOAD:
            with self.database.engine.begin() as conn:
                if len(todo) > vectors.count(conn, self.index):
                    pgvector.drop_ann(conn, self.index)

    def known_content(self, load: int) -> Container[str]:
        """What a load of ``load`` images skips: the content hashes of the index, all read at once for
        a load of BULK_LOAD or more, else asked per image."""
        if load < BULK_LOAD:
            return ContentInIndex(self.database, self.index)
        with self.database.connect() as conn:
            return images.hashes_in_index(conn, self.index)

    def finish(self) -> None:
        """After a load (even a failed one): the first stage brought up to date with what was written."""
        self.catalog.layer.sync(self.index)

    def add(self, todo: Iterable[Item], known: Container[str], *, meta: dict[str, Any],
            metadata: dict[str, dict[str, Any]], on_progress: ProgressCallback | None = None) -> IngestReport:
        """Read, embed and write ``todo`` batch by batch, each batch in its own transaction; content in
        ``known`` or seen earlier in ``todo`` counts as a duplicate (and takes the metadata given now).
        The part of a load that a Ray actor runs on its share (:mod:`imgdb.jobs.on_ray`)."""
        todo = list(todo)
        report = IngestReport(near_duplicates=None if self.screen is None else [])
        with self.database.connect() as conn:
            follows_tables = attached.has_sources(conn, self.index)
        seen: set[str] = set()
        batch: list[Prepared] = []
        relabel: dict[str, dict[str, Any]] = {}  # known content given metadata now: sha256 -> metadata
        given: list[str] = []  # known content given again: it is now in the index by direct ingest too
        found_again: list[tuple[str, str]] = []  # (sha256, uri): known content at another path (exact duplicates)
        for done, item in enumerate(self.load(todo, known, local=True), start=1):
            if not isinstance(item, Failure) and (refused := self._unstorable(item, meta, metadata)):
                item = refused
            if isinstance(item, Failure):
                report.failed.append(item)
            elif isinstance(item, Known) or item.facts.sha256 in seen:
                report.duplicates += 1
                found_again.append((item.sha256 if isinstance(item, Known) else item.facts.sha256, item.uri))
                if isinstance(item, Known) and (labels := {**meta, **metadata.get(item.uri, {})}):
                    relabel[item.sha256] = labels
                if isinstance(item, Known) and follows_tables:
                    given.append(item.sha256)
            else:
                seen.add(item.facts.sha256)
                batch.append(item)
                if len(batch) >= self.extractor.batch_size:
                    self._write(batch, meta, metadata, report)
                    batch = []
            if on_progress:
                on_progress(done, len(todo))
        self._write(batch, meta, metadata, report)
        if relabel or given or found_again:
            with self.database.engine.begin() as conn:
                images.merge_metadata(conn, relabel)
                vectors.mark_direct(conn, self.index, given)
                duplicates.record_paths(conn, found_again)
        return report

    @staticmethod
    def _unstorable(item: Prepared | Known, meta: dict[str, Any],
                    metadata: dict[str, dict[str, Any]]) -> Failure | None:
        """The refusal of an image whose own metadata jsonb cannot hold (NaN, NUL, too deep), if so."""
        try:
            values.check_metadata({**meta, **metadata.get(item.uri, {})})
        except values.UnstorableValue as exc:
            return Failure(item.uri, str(exc))
        return None

    def load(self, items: Iterable[Item], known: Container[str] = frozenset(),
             prepare: Callable[[Image.Image], Any] | None = None, *,
             local: bool = False) -> Iterator[Prepared | Known | Failure]:
        """Read, hash and prepare ``items`` in worker threads, in order, a few batches ahead;
        content in ``known`` (sha256) is not decoded. ``prepare`` replaces the extractor's own
        (fine-tuning wants pixels, not network input); ``local``: extract the local features too,
        where the index keeps them."""
        prepare = prepare or self.extractor.prepare
        spec = self.keypoints if local else None
        return ordered_map(lambda item: self._load(item, known, prepare, spec), items,
                           ahead=4 * self.extractor.batch_size)

    def _load(self, item: Item, known: Container[str], prepare: Callable[[Image.Image], Any],
              spec: keypoints.KeypointSpec | None) -> Prepared | Known | Failure:
        """Worker-thread part: read, hash, skip known content, decode, prepare."""
        uri = item if isinstance(item, str) else item.uri
        try:
            values.check_file_name(uri)
            data = item.data if isinstance(item, Blob) else sources.load(uri, self.settings.fetch, inside=(
                item.root if isinstance(item, Confined) else None))
            sha = sha256_hex(data)
            if sha in known:
                return Known(uri, sha)
            image = decode(data, limits=self.settings.decoding, scale_hint=self.scale_hint, sha256=sha)
            local = None if spec is None else keypoints.quantize(spec.extract(image.pixels), spec)
            return Prepared(uri, image.facts, prepare(image.pixels), local)
        except ImgdbError as exc:
            return Failure(values.printable(uri), str(exc).removeprefix(f"{uri}: "))
        except Exception as exc:  # noqa: BLE001 - one odd file must not abort a long ingest
            return Failure(values.printable(uri), f"unexpected {type(exc).__name__}: {exc}")

    def _write(self, batch: Sequence[Prepared], meta: dict[str, Any],
               metadata: dict[str, dict[str, Any]], report: IngestReport) -> None:
        """Embed one batch and commit it: images and vectors land together or not at all."""
        if not batch:
            return
        found, codes = self.embed(batch)
        metas = [{**meta, **metadata.get(item.uri, {})} for item in batch]
        near: list[NearDuplicate | None] = []
        if self.screen is not None:
            near = self.screen.check(batch, found)
            assert report.near_duplicates is not None  # (a list wherever a screen runs: add())
            report.near_duplicates += [n for n in near if n is not None]
            if self.screen.skip:
                keep = [i for i, n in enumerate(near) if n is None]
                batch, metas, near = [batch[i] for i in keep], [metas[i] for i in keep], []
                found, codes = found[keep], None if codes is None else codes[keep]
                if not batch:
                    return

        def write(conn: Connection) -> tuple[list[int], int]:
            ids, added = self.write(conn, batch, found, codes, metas)
            if self.screen is not None and any(n is not None for n in near):
                self.screen.link(conn, batch, ids, near)
            return ids, added

        ids, added = self.database.writing(write)
        report.added += added
        report.duplicates += len(ids) - added

    def embed(self, batch: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray | None]:
        """The batch's vectors, and their first-stage codes where the index has a Python-side one."""
        embedded = self.extractor.embed([item.prepared for item in batch])
        return embedded, self.codes.codes_for(embedded) if self.codes is not None else None

    def write(self, conn: Connection, batch: Sequence[Prepared], embedded: np.ndarray, codes: np.ndarray | None,
              metas: Sequence[dict[str, Any]] | None = None, *, direct: bool = True) -> tuple[list[int], int]:
        """Write a batch's images and vectors in ``conn``'s transaction; returns the images' ids in
        order and how many vectors were new. ``direct`` false: the vectors are there only for
        attached tables' rows (:mod:`imgdb.jobs.sync`).

        Images first, then vectors (whose trigger locks the index's registry row): every writer
        takes its locks in that order."""
        metas = metas or [{} for _ in batch]
        ids = images.upsert(conn, [(item.uri, item.facts, m) for item, m in zip(batch, metas)])
        # Another process may have indexed the same content meanwhile: count it, don't collide.
        present = vectors.ids_with_vectors(conn, self.index, ids)
        keep = [i for i, image_id in enumerate(ids) if image_id not in present]
        vectors.copy(conn, self.index, [ids[i] for i in keep], embedded[keep],
                     None if codes is None else codes[keep], direct=direct)
        if self.keypoints is not None:
            local_features.write(conn, str(self.keypoints), [(image_id, item.local.scale, item.local.xy, item.local.codes)
                                                             for image_id, item in zip(ids, batch) if item.local is not None])
        if direct and present:
            vectors.mark_direct(conn, self.index, ids=sorted(present))
        return ids, len(keep)
