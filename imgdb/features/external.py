"""Vectors made outside imgdb (your own model, a feature store): an index that only stores and searches.

``external/dim=512`` fixes the dimension; vectors go in with :meth:`imgdb.Imgdb.add_vectors` for
images already in the database, and queries are vectors (or ``id:N``). They are stored as given,
not normalised, so their L2 distances are the producer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from imgdb.errors import ExtractorSpecError, ImgdbError
from imgdb.features.base import Extractor, ExtractorContext
from imgdb.features.spec import Spec, reject_leftovers, take_int


class ExternalVectors(Extractor):
    family = "external"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.spec = f"external/dim={dim}"

    @classmethod
    def from_spec(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> ExternalVectors:
        options = dict(spec.options)
        if spec.arg or "dim" not in options:
            raise ExtractorSpecError("external: give the dimension as external/dim=N")
        dim = take_int(options, "dim", 0, minimum=1)
        reject_leftovers(spec, options, list(spec.words))
        return cls(dim)

    @classmethod
    def variants(cls) -> list[tuple[str, str, str]]:
        return [("external", "external/dim=128", "vectors computed outside imgdb, added with Imgdb.add_vectors")]

    def prepare(self, image: Image.Image) -> Any:
        raise ImgdbError(f"{self.spec} indexes hold vectors made outside imgdb: query them with a vector or id:N, "
                         "and add them with Imgdb.add_vectors")

    def describe(self, prepared: Sequence[Any]) -> np.ndarray:
        raise AssertionError("prepare() refuses every image")
