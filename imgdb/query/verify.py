"""Spatial verification (Philbin et al. 2007): does a candidate show the query's object?

The query's local descriptors are matched to each candidate's by Lowe's ratio test, kept one to one
(each candidate keypoint serves its best query keypoint only), and a homography is fitted to the
tentative matches by OpenCV's MAGSAC++ (USAC). The inliers of a plausible fit count: a picture
photographed at an angle is a homography of its reproduction; unrelated images leave a handful of
chance matches that no single homography explains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from imgdb import lazy
from imgdb.db.records import IndexRecord
from imgdb.errors import ImgdbError
from imgdb.features import keypoints
from imgdb.query.parts import FirstStage, Probe, Ranking, Reranker

# Loaded when a query verifies: the CLI reads this module's help at start-up, and a search that does
# not verify needs neither OpenCV nor the writers' SQLAlchemy.
if TYPE_CHECKING:
    import cv2

    from imgdb.db import local_features
else:
    cv2, local_features = lazy.module("cv2"), lazy.module("imgdb.db.local_features")

#: Lowe's ratio: a match whose second-best is nearly as near is ambiguous.
RATIO = 0.8
#: Fewer tentative matches than this and no fit is tried (a homography needs 4; chance fits need few).
MIN_MATCHES = 8
#: RANSAC's reprojection threshold, in detection-frame pixels (images shrunk to 640 px by default).
THRESHOLD = 8.0
#: A fit whose area scale is outside this range (or mirrors) is a degenerate chance fit.
SCALE_RANGE = (1 / 64, 64.0)


@dataclass(frozen=True)
class Verdict:
    inliers: int
    #: Pairs ``(query keypoint, candidate keypoint)`` of the inliers, for pictures of the matches.
    pairs: np.ndarray
    homography: np.ndarray | None


NO_MATCH = Verdict(0, np.empty((0, 2), np.int64), None)


def tentative_matches(query: np.ndarray, candidate: np.ndarray, ratio: float = RATIO) -> np.ndarray:
    """``(m, 2)`` pairs ``(query row, candidate row)`` that pass the ratio test, one to one."""
    if len(query) == 0 or len(candidate) < 2:
        return np.empty((0, 2), np.int64)
    # Squared distances by one matrix product (|q|² + |c|² - 2 q·c).
    d2 = (np.einsum("ij,ij->i", query, query)[:, None] + np.einsum("ij,ij->i", candidate, candidate)[None, :]
          - 2.0 * query @ candidate.T)
    two = np.argpartition(d2, 1, axis=1)[:, :2]
    rows = np.arange(len(query))
    first, second = d2[rows, two[:, 0]], d2[rows, two[:, 1]]
    best = np.where(first <= second, two[:, 0], two[:, 1])
    nearest, runner_up = np.minimum(first, second), np.maximum(first, second)
    good = np.maximum(nearest, 0.0) < (ratio**2) * np.maximum(runner_up, 0.0)
    pairs = np.stack([rows[good], best[good]], axis=1)
    # One to one: where several query keypoints chose the same candidate keypoint, keep the nearest.
    order = np.argsort(nearest[good], kind="stable")
    _, first_use = np.unique(pairs[order, 1], return_index=True)
    return pairs[order[np.sort(first_use)]]


def verify(query_xy: np.ndarray, query_descriptors: np.ndarray, xy: np.ndarray, descriptors: np.ndarray,
           threshold: float = THRESHOLD) -> Verdict:
    """The inliers of the best homography between the query's keypoints and a candidate's."""
    pairs = tentative_matches(query_descriptors, descriptors)
    if len(pairs) < MIN_MATCHES:
        return NO_MATCH
    source = query_xy[pairs[:, 0]].reshape(-1, 1, 2)
    target = xy[pairs[:, 1]].reshape(-1, 1, 2)
    homography, mask = cv2.findHomography(source, target, cv2.USAC_MAGSAC, threshold, maxIters=2000,
                                          confidence=0.999)
    if homography is None or mask is None or not plausible(homography):
        return NO_MATCH
    keep = mask.ravel().astype(bool)
    return Verdict(int(keep.sum()), pairs[keep], homography)


def plausible(homography: np.ndarray) -> bool:
    """Whether a fitted homography can be a photo of a picture: orientation kept, area scaled within
    SCALE_RANGE (its affine part's determinant)."""
    det = float(np.linalg.det(homography[:2, :2]))
    return SCALE_RANGE[0] < det < SCALE_RANGE[1]


class Verify(Reranker):
    """Spatial verification of the candidates (:func:`verify`) against the local features the
    index stores (``imgdb index verify``): verified hits first, by inliers, then the
    rest in the order they came; every hit says how many inliers it has and whether it verified."""

    name = "verify"
    summary = "spatial verification of the top 100 by stored local features (`imgdb index verify`)"
    #: Candidates verified by default: the first stage's top 100 (about 0.2 s a query on two cores,
    #: benchmarks/rerank.py).
    CANDIDATES = 100
    #: Inliers a candidate needs to count as the query's picture. Calibrated by benchmarks/rerank.py
    #: on the museum photos: a painting absent from the gallery gave at most 7 inliers to any of its
    #: 100 candidates (30 photos), a present one a median of 142; 12 keeps a margin over chance fits
    #: and loses no present painting that a lower threshold would keep but one.
    MIN_INLIERS = 12

    def check(self, index: IndexRecord, stage: FirstStage) -> None:
        if index.local is None:
            raise ImgdbError(f"index {index.name!r} keeps no local features to verify with: "
                             f"run `imgdb index verify {index.name}` first")

    def candidates(self, k: int, stage: FirstStage) -> int:
        return max(k, self.CANDIDATES)

    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking:
        inliers = np.array([v.inliers for v in self.verdicts(probe, ranking)[0]], np.int64)
        verified = inliers >= self.MIN_INLIERS
        # Verified first by inliers (ties keep the incoming order), then the rest as they came.
        order = np.lexsort((np.arange(len(inliers)), np.where(verified, -inliers, 0), ~verified))
        notes = {image_id: {**ranking.notes.get(image_id, {}), "inliers": int(inliers[i]), "verified": bool(verified[i])}
                 for i, image_id in enumerate(ranking.ids.tolist())}
        return Ranking(ranking.ids[order], ranking.distances[order], notes)

    def verdicts(self, probe: Probe, ranking: Ranking, keep: np.ndarray | None = None,
                 only: set[int] | None = None) -> tuple[list[Verdict], tuple[np.ndarray, np.ndarray] | None]:
        """Each candidate's verdict (``NO_MATCH`` where it has no stored features, or is not in
        ``only``), against the query's keypoints (those ``keep`` marks), and the query's keypoints."""
        spec = keypoints.parse_keypoints(probe.index.local or "")
        query = self.query_features(probe, spec)
        if query is None:
            return [NO_MATCH] * len(ranking.ids), None
        xy, descriptors = query if keep is None else (query[0][keep], query[1][keep])
        wanted = [i for i in ranking.ids.tolist() if only is None or i in only]
        stored = local_features.read(probe.conn, str(spec), spec.dim, wanted)
        found = []
        for image_id in ranking.ids.tolist():
            row = stored.get(image_id)
            found.append(NO_MATCH if row is None else
                         verify(xy, descriptors, row[1], keypoints.descriptors(keypoints.QuantizedFeatures(*row), spec)))
        return found, query

    @staticmethod
    def query_features(probe: Probe, spec: keypoints.KeypointSpec) -> tuple[np.ndarray, np.ndarray] | None:
        """The query's keypoints and descriptors: extracted from its pixels once per query (kept
        on the probe's image for the next part), or read back for a stored image; None for a query
        by vector, which has no image to verify."""
        if probe.image.pixels is not None:
            found = probe.image.cached(str(spec), lambda: spec.extract(probe.image.pixels))
            return found.xy, found.descriptors
        if probe.image.image_id is not None:
            row = local_features.read(probe.conn, str(spec), spec.dim, [probe.image.image_id]).get(probe.image.image_id)
            if row is not None:
                return row[1], keypoints.descriptors(keypoints.QuantizedFeatures(*row), spec)
        return None


class MultiVerify(Verify):
    """Every gallery picture a photo shows (``multi``): the best verified candidate is one object;
    the query keypoints its inliers explain are set aside and the other candidates that verified are
    verified again against the rest, until none verifies. Objects come first, in the order found,
    each noted with its ``object`` number; the rest follow as they came, unverified."""

    name = "multi"
    summary = "every gallery picture the photo shows (verification, object by object)"
    #: Most pictures one photo is searched for.
    MAX_OBJECTS = 8

    def rerank(self, probe: Probe, ranking: Ranking) -> Ranking:
        verdicts, query = self.verdicts(probe, ranking)
        ids = ranking.ids.tolist()
        first = {image_id: v.inliers for image_id, v in zip(ids, verdicts)}
        keep = None if query is None else np.ones(len(query[0]), bool)
        objects: list[tuple[int, int]] = []  # (image id, inliers) in the order found
        while verdicts and len(objects) < self.MAX_OBJECTS:
            best = max(range(len(ids)), key=lambda i: verdicts[i].inliers)
            if verdicts[best].inliers < self.MIN_INLIERS:
                break
            objects.append((ids[best], verdicts[best].inliers))
            # The kept keypoints the object's inliers used, as positions among all the query's.
            explained = np.flatnonzero(keep)[verdicts[best].pairs[:, 0]]
            keep[explained] = False
            left = {image_id for image_id, v in zip(ids, verdicts) if v.inliers >= self.MIN_INLIERS} - {o for o, _ in objects}
            verdicts = self.verdicts(probe, ranking, keep, left)[0] if left and keep.any() else []
        found = {image_id: number for number, (image_id, _) in enumerate(objects, start=1)}
        inliers = dict(objects)
        order = [ids.index(image_id) for image_id, _ in objects] + [i for i, image_id in enumerate(ids) if image_id not in found]
        notes = {image_id: {**ranking.notes.get(image_id, {}), "inliers": inliers.get(image_id, first[image_id]),
                            "verified": image_id in found, **({"object": found[image_id]} if image_id in found else {})}
                 for image_id in ids}
        return Ranking(ranking.ids[order], ranking.distances[order], notes)
