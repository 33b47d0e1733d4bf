"""``imgdb duplicates``: an index's groups of duplicate images, with their evidence, kept in SQL.

Candidate pairs come from the index itself: each image's ``k`` nearest through its own first stage,
never all pairs. Each candidate is judged by the index's calibrated score (:mod:`imgdb.query.scores`)
and, where the index keeps local features, by spatial verification, which also tells *the same
picture* from *the same scene*: a copy, a crop, a picture pasted into a frame lies whole inside the
other image once the fitted homography maps it there, while two shots of a scene each show a part
the other lacks. Levels:

* ``near``: the same picture (scored 0.5 or more; where verified, one image inside the other);
* ``similar``: the same scene, not the same picture (verified but each showing what the other does
  not, or a score under 0.5 but with a good chance, or a high score the features do not confirm);
* ``exact``: the same bytes reached by several rows of attached tables (read from ``refs``).

Groups never chain: every two members of a group match, each pair that no run judged being judged
then; the representative is the member with the most pixels, then the oldest.
Runs are incremental: an image's neighbours are judged once (``duplicate_checked``), each chunk
committed with its pairs, so that a killed run resumes where it stopped; the groups are made again
from every pair kept, at the end of each run.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.engine import Connection

from imgdb import lazy
from imgdb.catalog import Catalog
from imgdb.db import duplicates as dup
from imgdb.db import images, local_features, vectors
from imgdb.db import search as sql
from imgdb.db.duplicates import Judged
from imgdb.db.records import IndexRecord
from imgdb.errors import ImgdbError
from imgdb.features import keypoints
from imgdb.jobs.calibrate import MIN_IMAGES, calibrate
from imgdb.jobs.ingest import Failure, Ingester, IngestReport, NearDuplicate, Prepared, ProgressCallback, StatusCallback
from imgdb.jobs.reencode import read_back
from imgdb.query import plan
from imgdb.query.scores import Calibration
from imgdb.query.verify import Verify, verify

cv2 = lazy.module("cv2")

#: Neighbours judged per image by default.
K = 20
#: Most neighbours a run judges per image.
MAX_K = 200
#: Images whose neighbours are judged, and committed, together.
CHUNK = 256
#: A candidate whose distance alone scores under this is judged no further (verification costs).
FLOOR = 0.02
#: The score from which a pair is the same picture.
NEAR_SCORE = 0.5
#: Without local features, the score from which a pair that is not the same picture is the same scene.
SIMILAR_SCORE = 0.2
#: Share of one image's frame that a verified pair's homography must map inside the other's for the
#: pair to be the same picture (a crop, a rotation, a picture pasted into a frame are wholly inside;
#: two shots that each show a part the other lacks are not).
CONTAINED = 0.85
#: Share of an image's frame under which the box its local features cover (their 2nd to 98th
#: percentile) makes it *framed*: a picture in a plain frame (pasted into a page, a screenshot, a
#: letterbox), whose descriptor is mostly the frame's, so that its own picture's copies are not
#: among its nearest. The job then also looks for the nearest of what the features cover.
FRAMED = 0.4
#: Fewest features from which their box says anything.
BOX_FEATURES = 16


@dataclass
class DuplicatesReport:
    """A run: how many images it compared, the pairs it kept, and the index's groups after it."""

    index: str
    checked: int = 0
    pairs: int = 0
    #: The groups (of the level asked for; one page of them where a limit was given), as
    #: :func:`imgdb.db.duplicates.groups` gives them.
    groups: list[dict[str, Any]] = field(default_factory=list)
    #: How many groups of that level the index has (the pages' sum).
    total: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"groups": self.groups, "total": self.total, "index": self.index, "checked": self.checked,
                "pairs": self.pairs, "seconds": round(self.seconds, 3)}


def contained(homography: np.ndarray, inner: tuple[float, float], outer: tuple[float, float]) -> float:
    """The share of frame ``inner`` (width, height) that ``homography`` maps inside frame ``outer``."""
    w, h = inner
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2)
    projected = cv2.convexHull(cv2.perspectiveTransform(corners, homography.astype(np.float64)).astype(np.float32))
    area = float(cv2.contourArea(projected))
    if area <= 0:
        return 0.0
    frame = np.float32([[0, 0], [outer[0], 0], [outer[0], outer[1]], [0, outer[1]]])
    inside, _ = cv2.intersectConvexConvex(projected.reshape(-1, 2), frame)
    return min(1.0, float(inside) / area)


