"""``imgdb index calibrate``: an index learns what its distances mean (:mod:`imgdb.query.scores`).

From a sample of the index's own images, read again as re-encoding reads them: each image is edited
the ways pictures get copied (:mod:`imgdb.training.edits`) and the copies encoded as the gallery was,
so the distance from each copy to the image's stored vector is one *of the same picture*; the
image's nearest other images in the index give distances *of different pictures*. Where the index
keeps local features, each pair is verified too (the copies' features extracted, the neighbours'
read back), so that the second model learns from inliers as well.

A collection holds duplicates of its own, and a neighbour that is one would teach the models that
the same picture is a different one. Such neighbours are left out: where features are kept, those
that verify; elsewhere, those nearer than all but the nearest twentieth of the edited copies.

Learned again when the index's descriptors change (``imgdb index train``); until it has learned,
hits carry no score, and what needs one (``--min-score``, ``imgdb duplicates``) calibrates first.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from imgdb.catalog import Catalog
from imgdb.db import images, local_features, state
from imgdb.db import search as sql
from imgdb.db.records import IndexRecord
from imgdb.errors import ImgdbError
from imgdb.features import keypoints
from imgdb.jobs.ingest import Failure, Ingester, IngestReport, ProgressCallback, StatusCallback
from imgdb.jobs.reencode import read_back
from imgdb.query import scores
from imgdb.query.verify import Verify, verify
from imgdb.training.edits import EDITS, near_copies

#: Images a calibration learns from by default: each gives one pair per edit and up to NEIGHBOURS.
SAMPLE = 100
#: Different pictures per sampled image: its nearest others in the index (the hard ones).
NEIGHBOURS = 10
#: Fewest images an index needs to learn from.
MIN_IMAGES = 10
#: Without local features, a neighbour nearer than this quantile of the copies' distances is taken
#: for a duplicate already in the collection, and left out.
PRESUMED_DUPLICATE = 0.05


@dataclass
class CalibrationReport:
    index: str
    images: int = 0
    same: int = 0
    different: int = 0
    verified: bool = False
    #: The distance the distance model scores 0.5.
    distance_at_half: float = 0.0
    seconds: float = 0.0
    failed: list[Failure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "images": self.images, "same": self.same, "different": self.different,
                "verified": self.verified, "distance_at_half": round(self.distance_at_half, 4),
                "seconds": round(self.seconds, 3), "failed": [{"path": f.path, "error": f.error} for f in self.failed]}


@dataclass
class _Pairs:
    """Evidence gathered so far: distances and inliers (-1: not verified) of each kind of pair."""

    same: list[tuple[float, int]] = field(default_factory=list)
    different: list[tuple[float, int]] = field(default_factory=list)


def calibrate(catalog: Catalog, index: IndexRecord, *, sample: int = SAMPLE, among: set[int] | None = None,
              on_progress: ProgressCallback | None = None, on_status: StatusCallback | None = None) -> CalibrationReport:
    """Learn ``index``'s score models from ``sample`` of its images (of ``among``, where given) and
    store them with its learned state."""
    started = time.perf_counter()
    with catalog.database.connect() as conn:
        held = [row for row in images.of_index(conn, index) if among is None or row.image_id in among]
    if len(held) < MIN_IMAGES:
        raise ImgdbError(f"index {index.name!r} has {len(held)} images to learn its scores from: "
                         f"it needs at least {MIN_IMAGES}")
    if sample < 1:
        raise ImgdbError(f"sample must be at least 1, not {sample}")
    chosen = random.Random(0).sample(held, min(sample, len(held)))
    if on_status:
        on_status(f"calibrating {index.name!r} on {len(chosen)} of its images, {len(EDITS)} edited copies each")
    ingester, rng, pairs = Ingester(catalog, index), np.random.default_rng(0), _Pairs()
    spec = None if index.local is None else keypoints.parse_keypoints(index.local)
    report = IngestReport()
    for batch in read_back(ingester, chosen, report, on_progress, prepare=lambda pixels: pixels,
                           outcome="it is left out of the calibration"):
        for row, loaded in batch:
            _gather(catalog, index, spec, row.image_id, loaded.prepared, rng, pairs)
    if len(pairs.same) < MIN_IMAGES or len(pairs.different) < MIN_IMAGES:
        raise ImgdbError(f"index {index.name!r}: too few images could be read again to calibrate "
                         f"({len(report.failed)} could not)")
    learned = _fit(pairs, verified=spec is not None)
    with catalog.database.engine.begin() as conn:
        state.save(conn, index, learned, scores.STATE_OWNER)
    catalog.layer.forget(index)
    model = scores.Calibration.of(learned)
    assert model is not None
    return CalibrationReport(index.name, len(chosen) - len(report.failed), len(pairs.same), len(pairs.different),
                             spec is not None, model.distance_at(0.5), time.perf_counter() - started, report.failed)


def _gather(catalog: Catalog, index: IndexRecord, spec: keypoints.KeypointSpec | None, image_id: int,
            pixels: Image.Image, rng: np.random.Generator, pairs: _Pairs) -> None:
    """One sampled image's pairs: its edited copies against its stored vector, its nearest others."""
    extractor = catalog.extractor(index)
    copies = [Image.fromarray(copy) for _, copy in near_copies(np.asarray(pixels.convert("RGB")), rng)]
    encoded = extractor.embed([extractor.prepare(copy) for copy in copies])

    def read(conn):  # noqa: ANN001, ANN202 - one search connection for the reads
        mine = sql.stored_vectors(conn, index, [image_id]).get(image_id)
        if mine is None:  # (deleted meanwhile)
            return None, [], {}
        near = sql.nearest(conn, index, mine, NEIGHBOURS + 1, 4 * (NEIGHBOURS + 1))
        others = [(hit.id, hit.distance) for hit in near if hit.id != image_id][:NEIGHBOURS]
        stored = {} if spec is None else local_features.read(conn, str(spec), spec.dim,
                                                             [image_id, *(i for i, _ in others)])
        return mine, others, stored

    mine, others, stored = catalog.database.searching(read)
    if mine is None:
        return
    distances = np.linalg.norm(encoded - mine[None, :], axis=1)
    if spec is None:
        pairs.same += [(float(d), -1) for d in distances]
        pairs.different += [(float(d), -1) for _, d in others]
        return
    features = {i: (row[1], keypoints.descriptors(keypoints.QuantizedFeatures(*row), spec)) for i, row in stored.items()}
    if image_id not in features:
        return
    xy, descriptors = features[image_id]
    for copy, d in zip(copies, distances):
        found = spec.extract(copy)
        pairs.same.append((float(d), verify(found.xy, found.descriptors, xy, descriptors).inliers))
    for other, d in others:
        inliers = verify(xy, descriptors, *features[other]).inliers if other in features else 0
        if inliers < Verify.MIN_INLIERS:  # (one that verifies is a duplicate the collection holds)
            pairs.different.append((float(d), inliers))


def _fit(pairs: _Pairs, *, verified: bool) -> dict[str, np.ndarray]:
    """Logistic models of *same picture* on the evidence, the two kinds weighted equally (even prior
    odds), as ``[intercept, weights...]``."""
    from sklearn.linear_model import LogisticRegression

    same, different = np.array(pairs.same, np.float64), np.array(pairs.different, np.float64)
    if not verified:
        floor = np.quantile(same[:, 0], PRESUMED_DUPLICATE)
        different = different[different[:, 0] > floor]
    labels = np.r_[np.ones(len(same)), np.zeros(len(different))]
    both = np.concatenate([same, different])
    learned = {}
    for name, x in ((scores.DISTANCE, scores.evidence(both[:, 0])),
                    *(((scores.VERIFIED, scores.evidence(both[:, 0], both[:, 1])),) if verified else ())):
        model = LogisticRegression(class_weight="balanced", C=10.0).fit(x, labels)
        learned[name] = np.r_[model.intercept_, model.coef_.ravel()].astype(np.float64)
    return learned
