"""MOP: multi-scale orderless pooling of CNN activations (Gong, Wang, Guo & Lazebnik, ECCV 2014).

Three levels, each one vector, concatenated:

1. the whole image through the network (GeM-pooled last feature map);
2. 128×128 patches at a stride of 32 pixels, each through the network, their descriptors PCA-reduced
   (``ldim``) and VLAD-pooled over ``k`` words learned from the collection's patches;
3. the same with 64×64 patches at a stride of 16.

As in the paper the image is first resized (shorter side ``size`` = 256, aspect ratio kept here, so
that wide images get more patches instead of being squashed), each level is L2-normalised before
concatenation; the result is kept whole (3,328 dimensions by default) unless ``dim`` asks for a
PCA learned on the sample (the figures in the README name ``dim=512``, the default before).

Spec: ``mop:BACKBONE[/k=16][/ldim=64][/size=256][/dim=D][/whiten]``.
"""

from __future__ import annotations

from collections.abc import Sequence
import numpy as np
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.features import aggregate
from imgdb.features.base import ExtractorContext, LearningExtractor, l2_normalize
from imgdb.features.cnn import CnnExtractor
from imgdb.features.cnn_config import DEFAULT_BACKBONE, CnnConfig
from imgdb.features.spec import Spec, reject_leftovers, take_int, take_word
from imgdb.features.whitening import learn_projection, project, reduction, take_dim

#: (patch side, stride) of the patch levels, in pixels of the resized image (the paper's values).
LEVELS = ((128, 32), (64, 16))


class MopExtractor(LearningExtractor):
    family = "mop"
    batch_size = 8

    def __init__(self, backbone: str, k: int, ldim: int, size: int, dim: int | str | None, whiten: bool,
                 context: ExtractorContext = ExtractorContext()) -> None:
        super().__init__()
        self.cnn = CnnExtractor(CnnConfig(backbone=backbone, size=size, whiten="off"), context)
        if ldim > self.cnn.dim:
            raise ExtractorSpecError(f"ldim={ldim} is more than the backbone's {self.cnn.dim} channels")
        self.k, self.ldim, self.size, self.whiten = k, ldim, size, whiten
        self.raw_dim = self.cnn.dim + len(LEVELS) * k * ldim
        self.reduced, spelled = reduction(self.raw_dim, dim, whiten)
        self.dim = self.reduced or self.raw_dim
        parts = [f"mop:{backbone}", f"k={k}", f"ldim={ldim}", f"size={size}"]
        self.spec = "/".join(parts + spelled)

    @classmethod
    def from_spec(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> MopExtractor:
        options = dict(spec.options)
        words = list(spec.words)
        k = take_int(options, "k", 16, minimum=2)
        ldim = take_int(options, "ldim", 64, minimum=2)
        size = take_int(options, "size", 256, minimum=max(side for side, _ in LEVELS))
        dim = take_dim(options)
        whiten = take_word(words, "whiten")
        reject_leftovers(spec, options, words)
        return cls(spec.arg or DEFAULT_BACKBONE, k, ldim, size, dim, whiten, context)

    @classmethod
    def variants(cls) -> list[tuple[str, str, str]]:
        return [("cnn-mop", f"mop:{DEFAULT_BACKBONE}",
                 "multi-scale orderless pooling: whole image + VLAD of 128 and 64 px patch activations")]

    # ------------------------------------------------------------ pipeline

    def scale_hint(self, width: int, height: int) -> float:
        return self.cnn.scale_hint(width, height)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The resized, normalised image; patches are cut from it only when described, since all
        of an image's patches together take ~20 times its memory."""
        return self.cnn.prepare(image)[0]

    def _patch_descriptors(self, whole: np.ndarray, level: int) -> np.ndarray:
        """GeM descriptors of every patch of one level of one image, ``(patches, channels)``."""
        side, stride = LEVELS[level]
        _, height, width = whole.shape
        patches = [whole[:, y:y + side, x:x + side]
                   for y in range(0, height - side + 1, stride) for x in range(0, width - side + 1, stride)]
        return self.cnn._single_scale(patches)

    def _levels(self, prepared: Sequence[np.ndarray]) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """Whole-image vectors and, per level, each image's patch descriptors."""
        whole = l2_normalize(self.cnn._single_scale(list(prepared)))
        return whole, [[self._patch_descriptors(p, level) for p in prepared] for level in range(len(LEVELS))]

    def _raw(self, whole: np.ndarray, levels: list[list[np.ndarray]]) -> np.ndarray:
        parts = [whole]
        for level, descriptors in enumerate(levels):
            centres = self._state[f"level{level}_centres"]
            # VLAD comes out L2-normalised: every level has unit weight in the concatenation.
            parts.append(np.stack([aggregate.vlad(self._local(d, level), centres) for d in descriptors]))
        return np.concatenate(parts, axis=1)

    def _local(self, descriptors: np.ndarray, level: int) -> np.ndarray:
        """Patch descriptors of one level reduced by that level's learned PCA."""
        return project(descriptors, self._state, self.ldim, prefix=f"level{level}_")

    def describe(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        if not self.ready:
            raise RuntimeError(f"{self.spec}: codebooks not trained yet")
        raw = self._raw(*self._levels(prepared))
        return project(raw, self._state, self.dim) if self.reduced else raw

    # ------------------------------------------------------------ training

    def fit(self, prepared: Sequence[np.ndarray]) -> None:
        """Learn, per patch level, the PCA of patch descriptors and the VLAD words; then the reduction.
        The network runs once over the sample; every step reuses its outputs."""
        if len(prepared) < 2:
            raise ExtractorSpecError(f"{self.spec}: training needs at least 2 images")
        whole, levels = self._levels(prepared)
        self._state = {}
        for level, descriptors in enumerate(levels):
            sample = aggregate.training_sample(descriptors)
            self._state.update(learn_projection(sample, self.ldim, whiten=False, prefix=f"level{level}_"))
            self._state[f"level{level}_centres"] = aggregate.learn_kmeans(self._local(sample, level), self.k)
        if self.reduced:
            self._state.update(learn_projection(self._raw(whole, levels), self.dim, whiten=self.whiten))
