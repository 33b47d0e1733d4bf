"""One image to its descriptor, decoded and prepared exactly as ingest does it: shared by ingest
and by queries, so that a query photo is encoded as its gallery was. Nothing here touches the
database (a search imports this without any of ingest's writing machinery)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
from PIL import Image

from imgdb.config import Settings
from imgdb.features import keypoints
from imgdb.features.base import Extractor
from imgdb.io.reader import ScaleHint, decode


def embed_pixels(extractor: Extractor, pixels: Image.Image,
                 model_gate: AbstractContextManager[Any] = nullcontext()) -> np.ndarray:
    """The descriptor of one decoded RGB image (a query), on the same path as ingest.

    ``model_gate`` is held around the model call alone: concurrent queries decode and prepare their
    pixels in parallel, while forward passes run for a bounded number of them at a time instead of
    dozens sharing the same cores and memory.
    """
    prepared = extractor.prepare(pixels)
    with model_gate:
        return extractor.embed([prepared])[0]


def decode_scale(extractor: Extractor, spec: keypoints.KeypointSpec | None) -> ScaleHint:
    """The scale to decode an image at: what the extractor needs, or the index's local features if
    they need more, so that one decode serves both (an ingested image's and a query's alike)."""
    if spec is None:
        return extractor.scale_hint
    return lambda width, height: max(extractor.scale_hint(width, height), spec.scale_hint(width, height))


def embed_image(extractor: Extractor, data: bytes, settings: Settings,
                model_gate: AbstractContextManager[Any] = nullcontext(),
                spec: keypoints.KeypointSpec | None = None) -> tuple[np.ndarray, Image.Image]:
    """The descriptor of one image's bytes, decoded exactly as ingest decodes them, and the decoded
    pixels (for the parts of a query that need them: spatial verification)."""
    image = decode(data, limits=settings.decoding, scale_hint=decode_scale(extractor, spec))
    return embed_pixels(extractor, image.pixels, model_gate), image.pixels
