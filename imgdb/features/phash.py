"""Perceptual hash (pHash): the signs of an image's lowest spatial frequencies.

The grey image is shrunk to 32×32, transformed by a DCT, and the 8×8 lowest-frequency coefficients
(DC term left out of the median) are compared with their median: 64 bits that survive re-encoding,
rescaling and mild colour changes. Stored as ±1/8 per bit, the vector is unit length and its L2
distance to another hash is 2·√(Hamming/64): ranking by ``<->`` is ranking by Hamming distance.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.features.base import ExtractorContext, PerImageExtractor
from imgdb.features.spec import Spec, reject_leftovers, take_int


class PerceptualHash(PerImageExtractor):
    family = "phash"
    batch_size = 64

    def __init__(self, bits: int) -> None:
        self.bits = bits  # per side: bits² in all
        self.dim = bits * bits
        self.spec = f"phash:dct/bits={bits}"

    @classmethod
    def from_spec(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> PerceptualHash:
        if spec.arg not in (None, "dct"):
            raise ExtractorSpecError(f"phash: unknown variant {spec.arg!r} (use phash:dct)")
        options = dict(spec.options)
        bits = take_int(options, "bits", 8, minimum=4)
        if bits > 16:
            raise ExtractorSpecError("phash: bits is the side of the low-frequency block, at most 16")
        reject_leftovers(spec, options, list(spec.words))
        return cls(bits)

    @classmethod
    def variants(cls) -> list[tuple[str, str, str]]:
        return [("phash", "phash", "perceptual hash: signs of the 8x8 lowest DCT frequencies (64 bits)")]

    def scale_hint(self, width: int, height: int) -> float:
        return 4 * self.bits / min(width, height)

    def prepare(self, image: Image.Image) -> np.ndarray:
        # Lanczos, as the common pHash implementations shrink: on the museum photos it ranks better
        # than OpenCV's area averaging (mAP 0.573 against 0.566).
        side = 4 * self.bits
        small = np.asarray(image.convert("L").resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32)
        low = cv2.dct(small)[: self.bits, : self.bits].ravel()
        median = np.median(low[1:])  # the DC term is the mean brightness, not structure
        return np.where(low > median, 1.0, -1.0).astype(np.float32) / self.bits
