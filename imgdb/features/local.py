"""Local features: keypoints and their descriptors, the input to BoW, VLAD and Fisher encodings.

Images are converted to grey and shrunk so that the longer side is at most ``side`` pixels before
detection: keypoint counts and run time then stay bounded whatever the camera, and a cap keeps the
strongest ``max_keypoints``. Binary descriptors (ORB, AKAZE) are unpacked to 0/1 floats so that the
same Euclidean codebooks apply to every kind.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

#: Local feature kinds: name -> descriptor length.
DESCRIPTOR_DIMS = {"sift": 128, "rootsift": 128, "surf": 64, "orb": 256, "kaze": 64, "akaze": 486}


def grey(image: Image.Image, side: int) -> np.ndarray:
    """8-bit grey pixels with the longer side shrunk to at most ``side`` (area averaging)."""
    pixels = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    height, width = pixels.shape
    scale = side / max(height, width)
    if scale < 1:
        pixels = cv2.resize(pixels, (max(1, round(width * scale)), max(1, round(height * scale))),
                            interpolation=cv2.INTER_AREA)
    return pixels


def _strongest(keypoints: list[cv2.KeyPoint], limit: int) -> list[cv2.KeyPoint]:
    return sorted(keypoints, key=lambda kp: kp.response, reverse=True)[:limit]


def _opencv(create: Callable[[int], cv2.Feature2D]) -> Callable[[np.ndarray, int], np.ndarray]:
    """Detect with an OpenCV feature, keep the strongest ``limit`` keypoints, describe them."""

    def run(pixels: np.ndarray, limit: int) -> np.ndarray:
        feature = create(limit)  # per call: OpenCV feature objects are not safe to share across threads
        keypoints = _strongest(list(feature.detect(pixels, None)), limit)
        if not keypoints:
            return np.empty((0, 0), dtype=np.float32)
        _, descriptors = feature.compute(pixels, keypoints)
        return np.empty((0, 0), dtype=np.float32) if descriptors is None else descriptors

    return run


def rootsift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelović & Zisserman 2012): L1-normalise, then square-root, so that Euclidean
    distance between descriptors becomes the Hellinger kernel between the underlying histograms."""
    descriptors = descriptors.astype(np.float32)
    norms = np.abs(descriptors).sum(axis=1, keepdims=True)
    return np.sqrt(descriptors / np.maximum(norms, 1e-12))


def _surf(pixels: np.ndarray, limit: int) -> np.ndarray:
    from imgdb.features.surf import surf  # written by hand: SURF is not in OpenCV's PyPI wheels

    _, descriptors = surf(pixels, max_keypoints=limit)
    return descriptors


_SIFT = _opencv(lambda n: cv2.SIFT_create(nfeatures=n))
_DETECTORS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "sift": _SIFT,
    "rootsift": lambda pixels, limit: rootsift(_SIFT(pixels, limit)),
    "surf": _surf,
    "orb": _opencv(lambda n: cv2.ORB_create(nfeatures=n)),
    "kaze": _opencv(lambda n: cv2.KAZE_create()),
    "akaze": _opencv(lambda n: cv2.AKAZE_create()),
}


def describe_local(image: Image.Image, kind: str, *, side: int, max_keypoints: int) -> np.ndarray:
    """Local descriptors of an RGB image, ``(n, DESCRIPTOR_DIMS[kind])`` float32 (n may be 0)."""
    descriptors = _DETECTORS[kind](grey(image, side), max_keypoints)
    if descriptors.size == 0:
        return np.empty((0, DESCRIPTOR_DIMS[kind]), dtype=np.float32)
    if descriptors.dtype == np.uint8 and kind in ("orb", "akaze"):
        descriptors = np.unpackbits(descriptors, axis=1)[:, : DESCRIPTOR_DIMS[kind]]
    return descriptors.astype(np.float32)
