"""Deep local features over a codebook: VLAD of the positions of an intermediate CNN feature map.

The DELF/HOW line of work (Noh et al. 2017; Tolias, Jenicek & Chum 2020) in its simplest form: each
position of the map after an intermediate stage is a local descriptor of the patch its receptive
field covers, as MOP's patches are (:mod:`imgdb.features.mop`), but one forward pass gives all of
them; they are L2-normalised, PCA-whitened to ``ldim`` and normalised again, then VLAD-pooled
(:func:`imgdb.features.aggregate.vlad`) over ``k`` words learned from the collection. The last map's
positions see most of the image each and do not work as local descriptors. Measured with a
prototype (EfficientNet-Lite2 at 384 px, k=32, museum / held-out copies mAP): ``@blocks.5``
0.950 / 0.935, ``@blocks.4`` 0.992 / 0.972, ``@blocks.3`` 0.977 / 0.989; GeM 0.943 / 0.928.

Spec: ``cnnvlad:BACKBONE[@LAYER]/k=32/ldim=60/size=384[/dim=D|full][/whiten]``; the encoding has
``k·ldim`` dimensions (1,920 by default: within the 2,000 pgvector's HNSW indexes), kept whole
unless ``dim`` asks for a PCA learned on the sample. The default extractor of new indexes. 32
words rather than 16: measured (benchmarks/codebook_sources.py), learned from another collection
(scikit-image's samples) 16 words fell to museum / held-out copies mAP 0.846 / 0.909 and 32 kept
0.978 / 0.921 (GeM, which learns nothing: 0.943 / 0.920).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.features import aggregate
from imgdb.features.base import ExtractorContext, LearningExtractor, unit_rows
from imgdb.features.cnn import CnnExtractor
from imgdb.features.cnn_config import DEFAULT_BACKBONE, CnnConfig
from imgdb.features.spec import Spec, reject_leftovers, take_int, take_word
from imgdb.features.whitening import learn_projection, project, reduction, take_dim

#: The stage whose map's positions are the local descriptors, for the default backbone.
DEFAULT_LAYER = "blocks.4"
#: Positions per sampled image that the whitening and the words learn from (every image counts
#: alike, however large).
SAMPLED = 200
#: k-means runs the words are the best of. Measured with a prototype of this module on the museum
#: gallery (k=16, ldim=64): five single runs from five seeds gave museum mAP 0.949-0.992 and held-out copies
#: 0.950-0.979; the best of 8 runs 0.983 / 0.969 and 0.979 / 0.969 from two seeds.
RESTARTS = 8


class CnnVladExtractor(LearningExtractor):
    family = "cnnvlad"
    batch_size = 8

    def __init__(self, backbone: str, layer: str, k: int, ldim: int, size: int, dim: int | str | None,
                 whiten: bool, context: ExtractorContext = ExtractorContext()) -> None:
        super().__init__()
        self.cnn = CnnExtractor(CnnConfig(backbone=backbone, layer=layer, size=size, whiten="off"), context, maps=True)
        if ldim > self.cnn.dim:
            raise ExtractorSpecError(f"ldim={ldim} is more than the {self.cnn.dim} channels of {backbone}@{layer}")
        self.k, self.ldim = k, ldim
        self.raw_dim = k * ldim
        self.reduced, spelled = reduction(self.raw_dim, dim, whiten)
        self.whiten = whiten
        self.dim = self.reduced or self.raw_dim
        self.spec = "/".join([f"cnnvlad:{backbone}@{layer}", f"k={k}", f"ldim={ldim}", f"size={size}", *spelled])

    @classmethod
    def from_spec(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> CnnVladExtractor:
        options, words = dict(spec.options), list(spec.words)
        backbone, _, layer = (spec.arg or DEFAULT_BACKBONE).partition("@")
        k = take_int(options, "k", 32, minimum=2)
        ldim = take_int(options, "ldim", 60, minimum=2)
        size = take_int(options, "size", 384, minimum=64)
        dim = take_dim(options)
        whiten = take_word(words, "whiten")
        reject_leftovers(spec, options, words)
        return cls(backbone, layer or DEFAULT_LAYER, k, ldim, size, dim, whiten, context)

    @classmethod
    def variants(cls) -> list[tuple[str, str, str]]:
        return [("cnn-vlad", f"cnnvlad:{DEFAULT_BACKBONE}@{DEFAULT_LAYER}",
                 "VLAD of an intermediate CNN map's positions (deep local features), codebook from the collection")]

    # ------------------------------------------------------------ pipeline

    def scale_hint(self, width: int, height: int) -> float:
        return self.cnn.scale_hint(width, height)

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self.cnn.prepare(image)[0]

    def _positions(self, prepared: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each image's map positions as unit rows ``(positions, channels)``."""
        return [unit_rows(m.reshape(m.shape[0], -1).T) for m in self.cnn.maps(list(prepared))]

    def _encode(self, positions: np.ndarray) -> np.ndarray:
        local = unit_rows(project(positions, self._state, self.ldim, prefix="local_"))
        return aggregate.vlad(local, self._state["centres"])

    def describe(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        if not self.ready:
            raise RuntimeError(f"{self.spec}: codebook not trained yet")
        raw = np.stack([self._encode(p) for p in self._positions(prepared)])
        return project(raw, self._state, self.dim) if self.reduced else raw

    # ------------------------------------------------------------ training

    def fit(self, prepared: Sequence[np.ndarray]) -> None:
        """Learn the positions' whitening and the words from a sample (the network runs once over
        it), then the reduction where there is one."""
        if not prepared:
            raise ExtractorSpecError(f"{self.spec}: training needs at least one image")
        positions = [p for i in range(0, len(prepared), self.batch_size)
                     for p in self._positions(prepared[i:i + self.batch_size])]
        rng = np.random.default_rng(0)
        sample = np.concatenate([p[rng.choice(len(p), min(len(p), SAMPLED), replace=False)] for p in positions])
        if len(sample) <= max(self.ldim, self.k):  # (one photo at the default size has hundreds)
            raise ExtractorSpecError(f"{self.spec}: {len(sample)} map positions cannot learn a {self.ldim}-dimension "
                                     f"whitening and {self.k} words: give larger images or a larger size")
        self._state = learn_projection(sample, self.ldim, whiten=True, prefix="local_")
        words = unit_rows(project(sample, self._state, self.ldim, prefix="local_"))
        self._state["centres"] = aggregate.learn_kmeans(words, self.k, restarts=RESTARTS)
        if self.reduced:
            raw = np.stack([self._encode(p) for p in positions])
            self._state.update(learn_projection(raw, self.dim, whiten=self.whiten))
