"""``imgdb explain QUERY ID``: a picture of why a hit verified (or did not): the query and the hit
side by side in their detection frames, a line for each inlier of the fitted homography."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from imgdb.catalog import Catalog
from imgdb.db import local_features
from imgdb.errors import ImgdbError
from imgdb.features import keypoints
from imgdb.features.local import grey
from imgdb.io.reader import decode
from imgdb.jobs.originals import original
from imgdb.jobs.search import Query, encode
from imgdb.query.verify import Verdict, Verify, verify


#: Height both images are drawn at.
HEIGHT = 480


@dataclass(frozen=True)
class Explanation:
    png: bytes
    inliers: int
    verified: bool


def explain(catalog: Catalog, query: Query, image_id: int, index: str) -> Explanation:
    """The inlier matches between ``query`` and stored image ``image_id`` of ``index``."""
    target = catalog.index(index)
    if target.local is None:
        raise ImgdbError(f"index {index!r} keeps no local features: run `imgdb index verify {index}` first")
    spec = keypoints.parse_keypoints(target.local)
    _, image = encode(catalog, target, query)
    pixels = image.pixels if image.pixels is not None else (
        _stored_pixels(catalog, image.image_id, spec) if image.image_id is not None else None)
    if pixels is None:
        raise ImgdbError("a vector has no picture to explain: give an image, a URL or id:N")
    found = catalog.database.searching(lambda conn: local_features.read(conn, str(spec), spec.dim, [image_id]))
    if image_id not in found:
        raise ImgdbError(f"image {image_id} has no stored local features in index {index!r}")
    scale, xy, codes = found[image_id]
    mine = spec.extract(pixels)
    verdict = verify(mine.xy, mine.descriptors, xy, keypoints.descriptors(keypoints.QuantizedFeatures(scale, xy, codes), spec))
    picture = draw(pixels, mine.xy, _stored_pixels(catalog, image_id, spec), xy, verdict, spec.side)
    return Explanation(picture, verdict.inliers, verdict.inliers >= Verify.MIN_INLIERS)


def _stored_pixels(catalog: Catalog, image_id: int, spec: keypoints.KeypointSpec) -> Image.Image:
    return decode(original(catalog, image_id).data, limits=catalog.settings.decoding, scale_hint=spec.scale_hint).pixels


def draw(query: Image.Image, query_xy: np.ndarray, hit: Image.Image, hit_xy: np.ndarray, verdict: Verdict,
         side: int) -> bytes:
    """Both images in their detection frames, scaled to HEIGHT, side by side; inlier lines."""
    panels, scales = [], []
    for image in (query, hit):
        frame = np.asarray(image.convert("RGB").resize(grey(image, side).shape[::-1], Image.Resampling.BILINEAR))
        factor = HEIGHT / frame.shape[0]
        panels.append(cv2.resize(frame, (max(1, round(frame.shape[1] * factor)), HEIGHT), interpolation=cv2.INTER_AREA))
        scales.append(factor)
    canvas = np.concatenate(panels, axis=1).copy()
    offset = panels[0].shape[1]
    for q, h in verdict.pairs.tolist():
        a = (round(query_xy[q, 0] * scales[0]), round(query_xy[q, 1] * scales[0]))
        b = (round(hit_xy[h, 0] * scales[1]) + offset, round(hit_xy[h, 1] * scales[1]))
        cv2.line(canvas, a, b, (40, 200, 60), 1, cv2.LINE_AA)
        cv2.circle(canvas, a, 3, (40, 200, 60), 1, cv2.LINE_AA)
        cv2.circle(canvas, b, 3, (40, 200, 60), 1, cv2.LINE_AA)
    label = f"{verdict.inliers} inliers" + (" - verified" if verdict.inliers >= Verify.MIN_INLIERS else " - not verified")
    cv2.putText(canvas, label, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 3, cv2.LINE_AA)
    cv2.putText(canvas, label, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (20, 20, 20), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImgdbError("could not encode the picture")
    return png.tobytes()
