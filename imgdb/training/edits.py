"""Edits that keep the picture: what turns one image into its near duplicates.

A calibration (:mod:`imgdb.jobs.calibrate`) needs pairs it knows to be *the same picture*; they are
made here from one image, each a thing that happens to pictures as they are copied around: saved
again at a lower JPEG quality, scaled down, cropped, turned by a quarter, its colours or brightness
changed, a caption or watermark band laid over it, or pasted smaller into a larger frame (a
screenshot, a page, a post). Each edit's strength is drawn from the given generator, so that what an
index learns covers a family of edits, not one setting of each. OpenCV/numpy on uint8 RGB arrays,
as :mod:`imgdb.training.augment`.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Edit = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _reencode(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(25, 70))
    ok, data = cv2.imencode(".jpg", pixels[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1] if ok else pixels


def _resize(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = pixels.shape[:2]
    factor = rng.uniform(0.3, 0.7)
    return cv2.resize(pixels, (max(8, int(w * factor)), max(8, int(h * factor))), interpolation=cv2.INTER_AREA)


def _crop(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keeps 60-90% of each side, anywhere in the picture."""
    h, w = pixels.shape[:2]
    keep_h, keep_w = int(h * rng.uniform(0.6, 0.9)), int(w * rng.uniform(0.6, 0.9))
    top, left = int(rng.integers(0, h - keep_h + 1)), int(rng.integers(0, w - keep_w + 1))
    return pixels[top:top + keep_h, left:left + keep_w].copy()


def _rotate(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(pixels, int(rng.integers(1, 4))))


def _colour(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness and saturation changed (a filter, an exposure fix)."""
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[:, :, 1] *= rng.uniform(0.4, 1.5)
    hsv[:, :, 2] *= rng.uniform(0.7, 1.35)
    return cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)


def _caption(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A band of 8-15% of the height across the top or the bottom, with a line of text on it."""
    out = pixels.copy()
    h, w = out.shape[:2]
    band = max(10, int(h * rng.uniform(0.08, 0.15)))
    top = 0 if rng.random() < 0.5 else h - band
    shade = int(rng.choice([0, 255]))
    out[top:top + band] = shade
    scale = band / 40
    cv2.putText(out, "(c) all rights reserved - imgdb", (band // 3, top + band * 2 // 3), cv2.FONT_HERSHEY_SIMPLEX,
                scale, (255 - shade,) * 3, max(1, int(scale * 2)), cv2.LINE_AA)
    return out


def _inset(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The picture shrunk to 40-80% and pasted into a frame 1.3-2 times its size, off centre."""
    h, w = pixels.shape[:2]
    grow, shrink = rng.uniform(1.3, 2.0), rng.uniform(0.4, 0.8)
    frame = np.empty((int(h * grow), int(w * grow), 3), np.uint8)
    frame[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    small = cv2.resize(pixels, (max(8, int(w * shrink)), max(8, int(h * shrink))), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    top, left = int(rng.integers(0, frame.shape[0] - sh + 1)), int(rng.integers(0, frame.shape[1] - sw + 1))
    frame[top:top + sh, left:left + sw] = small
    return frame


#: Every edit that keeps the picture, by name.
EDITS: dict[str, Edit] = {"reencode": _reencode, "resize": _resize, "crop": _crop, "rotate": _rotate,
                          "colour": _colour, "caption": _caption, "inset": _inset}


def near_copies(pixels: np.ndarray, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """One copy of an ``(H, W, 3)`` uint8 RGB image per edit in :data:`EDITS`, each with its name."""
    return [(name, edit(pixels, rng)) for name, edit in EDITS.items()]
