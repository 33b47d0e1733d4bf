"""``imgdb train NAME --from INDEX``: fine-tune INDEX's network on its images into a new index NAME
(a ``cnnvlad:`` INDEX, the default, lends its backbone: :func:`starting_network`).

The steps, each reusing what imgdb does elsewhere: read INDEX's images back as the re-encoder does
(:func:`imgdb.jobs.reencode.read_back`: files, URLs or an attached table's bytes, refused if they
changed), train (:mod:`imgdb.training.trainer`), store the trained weights by their sha256
(:meth:`imgdb.catalog.Catalog.store_network`), create NAME with a spec naming them, and encode
INDEX's images into it.
INDEX is never changed, so a training that disappoints costs nothing but ``imgdb index drop NAME``.

Methods: ``triplet`` (no labels), ``category`` (one ``--label-key``: a classification head plus the
triplet term), ``multitask`` (several label keys, a head each), ``distill`` (a smaller ``--student``
learns INDEX's similarities). Class-weighted features (``cam``) are a pooling, not a training.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection

from imgdb.ann.spec import AnnSpec
from imgdb.catalog import Catalog
from imgdb.db import images, indexes, state
from imgdb.db.images import StoredImage
from imgdb.db.records import IndexRecord, StoredNetwork, check_name
from imgdb.errors import ImgdbError, IndexExists
from imgdb.features.base import Extractor
from imgdb.features.cnn import CnnExtractor
from imgdb.features.cnn_config import CnnConfig
from imgdb.features.cnnvlad import CnnVladExtractor
from imgdb.features.network import serialize
from imgdb.features.spec import parse_spec
from imgdb.features.torch_net import torch_device
from imgdb.jobs.ingest import Failure, Ingester, IngestReport, ProgressCallback, StatusCallback
from imgdb.jobs.reencode import read_back
from imgdb.training import losses
from imgdb.training.trainer import EpochCallback, Member, TrainOptions, train

METHODS = ("triplet", "category", "multitask", "distill")
#: Images training reads at most (a random sample beyond): each is held in memory as pixels.
MAX_TRAINING_IMAGES = 5000


@dataclass
class TrainReport:
    """What ``imgdb train --json`` prints (the contract in ``../shared/CONVENTIONS.md``)."""

    index: str
    source: str
    method: str
    network: str
    extractor: str
    images: int
    losses: list[float]
    train_seconds: float
    views: int
    encoded: IngestReport
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "from": self.source, "method": self.method, "network": self.network,
                "extractor": self.extractor, "images": self.images, "epochs": len(self.losses),
                "loss": [round(x, 6) for x in self.losses], "views": self.views,
                "train_seconds": round(self.train_seconds, 1), "encoded": self.encoded.added,
                "failed": [{"path": f.path, "error": f.error} for f in self.failed + self.encoded.failed],
                "seconds": round(self.seconds, 1)}


def label_heads(keys: Sequence[str]) -> list[str]:
    """``meta.KEY`` options to metadata keys."""
    out = []
    for key in keys:
        name = key.removeprefix("meta.")
        if not key.startswith("meta.") or not name:
            raise ImgdbError(f"--label-key {key!r}: name a metadata key as meta.KEY")
        out.append(name)
    if len(set(out)) != len(out):
        raise ImgdbError("--label-key: the same key twice")
    return out


def check_method(method: str, keys: Sequence[str], student: str | None) -> None:
    if method not in METHODS:
        raise ImgdbError(f"unknown method {method!r}: use {', '.join(METHODS)}")
    if method == "category" and len(keys) != 1:
        raise ImgdbError("--method category takes one --label-key meta.KEY (several: --method multitask)")
    if method == "multitask" and len(keys) < 2:
        raise ImgdbError("--method multitask takes two --label-key meta.KEY or more (one: --method category)")
    if method in ("triplet", "distill") and keys:
        raise ImgdbError(f"--method {method} uses no labels: drop --label-key (or use category/multitask)")
    if (method == "distill") != (student is not None):
        raise ImgdbError("--student BACKBONE goes with --method distill, and distill needs one")


def student_spec(student: str, teacher: CnnConfig) -> CnnConfig:
    """The student's extractor: a backbone name (pooled like the teacher) or a whole cnn spec."""
    text = student if student.startswith("cnn:") else f"cnn:{student}/{teacher.pooling}/size={teacher.size}"
    config = CnnConfig.parse(parse_spec(text))
    if config.net or config.weights:
        raise ImgdbError("--student: an ImageNet backbone, without net= or weights=")
    return replace(config, whiten="off")


def starting_network(source: IndexRecord, extractor: Extractor) -> CnnConfig:
    """The network a training of ``source`` starts from: a ``cnn:`` index's own; for a ``cnnvlad:``
    index (the default), its backbone under the default pooling: what training teaches is a global
    descriptor, and the index it makes is a ``cnn:`` one. Other families have no network to tune."""
    if isinstance(extractor, CnnExtractor):
        return extractor.config
    if isinstance(extractor, CnnVladExtractor):
        return CnnConfig.parse(parse_spec(f"cnn:{extractor.cnn.config.backbone}"))
    raise ImgdbError(f"index {source.name!r} ({source.extractor}) has no network to fine-tune: "
                     "use a cnn: or cnnvlad: index")


#: Kept with an index while a training fills it: an index so marked was left by a killed run, and
#: the next training of that name replaces it.
UNFINISHED = "train."


