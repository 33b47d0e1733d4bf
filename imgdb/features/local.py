"""Local features: keypoints and their descriptors, the input to BoW, VLAD and Fisher encodings.

Images are converted to grey and shrunk so that the longer side is at most ``side`` pixels before
detection: keypoint counts and run time then stay bounded whatever the camera, and a cap keeps the
strongest ``max_keypoints``. Binary descriptors (ORB, AKAZE) are unpacked to 0/1 floats so that the
same Euclidean codebooks apply to every kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LocalFeatures:
    """One image's keypoints, ``xy`` ``(n, 2)`` float32 in the detection frame (the grey image of
    :func:`grey`), with their descriptors ``(n, DESCRIPTOR_DIMS[kind])`` float32, and ``scale``,
    the detection frame's size over the image's (``xy / scale`` is in the image's pixels)."""

    xy: np.ndarray
    descriptors: np.ndarray
    scale: float


Detector = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
_NONE = (np.empty((0, 2), np.float32), np.empty((0, 0), np.float32))


def _strongest(keypoints: list[cv2.KeyPoint], limit: int) -> list[cv2.KeyPoint]:
    return sorted(keypoints, key=lambda kp: kp.response, reverse=True)[:limit]


def _opencv(create: Callable[[int], cv2.Feature2D]) -> Detector:
    """Detect with an OpenCV feature, keep the strongest ``limit`` keypoints, describe them."""

    def run(pixels: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        feature = create(limit)  # per call: OpenCV feature objects are not safe to share across threads
        keypoints = _strongest(list(feature.detect(pixels, None)), limit)
        if not keypoints:
            return _NONE
        keypoints, descriptors = feature.compute(pixels, keypoints)
        if descriptors is None:
            return _NONE
        return np.asarray([kp.pt for kp in keypoints], np.float32).reshape(-1, 2), descriptors

    return run


def rootsift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelović & Zisserman 2012): L1-normalise, then square-root, so that Euclidean
    distance between descriptors becomes the Hellinger kernel between the underlying histograms."""
    descriptors = descriptors.astype(np.float32)
    norms = np.abs(descriptors).sum(axis=1, keepdims=True)
    return np.sqrt(descriptors / np.maximum(norms, 1e-12))


def _surf(pixels: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    from imgdb.features.surf import surf  # written by hand: SURF is not in OpenCV's PyPI wheels

    keypoints, descriptors = surf(pixels, max_keypoints=limit)
    return keypoints.xy, descriptors


def _rootsift(pixels: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    xy, descriptors = _SIFT(pixels, limit)
    return xy, rootsift(descriptors)


_SIFT = _opencv(lambda n: cv2.SIFT_create(nfeatures=n))
_DETECTORS: dict[str, Detector] = {
    "sift": _SIFT,
    "rootsift": _rootsift,
    "surf": _surf,
    "orb": _opencv(lambda n: cv2.ORB_create(nfeatures=n)),
    "kaze": _opencv(lambda n: cv2.KAZE_create()),
    "akaze": _opencv(lambda n: cv2.AKAZE_create()),
}


def local_features(image: Image.Image, kind: str, *, side: int, max_keypoints: int) -> LocalFeatures:
    """Keypoints and descriptors of an RGB image (there may be none)."""
    pixels = grey(image, side)
    xy, descriptors = _DETECTORS[kind](pixels, max_keypoints)
    if descriptors.size == 0:
        xy, descriptors = _NONE[0], np.empty((0, DESCRIPTOR_DIMS[kind]), dtype=np.float32)
    elif descriptors.dtype == np.uint8 and kind in ("orb", "akaze"):
        descriptors = np.unpackbits(descriptors, axis=1)[:, : DESCRIPTOR_DIMS[kind]]
    return LocalFeatures(xy.astype(np.float32), descriptors.astype(np.float32), pixels.shape[1] / image.width)


def describe_local(image: Image.Image, kind: str, *, side: int, max_keypoints: int) -> np.ndarray:
    """Local descriptors of an RGB image, ``(n, DESCRIPTOR_DIMS[kind])`` float32 (n may be 0)."""
    return local_features(image, kind, side=side, max_keypoints=max_keypoints).descriptors
