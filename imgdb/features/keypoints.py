"""The local features an index keeps for spatial verification: their spec, and their stored form.

Spec: ``KIND[/side=S][/keypoints=N]``, such as ``rootsift/side=640/keypoints=500``: any local
feature of :mod:`imgdb.features.local`, the longer image side detection runs at, and the keypoint
cap, which is the knob for what verification costs in the database: each keypoint keeps 8 bytes of
position and one byte per descriptor dimension (RootSIFT at 500 keypoints: at most 68 KB per image).

Descriptors are stored quantized to one byte per dimension over their kind's value range (RootSIFT
and binary features lose nothing that matching notices; SIFT is integral already), positions as
float32 in the detection frame, where RANSAC's pixel threshold means the same for every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.features.spec import parse_spec, reject_leftovers, take_int

if TYPE_CHECKING:
    from imgdb.features.local import LocalFeatures

DEFAULT_KIND = "rootsift"
DEFAULT_SIDE = 640
DEFAULT_KEYPOINTS = 500
MAX_KEYPOINTS = 10_000
#: Value range of each kind's descriptor components, mapped onto 0..255 when stored. (This module
#: reads imgdb.features.local, and so OpenCV, only when features are extracted: a process that
#: only searches by vector never imports it.)
RANGES = {"sift": (0.0, 255.0), "rootsift": (0.0, 1.0), "surf": (-1.0, 1.0), "kaze": (-1.0, 1.0),
          "orb": (0.0, 1.0), "akaze": (0.0, 1.0)}


@dataclass(frozen=True)
class KeypointSpec:
    kind: str = DEFAULT_KIND
    side: int = DEFAULT_SIDE
    keypoints: int = DEFAULT_KEYPOINTS

    def __str__(self) -> str:
        return f"{self.kind}/side={self.side}/keypoints={self.keypoints}"

    @property
    def dim(self) -> int:
        from imgdb.features.local import DESCRIPTOR_DIMS

        return DESCRIPTOR_DIMS[self.kind]

    def scale_hint(self, width: int, height: int) -> float:
        """The decode scale detection needs (images are shrunk to ``side`` anyway)."""
        return self.side / max(width, height)

    def extract(self, image: Image.Image) -> LocalFeatures:
        from imgdb.features.local import local_features

        return local_features(image, self.kind, side=self.side, max_keypoints=self.keypoints)


def parse_keypoints(text: str) -> KeypointSpec:
    """Parse ``KIND[/side=S][/keypoints=N]`` (``default`` or an empty string: RootSIFT's defaults)."""
    if text.strip().lower() in ("", "default"):
        return KeypointSpec()
    spec = parse_spec(text)
    if spec.family not in RANGES or spec.arg:
        raise ExtractorSpecError(f"unknown local feature {str(spec)[:40]!r}: use one of {', '.join(RANGES)}")
    options, words = dict(spec.options), list(spec.words)
    side = take_int(options, "side", DEFAULT_SIDE, minimum=64)
    keypoints = take_int(options, "keypoints", DEFAULT_KEYPOINTS, minimum=8)
    if side > 4096 or keypoints > MAX_KEYPOINTS:
        raise ExtractorSpecError(f"local features: side must be at most 4096 and keypoints at most {MAX_KEYPOINTS}")
    reject_leftovers(spec, options, words)
    return KeypointSpec(spec.family, side, keypoints)


@dataclass(frozen=True)
class QuantizedFeatures:
    """Local features as the database keeps them."""

    scale: float
    xy: np.ndarray  # (n, 2) float32
    codes: np.ndarray  # (n, dim) uint8

    @property
    def nbytes(self) -> int:
        return self.xy.nbytes + self.codes.nbytes


def quantize(features: LocalFeatures, spec: KeypointSpec) -> QuantizedFeatures:
    low, high = RANGES[spec.kind]
    codes = np.clip(np.rint((features.descriptors - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return QuantizedFeatures(features.scale, np.ascontiguousarray(features.xy, np.float32), codes.reshape(-1, spec.dim))


def descriptors(stored: QuantizedFeatures, spec: KeypointSpec) -> np.ndarray:
    """The float32 descriptors back from their stored bytes."""
    low, high = RANGES[spec.kind]
    return stored.codes.astype(np.float32) * ((high - low) / 255.0) + low