def train_network(catalog: Catalog, name: str, source_name: str, *, method: str = "triplet",
                  label_keys: Sequence[str] = (), student: str | None = None,
                  options: TrainOptions | None = None, on_status: StatusCallback | None = None,
                  on_progress: ProgressCallback | None = None, on_epoch: EpochCallback | None = None) -> TrainReport:
    """Fine-tune ``source_name``'s network on its images into a new index ``name`` (see the module)."""
    started = time.monotonic()
    options = options or TrainOptions()
    check_name(name)
    keys = label_heads(label_keys)
    check_method(method, keys, student)
    source = catalog.index(source_name)
    with catalog.database.connect() as conn:
        _unfinished_or_none(conn, name)
        held = images.of_index(conn, source)
        learned = state.load(conn, source)
    own = catalog.extractor(source)
    start = starting_network(source, own)
    if len(held) > MAX_TRAINING_IMAGES:
        held = sorted(random.Random(0).sample(held, MAX_TRAINING_IMAGES), key=lambda row: row.image_id)
    trainee = CnnExtractor(student_spec(student, start) if student else start,
                           replace(catalog.context, runtime="torch"))
    if not student and isinstance(own, CnnExtractor):
        trainee.load_state(learned)  # (a whitening the source learned is where training starts)
    device = torch_device(catalog.settings.device)

    if on_status:
        on_status(f"reading the {len(held)} images of {source.name!r}")
    read = IngestReport()
    ingester = Ingester(catalog, source, own)
    pixels = {row.image_id: loaded.prepared for batch in read_back(
        ingester, held, read, on_progress, prepare=lambda image: trainee.resized(np.asarray(image)),
        outcome="left out of training") for row, loaded in batch}
    members, classes = _members(catalog, pixels, keys)
    if on_status:
        views = f"{options.views} synthetic photos of each"
        on_status(f"training {method} on {len(members)} images ({views}) on {device.type}")
    teacher = (own if isinstance(own, CnnExtractor) else CnnExtractor(start, catalog.context)) if student else None
    net = trainee.net
    trained = train(net, lambda p: trainee.normalise(trainee.resized(p)), members, options, classes=classes,
                    device=device, teacher=(teacher.net, lambda p: teacher.normalise(teacher.resized(p)))
                    if teacher else None, on_progress=on_progress, on_epoch=on_epoch)
    sha, blob = serialize(net.trained_state())
    spec = str(replace(trainee.config, whiten="off", net=sha))
    catalog.store_network(StoredNetwork(
        sha, trainee.config.backbone, blob, method,
        {**vars(options), "from": source.name, "from_extractor": source.extractor, "label_keys": list(label_keys),
         "views": trained.views}, len(members), trained.losses, trained.seconds))
    planned = catalog.plan_index(spec, str(AnnSpec.of(source)), source.storage)
    with catalog.database.engine.begin() as conn:  # (created marked unfinished, in one transaction)
        if (stale := _unfinished_or_none(conn, name)) is not None:
            indexes.drop(conn, stale)
        created = planned.create(conn, name)
        state.save(conn, created, {"unfinished": np.ones(1, np.uint8)}, UNFINISHED)
    if stale is not None:
        catalog.forget(stale)
    catalog.layer.sync(created)
    if on_status:
        on_status(f"encoding the {len(pixels)} images into {name!r} with network {sha[:12]}")
    try:
        encoded = fill(catalog, created, held, on_progress)
    except BaseException:  # (Ctrl-C too) no half-filled index: the network stays stored, a rerun is quick
        catalog.drop_index(name)
        raise
    with catalog.database.engine.begin() as conn:
        state.save(conn, created, {}, UNFINISHED)
    return TrainReport(name, source.name, method, sha, spec, len(members), trained.losses, trained.seconds,
                       trained.views, encoded, read.failed, time.monotonic() - started)


def _unfinished_or_none(conn: Connection, name: str) -> IndexRecord | None:
    """The index ``name`` left unfinished by a training that was killed (the next one replaces it),
    None if there is no such index; IndexExists if a finished one has the name."""
    found = indexes.get(conn, name)
    if found is not None and not state.load(conn, found, UNFINISHED):
        raise IndexExists(f"index {name!r} exists already")
    return found


def _members(catalog: Catalog, pixels: dict[int, np.ndarray], keys: Sequence[str]) -> tuple[list[Member], list[int]]:
    """Training images with their class per label key (values as text; images without it: no label)."""
    with catalog.database.connect() as conn:
        meta = images.metadata(conn, list(pixels)) if keys else {}
    values = [{str(meta[i][k]) for i in pixels if meta.get(i, {}).get(k) not in (None, "")} for k in keys]
    for key, found in zip(keys, values):
        if len(found) < 2:
            raise ImgdbError(f"--label-key meta.{key}: the images hold {len(found)} distinct value(s); a head needs 2 or more")
    index_of = [{v: c for c, v in enumerate(sorted(found))} for found in values]
    members = []
    for image_id, array in pixels.items():
        labels = [index_of[h].get(str(meta.get(image_id, {}).get(k)), losses.NO_LABEL) for h, k in enumerate(keys)]
        members.append(Member(array, labels))
    return members, [len(found) for found in values]


def fill(catalog: Catalog, index: IndexRecord, held: Sequence[StoredImage],
         on_progress: ProgressCallback | None) -> IngestReport:
    """Encode the source index's images (read back again) into the new index."""
    report = IngestReport()
    started = time.perf_counter()
    ingester = Ingester(catalog, index)
    try:
        for batch in read_back(ingester, held, report, on_progress, outcome="not in the new index"):
            prepared = [loaded for _, loaded in batch]
            embedded, codes = ingester.embed(prepared)
            _, added = catalog.database.writing(lambda conn: ingester.write(conn, prepared, embedded, codes))
            report.added += added
    finally:
        catalog.layer.sync(index)
    report.seconds = time.perf_counter() - started
    return report

