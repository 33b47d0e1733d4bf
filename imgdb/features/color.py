"""HSV colour histogram: the classic global colour descriptor.

A joint 3-D histogram over hue, saturation and value, normalised by the pixel count and square-rooted
(Hellinger mapping), so that the L2 distance the index computes between unit vectors behaves like the
Hellinger/Bhattacharyya distance between histograms instead of over-weighting the few dominant bins.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.features.base import ExtractorContext, PerImageExtractor
from imgdb.features.spec import Spec, reject_leftovers, take_int

DEFAULT_BINS = (8, 12, 3)
_RANGES = [0, 180, 0, 256, 0, 256]  # OpenCV's 8-bit HSV: hue is halved to fit 0..179


class ColorHistogram(PerImageExtractor):
    family = "color"
    batch_size = 64

    def __init__(self, bins: tuple[int, int, int], size: int) -> None:
        self.bins = bins
        self.size = size
        self.dim = int(np.prod(bins))
        self.spec = f"color:hsv/bins={'x'.join(map(str, bins))}/size={size}"

    @classmethod
    def from_spec(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> ColorHistogram:
        if spec.arg not in (None, "hsv"):
            raise ExtractorSpecError(f"colour space {spec.arg!r} is not supported (use color:hsv)")
        options = dict(spec.options)
        raw_bins = options.pop("bins", None)
        bins = DEFAULT_BINS
        if raw_bins is not None:
            try:
                parsed = tuple(int(b) for b in raw_bins.split("x"))
            except ValueError:
                parsed = ()
            if len(parsed) != 3 or min(parsed) < 1 or int(np.prod(parsed)) > 4000:
                raise ExtractorSpecError(f"bins={raw_bins!r}: expected HxSxV, e.g. 8x12x3, at most 4000 bins")
            bins = parsed  # type: ignore[assignment]
        size = take_int(options, "size", 256, minimum=16)
        reject_leftovers(spec, options, list(spec.words))
        return cls(bins, size)

    @classmethod
    def variants(cls) -> list[tuple[str, str, str]]:
        return [("color", "color:hsv", "joint HSV colour histogram (Hellinger-mapped); fast, weak on photos")]

    def scale_hint(self, width: int, height: int) -> float:
        return self.size / max(width, height)

    def prepare(self, image: Image.Image) -> np.ndarray:
        # Colour statistics barely change with resolution; a small copy makes the histogram cheap.
        image = image.copy()
        image.thumbnail((self.size, self.size), Image.Resampling.BILINEAR)
        hsv = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, list(self.bins), _RANGES).ravel()
        return np.sqrt(hist / max(hist.sum(), 1.0)).astype(np.float32)
