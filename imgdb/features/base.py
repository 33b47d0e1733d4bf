"""The extractor interface every descriptor implements, and the steps all of them share.

An extractor turns decoded RGB pixels into one global descriptor in two steps, split so that the
pipeline can overlap them: :meth:`Extractor.prepare` runs per image in decode worker threads (resize,
colour conversion: cheap, GIL-releasing work), :meth:`Extractor.describe` runs on a batch in the main
thread (a network forward pass, an aggregation). The pipeline, not the extractor, L2-normalises the
result, so that ``<->`` on stored vectors ranks like cosine similarity for every extractor alike.

Extractors that learn from the collection (codebooks, PCA) say so with :attr:`Extractor.trainable`
and exchange their learned arrays through :meth:`Extractor.state` / :meth:`Extractor.load_state`;
the database layer keeps those arrays next to the index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from imgdb.db.records import StoredNetwork
from imgdb.errors import ExtractorSpecError
from imgdb.features.spec import Spec


def _no_networks(sha256: str) -> bytes:
    raise ExtractorSpecError(f"network {sha256[:12]} lives in the database of its index: open the index through "
                             "imgdb.connect()")


@dataclass(frozen=True)
class ExtractorContext:
    """What an extractor uses besides its spec, handed to it by whoever builds it (the catalog,
    from the settings ``imgdb.connect(settings=...)`` was given), never read from the environment
    behind the caller's back."""

    #: What runs network forward passes: ``onnx`` (ONNX Runtime) or ``torch``.
    runtime: str = "onnx"
    #: Where networks run: ``auto`` (CUDA when a GPU is visible), ``cpu`` or ``cuda``.
    device: str = "auto"
    #: Where exported ONNX graphs are cached (None: exported per process, kept in memory).
    graph_cache: Path | None = None
    #: The weights of a stored network, by the sha256 a spec names it by (``net=``).
    network: Callable[[str], bytes] = field(default=_no_networks, compare=False)


class Extractor(ABC):
    """A configured global-descriptor extractor (one canonical spec, one output dimension)."""

    #: Spec family (``color``, ``cnn``...), the part of a spec before ``:``.
    family: ClassVar[str]
    #: Images per :meth:`describe` call during ingest.
    batch_size: ClassVar[int] = 16
    #: Whether :meth:`fit` must run on a sample of the collection before vectors can be made.
    trainable: ClassVar[bool] = False

    #: The canonical spec: every option spelled out.
    spec: str
    #: Length of the descriptor.
    dim: int

    @classmethod
    def canonical(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> str:
        """The spec with every option spelled out; raises ExtractorSpecError on a bad spec.

        Builds the extractor to ask it; extractors that are costly to build override this.
        """
        return cls.from_spec(spec, context).spec

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> Extractor:
        """Build the extractor a canonical spec describes (loading models as needed), with what
        ``context`` provides."""

    @classmethod
    def networks(cls, spec: Spec) -> tuple[str, ...]:
        """The stored networks (sha256) a spec names: what its extractor asks ``context.network``
        for, what an index export carries and an import must bring."""
        return ()

    @classmethod
    def store_files(cls, spec: Spec, context: ExtractorContext) -> tuple[Spec, list[StoredNetwork]]:
        """The spec with the local files it names (``weights=PATH``) replaced by stored networks,
        and those networks: an index's spec never depends on a path that can change or be missing
        on another machine."""
        return spec, []

    @classmethod
    @abstractmethod
    def variants(cls) -> list[tuple[str, str, str]]:
        """``(family, default spec, description)`` rows for ``imgdb extractors``."""

    def scale_hint(self, width: int, height: int) -> float:
        """The scale :meth:`prepare` will resize an upright ``width``x``height`` image to (≤ 1 lets
        JPEG decoding skip detail that would be thrown away)."""
        return 1.0

    @abstractmethod
    def prepare(self, image: Image.Image) -> Any:
        """Per-image work that can run in a worker thread; its result goes to :meth:`describe`."""

    @abstractmethod
    def describe(self, prepared: Sequence[Any]) -> np.ndarray:
        """Descriptors of a batch of prepared images, shape ``(len(prepared), dim)``."""

    #: Images a trainable extractor samples from the collection to learn from, at most.
    training_images: ClassVar[int] = 1000

    def sample_size(self, available: int) -> int:
        """How many of ``available`` images :meth:`fit` wants (0: it can decide without looking)."""
        return min(available, self.training_images)

    @property
    def trained(self) -> bool:
        """Whether it has learned what it learns from the collection (always, for extractors that
        learn nothing)."""
        return not self.trainable

    @property
    def ready(self) -> bool:
        """Whether :meth:`describe` can run now: a CNN whose whitening is still to be learned describes
        without it; an encoding over a codebook cannot before the codebook is learned."""
        return True

    def fit(self, prepared: Sequence[Any]) -> None:
        """Learn from a sample of the collection (trainable extractors only)."""
        raise NotImplementedError(f"{self.family} extractors learn nothing")

    def state(self) -> dict[str, np.ndarray]:
        """Learned arrays to persist with the index."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned."""

    def embed(self, prepared: Sequence[Any]) -> np.ndarray:
        """Unit-length float32 descriptors of a batch of prepared images."""
        return l2_normalize(self.describe(prepared))


class LearningExtractor(Extractor):
    """An extractor that learns arrays from the collection (codebooks, PCA): they live in ``_state``,
    empty until :meth:`fit` or :meth:`load_state` fills it, and are what the index persists."""

    trainable = True

    def __init__(self) -> None:
        self._state: dict[str, np.ndarray] = {}

    @property
    def trained(self) -> bool:
        return bool(self._state)

    @property
    def ready(self) -> bool:
        return self.trained

    def state(self) -> dict[str, np.ndarray]:
        return dict(self._state)

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._state = dict(state)


class PerImageExtractor(Extractor):
    """An extractor whose :meth:`prepare` computes the whole descriptor (cheap per-image maths, best
    done in the worker threads); :meth:`describe` only gathers the batch."""

    def describe(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(prepared)


#: Norm of the vector stored for an image with nothing to describe (see :func:`l2_normalize`).
NO_CONTENT_NORM = 4.0


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, a zero row left zero (as torch's F.normalize leaves it): for the
    steps inside an extractor, where :func:`l2_normalize`'s no-content vector would be noise."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale rows to unit length.

    An all-zero row means the extractor found nothing to describe (a flat painting has no
    keypoints). Zero itself would sit at distance 1 from every unit vector, nearer than most true
    matches, so it would top the results of many queries. It becomes a constant vector of norm
    NO_CONTENT_NORM instead, at distance at least 3 from any unit vector while two unit vectors are
    never more than 2 apart: such images rank after every real match, and find each other.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    empty = norms[:, 0] == 0
    out[empty] = NO_CONTENT_NORM / np.sqrt(vectors.shape[1])
    return out
