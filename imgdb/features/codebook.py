"""Global descriptors from local features encoded over a codebook learned from the collection:
bag of visual words (``bow``), VLAD (``vlad``) and Fisher vectors (``fisher``).

Spec: ``FAMILY:LOCAL[/k=K][/side=S][/max=M][/ldim=L][/dim=D][/whiten]`` — the local feature
(``sift``, ``rootsift``, ``surf``, ``orb``, ``kaze``, ``akaze``), codebook size, the longer image side
for detection, the keypoint cap, an optional PCA of the local descriptors (Fisher vectors assume
decorrelated dimensions, so it is on by default for them), and the stored dimension: the whole
encoding by default (8,192 dimensions for RootSIFT-VLAD, searched through IVF-PQ when the index names
no first stage), or ``dim=D`` for a PCA learned on the sample (``whiten`` to whiten it too; it keeps
fewer components than the sample has images, and loses on photos it did not learn from).

Training (:meth:`CodebookExtractor.fit`) runs on a sample of the collection's images; everything it
learns comes back from :meth:`~CodebookExtractor.state` as arrays that the index keeps in PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.features import aggregate
from imgdb.features.base import ExtractorContext, LearningExtractor
from imgdb.features.local import DESCRIPTOR_DIMS, describe_local
from imgdb.features.spec import Spec, reject_leftovers, take_int, take_word
from imgdb.features.whitening import learn_projection, project, reduction, take_dim

DEFAULT_K = {"bow": 1000, "vlad": 64, "fisher": 64}
DEFAULT_LDIM = {"fisher": 64}
DESCRIPTIONS = {
    "bow": "bag of visual words, tf-idf weighted",
    "vlad": "VLAD, intra + signed-sqrt normalised",
    "fisher": "Fisher vector over a diagonal GMM, power + L2 normalised",
}


class CodebookExtractor(LearningExtractor):
    family = "vlad"
    batch_size = 16

    def __init__(self, family: str, local: str, k: int, side: int, max_keypoints: int,
                 ldim: int | None, dim: int | str | None, whiten: bool) -> None:
        super().__init__()
        self.family = family
        self.local = local
        self.k = k
        self.side = side
        self.max_keypoints = max_keypoints
        self.ldim = ldim
        self.whiten = whiten
        d = ldim or DESCRIPTOR_DIMS[local]
        self.raw_dim = {"bow": k, "vlad": k * d, "fisher": 2 * k * d}[family]
        self.reduced, spelled = reduction(self.raw_dim, dim, whiten)
        self.dim = self.reduced or self.raw_dim
        parts = [f"{family}:{local}", f"k={k}", f"side={side}", f"max={max_keypoints}"]
        parts += [f"ldim={ldim}"] if ldim else []
        self.spec = "/".join(parts + spelled)

    @classmethod
    def from_spec(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> CodebookExtractor:
        family = spec.family
        local = spec.arg or "rootsift"
        if local not in DESCRIPTOR_DIMS:
            raise ExtractorSpecError(f"unknown local feature {local!r}: use one of {', '.join(DESCRIPTOR_DIMS)}")
        options = dict(spec.options)
        words = list(spec.words)
        k = take_int(options, "k", DEFAULT_K[family], minimum=2)
        side = take_int(options, "side", 640, minimum=64)
        max_keypoints = take_int(options, "max", 2000)
        ldim = take_int(options, "ldim", DEFAULT_LDIM.get(family, 0), minimum=0) or None
        if ldim is not None and ldim > DESCRIPTOR_DIMS[local]:
            raise ExtractorSpecError(f"ldim={ldim} is more than {local}'s {DESCRIPTOR_DIMS[local]} dimensions")
        dim = take_dim(options)
        whiten = take_word(words, "whiten")
        reject_leftovers(spec, options, words)
        return cls(family, local, k, side, max_keypoints, ldim, dim, whiten)

    @classmethod
    def variants(cls) -> list[tuple[str, str, str]]:
        rows = [(f, f"{f}:rootsift", f"{DESCRIPTIONS[f]} RootSIFT") for f in DEFAULT_K]
        rows += [(local, f"vlad:{local}", f"{local.upper()} local features, VLAD-encoded") for local in DESCRIPTOR_DIMS]
        return rows

    # ------------------------------------------------------------ pipeline

    def scale_hint(self, width: int, height: int) -> float:
        return self.side / max(width, height)

    def prepare(self, image: Image.Image) -> np.ndarray:
        return describe_local(image, self.local, side=self.side, max_keypoints=self.max_keypoints)

    def describe(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        if not self.ready:
            raise RuntimeError(f"{self.spec}: codebook not trained yet")
        return np.stack([self._encode(descriptors) for descriptors in prepared])

    def _local_pca(self, descriptors: np.ndarray) -> np.ndarray:
        return project(descriptors, self._state, self.ldim, prefix="local_") if self.ldim else descriptors

    def _raw(self, descriptors: np.ndarray) -> np.ndarray:
        """The encoding before reduction (zeros when the image has no keypoints)."""
        x = self._local_pca(descriptors)
        s = self._state
        if self.family == "bow":
            return aggregate.bow(x, s["centres"], s["idf"])
        if self.family == "vlad":
            return aggregate.vlad(x, s["centres"])
        return aggregate.fisher(x, s["weights"], s["means"], s["variances"])

    def _reduce(self, vectors: np.ndarray) -> np.ndarray:
        return project(vectors, self._state, self.dim) if self.reduced else vectors

    def _encode(self, descriptors: np.ndarray) -> np.ndarray:
        if len(descriptors) == 0:
            return np.zeros(self.dim, dtype=np.float32)  # no keypoints: see base.l2_normalize
        return self._reduce(self._raw(descriptors)[None])[0]

    # ------------------------------------------------------------ training

    def fit(self, prepared: Sequence[np.ndarray]) -> None:
        """Learn the local PCA, codebook (and idf) and the reduction from a sample's descriptors."""
        sets = [d for d in prepared if len(d)]
        if len(sets) < 2:
            raise ExtractorSpecError(f"{self.spec}: the training sample has fewer than 2 images with keypoints")
        sample = aggregate.training_sample(sets)
        state: dict[str, np.ndarray] = {}
        self._state = state  # filled step by step: each step encodes with what the previous ones learned
        if self.ldim:
            state.update(learn_projection(sample, self.ldim, whiten=False, prefix="local_"))
            sample = self._local_pca(sample)
        if self.family == "fisher":
            state["weights"], state["means"], state["variances"] = aggregate.learn_gmm(sample, self.k)
        else:
            state["centres"] = aggregate.learn_kmeans(sample, self.k)
            if self.family == "bow":
                state["idf"] = aggregate.learn_idf([self._local_pca(d) for d in sets], state["centres"])
        if self.reduced:
            state.update(learn_projection(np.stack([self._raw(d) for d in sets]), self.dim, whiten=self.whiten))