#: An image's local features as judging uses them: positions, descriptors, detection frame (width, height).
Features = tuple[np.ndarray, np.ndarray, tuple[float, float]]


def features_of(item: Prepared, spec: keypoints.KeypointSpec) -> Features | None:
    """The features of an image being ingested (None where it has none)."""
    if item.local is None:
        return None
    scale = item.local.scale
    return (item.local.xy, keypoints.descriptors(item.local, spec),
            (item.facts.width * scale, item.facts.height * scale))


class Judge:
    """Judges pairs of one index's images: their score, their verification, their level. Keeps the
    features and frame sizes it reads for the pairs to come, until :meth:`forget`."""

    def __init__(self, catalog: Catalog, index: IndexRecord, model: Calibration) -> None:
        self.catalog, self.index, self.model = catalog, index, model
        self.spec = None if index.local is None else keypoints.parse_keypoints(index.local)
        #: Features read, with the detection frame's size: kept for the pairs to come until :meth:`forget`.
        self._features: dict[int, Features | None] = {}

    def vectors(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The stored vectors of ``ids`` (those still in the index)."""
        wanted = list(ids)
        return self.catalog.database.searching(lambda conn: sql.stored_vectors(conn, self.index, wanted))

    def forget(self) -> None:
        """Let go of the features read so far (a chunk is done: they are a few hundred KB an image)."""
        self._features.clear()

    def _load_features(self, ids: Iterable[int]) -> None:
        wanted = [i for i in ids if i not in self._features]
        if not wanted or self.spec is None:
            return
        spec = self.spec
        stored = self.catalog.database.searching(lambda conn: local_features.read(conn, str(spec), spec.dim, wanted))
        with self.catalog.database.connect() as conn:
            sizes = dup.sizes(conn, wanted)
        for image_id in wanted:
            row, size = stored.get(image_id), sizes.get(image_id)
            self._features[image_id] = None if row is None or size is None else (
                row[1], keypoints.descriptors(keypoints.QuantizedFeatures(*row), spec),
                (size[0] * row[0], size[1] * row[0]))

    def judge(self, pairs: dict[tuple[int, int], float]) -> dict[tuple[int, int], Judged]:
        """The verdict on each pair ``(a, b)`` of its distance."""
        if not pairs:
            return {}
        keys = list(pairs)
        distances = np.array([pairs[key] for key in keys])
        by_distance = self.model.scores(distances)
        worth = [key for key, s in zip(keys, by_distance) if s >= FLOOR]
        self._load_features({i for key in worth for i in key})
        verdicts = {}
        for key, d, s in zip(keys, distances.tolist(), by_distance.tolist()):
            verdicts[key] = self._level(key, d, s) if s >= FLOOR else Judged(None, d, s)
        return verdicts

    def features(self, image_id: int) -> Features | None:
        """A stored image's features, with its detection frame's size (None: it has none)."""
        self._load_features([image_id])
        return self._features.get(image_id)

    def _level(self, key: tuple[int, int], distance: float, by_distance: float) -> Judged:
        return self.verdict(distance, by_distance, *(self._features.get(i) for i in key))

    def verdict(self, distance: float, by_distance: float, mine: Features | None, theirs: Features | None) -> Judged:
        """The verdict on a pair of its distance (scored ``by_distance``) and its two images' features."""
        if self.spec is None or mine is None or theirs is None:
            level = "near" if by_distance >= NEAR_SCORE else "similar" if by_distance >= SIMILAR_SCORE else None
            return Judged(level, distance, by_distance)
        verdict = verify(mine[0], mine[1], theirs[0], theirs[1])
        score = float(self.model.scores(np.array([distance]), np.array([verdict.inliers]))[0])
        if verdict.inliers >= Verify.MIN_INLIERS and verdict.homography is not None:
            inside = max(contained(verdict.homography, mine[2], theirs[2]),
                         contained(np.linalg.inv(verdict.homography), theirs[2], mine[2]))
            level = "near" if score >= NEAR_SCORE and inside >= CONTAINED else "similar"
        else:  # (features that do not match: a different picture, unless its descriptor says the same scene)
            level = "similar" if by_distance >= NEAR_SCORE else None
        return Judged(level, distance, score, verdict.inliers)

    def judge_again(self, a: int, b: int) -> Judged:
        """The verdict on a pair no run kept (two members of a would-be group)."""
        found = self.vectors([a, b])
        if a not in found or b not in found:
            return Judged(None, float("inf"), 0.0)
        return self.judge({(a, b): float(np.linalg.norm(found[a] - found[b]))})[(a, b)]


def find(catalog: Catalog, name: str, *, level: str | None = None, k: int = K, update: bool = True,
         limit: int | None = None, offset: int = 0, on_progress: ProgressCallback | None = None,
         on_status: StatusCallback | None = None) -> DuplicatesReport:
    """Index ``name``'s groups of ``level`` (every level: None), ``limit`` of them from the
    ``offset``-th (every one: None); with ``update``, after judging the neighbours of the images no
    run has compared yet (the index learns its scores first where it has not) and making the groups
    again."""
    started = time.perf_counter()
    if level is not None and level not in dup.LEVELS:
        raise ImgdbError(f"unknown level {level[:20]!r}: use {', '.join(dup.LEVELS)}")
    if not 1 <= k <= MAX_K:
        raise ImgdbError(f"k must be between 1 and {MAX_K}, not {k}")
    if (limit is not None and limit < 0) or offset < 0:
        raise ImgdbError(f"limit and offset must be 0 or more, not {limit} and {offset}")
    index = catalog.layer.record(name) or catalog.index(name)
    report = DuplicatesReport(index.name)
    if update and level is None and Calibration.of(index.score_state) is None:
        with catalog.database.connect() as conn:
            held = vectors.count(conn, index)
        if held < MIN_IMAGES:  # (exact duplicates need no scores: they are listed all the same)
            update = False
            if on_status:
                on_status(f"{index.name!r} holds {held} images, too few to learn its scores from "
                          f"({MIN_IMAGES}): exact duplicates only")
    if update and level != "exact":
        index = _with_scores(catalog, index, on_progress, on_status)
        _update(catalog, index, k, report, on_progress, on_status)
    with catalog.database.connect() as conn:
        report.groups = dup.groups(conn, index, level, limit=limit, offset=offset)
        report.total = dup.count_groups(conn, index, level)
    report.seconds = time.perf_counter() - started
    return report


def _with_scores(catalog: Catalog, index: IndexRecord, on_progress: ProgressCallback | None,
                 on_status: StatusCallback | None) -> IndexRecord:
    """``index`` as queries see it, its scores learned first where it has not learned them."""
    if Calibration.of(index.score_state) is None:
        calibrate(catalog, index, on_progress=on_progress, on_status=on_status)
        index = catalog.layer.record(index.name) or index
    return index


def refresh(catalog: Catalog, name: str, on_status: StatusCallback | None = None) -> None:
    """Bring an index's groups up to date after it changed (``imgdb sync``), where duplicates were
    ever asked of it: nothing for an index nobody asked."""
    index = catalog.layer.record(name) or catalog.index(name)
    with catalog.database.connect() as conn:
        asked = dup.ever_compared(conn, index)
    if asked and Calibration.of(index.score_state) is not None:
        _update(catalog, index, K, DuplicatesReport(index.name), None, on_status)


def _update(catalog: Catalog, index: IndexRecord, k: int, report: DuplicatesReport,
            on_progress: ProgressCallback | None, on_status: StatusCallback | None) -> None:
    """Judge the neighbours of the images no run has compared yet, then make the groups again."""
    model = Calibration.of(index.score_state)
    assert model is not None
    judge = Judge(catalog, index, model)
    with catalog.database.connect() as conn:
        todo = dup.unchecked(conn, index)
    if on_status and todo:
        on_status(f"comparing {len(todo)} images of {index.name!r} with their {k} nearest")
    contents = Contents(catalog, index, judge)
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        found = judge.vectors(chunk)
        candidates: dict[tuple[int, int], float] = {}
        for image_id in chunk:
            if image_id not in found:
                continue
            for hit in contents.nearest(found[image_id], k + 1):
                if hit.id != image_id:
                    candidates.setdefault((min(image_id, hit.id), max(image_id, hit.id)), hit.distance)
        candidates |= {key: d for key, d in contents.candidates([i for i in chunk if i in found], k + 1).items()
                       if key not in candidates}
        verdicts = judge.judge(candidates)
        with catalog.database.engine.begin() as conn:
            dup.record(conn, index, chunk, verdicts)
        report.checked += len(chunk)
        report.pairs += sum(1 for v in verdicts.values() if v.level is not None)
        judge.forget()
        if on_progress:
            on_progress(min(start + CHUNK, len(todo)), len(todo))
    if contents.unread and on_status:
        first = contents.unread[0]
        on_status(f"{len(contents.unread)} framed images could not be read again (first: {first.path}: {first.error})")
    with catalog.database.engine.begin() as conn:
        kept = dup.pairs(conn, index)
        sizes = dup.sizes(conn, sorted({i for key in kept for i in key}))
        dup.replace_groups(conn, index, [m for level in dup.JUDGED for m in group(kept, level, sizes, judge)])


def content_box(features: Features) -> tuple[float, float, float, float] | None:
    """The box (left, top, right, bottom, as shares of the frame) that an image's local features
    cover, where the image is framed (the box is under :data:`FRAMED` of the frame); else None."""
    xy, _, (width, height) = features
    if len(xy) < BOX_FEATURES or width <= 0 or height <= 0:
        return None
    low, high = np.quantile(xy, [0.02, 0.98], axis=0)
    if (high[0] - low[0]) * (high[1] - low[1]) >= FRAMED * width * height:
        return None
    left, top = xy.min(axis=0)
    right, bottom = xy.max(axis=0)
    return (max(0.0, left / width), max(0.0, top / height), min(1.0, right / width), min(1.0, bottom / height))


class Contents:
    """Where the index keeps local features, the framed images' *contents*: each framed image of a
    chunk is read again, what its features cover is cut out and described as the index describes an
    image, and its nearest are candidates too (a picture pasted small into a plain frame is among the
    nearest of its picture only so). Images that cannot be read again are looked for by their whole
    frame only (:attr:`unread`)."""

    def __init__(self, catalog: Catalog, index: IndexRecord, judge: Judge) -> None:
        self.catalog, self.index, self.judge = catalog, index, judge
        self._ingester: Ingester | None = None
        #: Framed images that could not be read again, with the reason.
        self.unread: list[Failure] = []

    def nearest(self, vector: np.ndarray, k: int) -> list[sql.Hit]:
        """The ``k`` nearest of a vector, through the index's own first stage, exactly re-ranked."""
        return self.catalog.database.searching(lambda conn: plan.search(
            self.catalog.layer, conn, self.index, vector, k, rerank="exact"))

    def candidates(self, ids: Sequence[int], k: int) -> dict[tuple[int, int], float]:
        """The pairs of each framed image of ``ids`` and the ``k`` nearest of its content, each at the
        distance of the two images' stored vectors (the evidence the scores learned from)."""
        if self.judge.spec is None:
            return {}
        boxes = {i: box for i in ids if (f := self.judge.features(i)) is not None and (box := content_box(f)) is not None}
        if not boxes:
            return {}
        if self._ingester is None:
            self._ingester = Ingester(self.catalog, self.index)
        extractor, report = self._ingester.extractor, IngestReport(failed=self.unread)
        with self.catalog.database.connect() as conn:
            held = images.of_index(conn, self.index, list(boxes))
        found: dict[tuple[int, int], float] = {}
        for batch in read_back(self._ingester, held, report, None, prepare=lambda pixels: pixels,
                               outcome="its picture is looked for by its whole frame only"):
            crops = [extractor.prepare(_cut(loaded.prepared, boxes[row.image_id])) for row, loaded in batch]
            for (row, _), vector in zip(batch, extractor.embed(crops)):
                hits = [hit.id for hit in self.nearest(vector, k) if hit.id != row.image_id]
                stored = self.judge.vectors([row.image_id, *hits])
                for other in hits:
                    if row.image_id in stored and other in stored:
                        found[(min(row.image_id, other), max(row.image_id, other))] = float(
                            np.linalg.norm(stored[row.image_id] - stored[other]))
        return found


def _cut(pixels: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """The part of an image that ``box`` (shares of its frame) covers."""
    left, top, right, bottom = box
    width, height = pixels.size
    return pixels.crop((int(left * width), int(top * height), max(int(left * width) + 1, round(right * width)),
                        max(int(top * height) + 1, round(bottom * height))))


def screen_for(catalog: Catalog, name: str, mode: str, on_status: StatusCallback | None = None) -> NearDuplicateScreen:
    """The screen of ``imgdb ingest --near-duplicates MODE`` into index ``name``, which learns its
    scores first where it has not."""
    index = catalog.layer.record(name) or catalog.index(name)
    NearDuplicateScreen.refuse_unsafe(index, mode)
    return NearDuplicateScreen(catalog, _with_scores(catalog, index, None, on_status), mode)


class NearDuplicateScreen:
    """``imgdb ingest --near-duplicates skip|link``: before a batch is written, each image is judged
    against its nearest in the index (and the images before it in the batch), as the duplicates job
    judges a pair; one that is the same picture as another is left out (``skip``), or written and
    kept as a near pair (``link``: it joins its match's group at the next run)."""

    MODES = ("skip", "link")
    #: Nearest images an incoming image is judged against.
    NEAREST = 5

    def __init__(self, catalog: Catalog, index: IndexRecord, mode: str) -> None:
        record = catalog.layer.record(index.name) or index  # (with its scores, which a writer's record lacks)
        self.refuse_unsafe(record, mode)
        model = Calibration.of(record.score_state)
        if model is None:
            raise ImgdbError(f"index {index.name!r} has not learned its scores yet: run `imgdb index calibrate "
                             f"{index.name}` (it needs {MIN_IMAGES} images)")
        self.catalog, self.index, self.mode = catalog, record, mode
        self.judge = Judge(catalog, record, model)

    @classmethod
    def refuse_unsafe(cls, index: IndexRecord, mode: str) -> None:
        """``skip`` only where local features judge: measured, in a 40-image index the descriptor
        alone scored a different painting 0.65, and skip would have lost it."""
        if mode not in cls.MODES:
            raise ImgdbError(f"--near-duplicates takes {' or '.join(cls.MODES)}, not {mode[:20]!r}")
        if mode == "skip" and index.local is None:
            raise ImgdbError(f"index {index.name!r} keeps no local features, and the descriptor alone can take a "
                             f"different picture for the same one: skip would lose it. Run `imgdb index verify "
                             f"{index.name}` first, or use --near-duplicates link (everything goes in)")

    @property
    def skip(self) -> bool:
        return self.mode == "skip"

    def check(self, batch: Sequence[Prepared], vectors: np.ndarray) -> list[NearDuplicate | None]:
        """Per image of the batch, the image it is the same picture as, if any."""
        spec, found = self.judge.spec, []
        for i, (item, vector) in enumerate(zip(batch, vectors)):
            hits = self.catalog.database.searching(lambda conn: plan.search(  # noqa: B023 - called at once
                self.catalog.layer, conn, self.index, vector, self.NEAREST, rerank="exact"))
            earlier = [(None, batch[j].uri, float(np.linalg.norm(vector - vectors[j])), j) for j in range(i)
                       if not (self.skip and found[j] is not None)]
            candidates = sorted([(hit.id, hit.uri, hit.distance, None) for hit in hits] + earlier, key=lambda c: c[2])
            mine = None if spec is None else features_of(item, spec)
            match = None
            for other, uri, distance, j in candidates:
                by_distance = float(self.judge.model.scores(np.array([distance]))[0])
                if by_distance < FLOOR:
                    break
                theirs = None if spec is None else (self.judge.features(other) if j is None else features_of(batch[j], spec))
                verdict = self.judge.verdict(distance, by_distance, mine, theirs)
                if verdict.level == "near":
                    match = NearDuplicate(item.uri, other, uri, distance, verdict.score, verdict.inliers,
                                          "skipped" if self.skip else "linked")
                    break
            found.append(match)
        self.judge.forget()
        return found

    def link(self, conn: Connection, batch: Sequence[Prepared], ids: Sequence[int],
             found: Sequence[NearDuplicate | None]) -> None:
        """Keep the near pairs of a written batch (``link``), in ``conn``'s transaction."""
        by_uri = {item.uri: image_id for item, image_id in zip(batch, ids)}
        pairs = {}
        for image_id, near in zip(ids, found):
            if near is None:
                continue
            other = near.match if near.match is not None else by_uri.get(near.match_uri)
            if other is not None and other != image_id:
                pairs[(min(image_id, other), max(image_id, other))] = Judged("near", near.distance, near.score,
                                                                               near.inliers)
        dup.record(conn, self.index, [], pairs)


@dataclass
class Resolution:
    """What :func:`resolve` did to a group."""

    group: int
    level: str
    kept: int
    deleted: list[int] = field(default_factory=list)
    merged: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "level": self.level, "kept": self.kept, "deleted": self.deleted,
                "merged": self.merged}


def resolve(catalog: Catalog, name: str, group: int, *, keep: int, level: str = "near", delete_others: bool = False,
            merge_metadata: bool = False) -> Resolution:
    """Settle one group: keep image ``keep``; with ``merge_metadata``, it takes the metadata keys the
    others have and it lacks; with ``delete_others``, the others are deleted (from the database,
    every index included; never images that rows of attached tables hold: those rows are the
    application's to delete); the group's images never group together again."""
    if level not in dup.JUDGED:
        raise ImgdbError(f"only a near or similar group can be resolved, not {level[:20]!r}: an exact group is one "
                         "image at several paths or rows (delete the files or rows you do not want)")
    index = catalog.index(name)
    with catalog.database.engine.begin() as conn:
        ids = dup.members(conn, index, level, group)
        if not ids:
            raise ImgdbError(f"no {level} group {group} in index {name!r}: run `imgdb duplicates --index {name}`")
        if keep not in ids:
            raise ImgdbError(f"image {keep} is not in {level} group {group} (its images: "
                             f"{', '.join(map(str, ids[:10]))}{' ...' if len(ids) > 10 else ''})")
        others = [i for i in ids if i != keep]
        if delete_others and (tables := dup.held_by_rows(conn, others)):
            raise ImgdbError(f"rows of {', '.join(tables)} hold images of group {group}: delete those rows in "
                             "the application (imgdb sync follows), or resolve without deleting")
        if merge_metadata:
            dup.merge_metadata(conn, keep, others)
        dup.resolve(conn, index, level, group)
        if delete_others:
            images.delete(conn, others)
    return Resolution(group, level, keep, others if delete_others else [], merge_metadata)


def group(pairs: dict[tuple[int, int], Judged], level: str, sizes: dict[int, tuple[int, int]],
          judge: Judge) -> list[dict[str, Any]]:
    """The groups of ``level`` that ``pairs`` make, as rows of ``duplicate_members``. Seeds in order
    of how many images they match (then pixels, then age) each take, best score first, the images
    that match the seed and every member so far; a ``near`` group also reaches the images matching
    any of its members (a picture pasted small into a frame may be among the nearest of one copy
    and not of another), each still judged against every member, so that it never chains. The
    group's representative is its image with the most pixels (then the oldest), and each member's
    evidence is its pair with the representative."""
    edges: dict[int, dict[int, Judged]] = defaultdict(dict)
    for (a, b), found in pairs.items():
        if found.level == level and not found.resolved:
            edges[a][b] = edges[b][a] = found
    matching = ("near", "similar") if level == "similar" else ("near",)

    def verdict(a: int, b: int) -> Judged:
        key = (min(a, b), max(a, b))
        if key not in pairs:
            pairs[key] = judge.judge_again(*key)
        return pairs[key]

    def largest(image_id: int) -> tuple[int, int]:
        width, height = sizes.get(image_id, (0, 0))
        return -width * height, image_id

    def by_score(found: dict[int, Judged]) -> list[int]:
        return [other for other, _ in sorted(found.items(), key=lambda item: (-item[1].score, item[0]))]

    taken: set[int] = set()
    rows: list[dict[str, Any]] = []
    for seed in sorted(edges, key=lambda i: (-len(edges[i]), *largest(i))):
        if seed in taken:
            continue
        members, reached = [seed], by_score(edges[seed])
        seen = {seed, *reached}
        for other in reached:  # (grows as near members bring their own matches)
            if other in taken or not all(verdict(m, other).level in matching and not verdict(m, other).resolved
                                         for m in members):
                continue
            members.append(other)
            if level == "near":
                reached += [i for i in by_score(edges[other]) if i not in seen]
                seen.update(reached)
        judge.forget()  # (the features of a group's pairs: a few hundred KB an image)
        if len(members) < 2:
            continue
        taken.update(members)
        representative = min(members, key=largest)
        rows.append({"level": level, "group_id": representative, "image_id": representative, "distance": 0.0,
                     "score": 1.0, "inliers": None})
        for member in members:
            if member != representative:
                evidence = verdict(representative, member)
                rows.append({"level": level, "group_id": representative, "image_id": member,
                             "distance": evidence.distance, "score": evidence.score, "inliers": evidence.inliers})
    return rows
