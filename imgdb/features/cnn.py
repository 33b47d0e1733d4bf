"""Deep global descriptors: a pretrained CNN's feature map, pooled into one vector.

Spec: ``cnn:BACKBONE[@LAYER]/POOLING[/OPTION=V]...[/size=S][/scales=1,0.707,0.5][/whiten=auto|on|off]
[/net=SHA256][/weights=PATH]``

* BACKBONE: a timm (or torchvision) name; ``@LAYER`` takes the map of an intermediate stage named as in
  the model's ``feature_info`` (``@layer3`` for a ResNet, ``@blocks.4`` for an EfficientNet), which
  often retrieves better than the last one;
* POOLING: one of :mod:`imgdb.features.pooling` with its own options (GeM's ``p``, R-MAC's
  ``levels``, CroW's ``a`` and ``b``);
* ``size``: the length the *shorter* side is resized to, aspect ratio kept (no centre crop, so nothing
  near the borders of a painting or photo is lost);
* ``scales``: multi-scale extraction — the image is decoded once, resized once per scale, and the
  L2-normalised descriptors of all scales are summed (Radenović et al.);
* ``whiten``: a PCA-whitening learned on the collection (:mod:`imgdb.features.whitening`); ``auto``
  applies it when the training sample has at least ``WHITEN_MIN_RATIO`` images per dimension;
* ``net``: stored network weights, named by their sha256, which live in the database with the index
  (:mod:`imgdb.features.network`): a fine-tuned network (``imgdb train``; it carries its own
  whitening, so ``whiten=off``, and ``p`` is the value training started from), or a ``weights=``
  file stored when its index was created.

The spec is parsed by :mod:`imgdb.features.cnn_config`. The descriptor is one
:class:`~imgdb.features.network.RetrievalNet`. Its forward pass runs where the extractor's context
says (:mod:`imgdb.features.runtimes`): through ONNX Runtime unless the runtime is ``torch`` or the
network does not export; around it the extractor resizes,
batches by shape, sums scales and whitens in numpy, identically for both runtimes. This module
imports neither torch nor ONNX Runtime itself: a process that only searches never loads torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.db.records import StoredNetwork
from imgdb.features.base import Extractor, ExtractorContext, l2_normalize, unit_rows
from imgdb.features.cnn_config import DEFAULT_BACKBONE, CnnConfig
from imgdb.features.pooling_kinds import KINDS
from imgdb.features.runtimes import Network, load_network, network_weights
from imgdb.features.spec import Spec, parse_spec
from imgdb.features.whitening import learn_projection

if TYPE_CHECKING:
    import torch

    from imgdb.features.network import RetrievalNet

#: The longer side is capped at this multiple of ``size`` so that a panorama cannot blow up memory.
MAX_ASPECT = 4
#: ``whiten=auto`` whitens when the sample holds at least this many images per dimension: fewer
#: cannot estimate a covariance of that size.
WHITEN_MIN_RATIO = 2


class CnnExtractor(Extractor):
    family = "cnn"
    batch_size = 16

    def __init__(self, config: CnnConfig, context: ExtractorContext = ExtractorContext(), *,
                 maps: bool = False) -> None:
        """``maps``: the network gives the trunk's maps (:meth:`maps`), for an extractor that
        aggregates their positions itself; :meth:`describe` is then not for use."""
        self.config = config
        self.context = context
        self.spec = str(config)
        self.trainable = config.whiten != "off"
        #: A fine-tuned network's own whitening ``(W, b)``, applied after multi-scale sums.
        weights = network_weights(config, context)
        self._whitening = None if weights is None else stored_whitening(weights)
        if self._whitening is not None and config.whiten != "off":
            raise ExtractorSpecError(f"network {config.net[:12]} carries its own whitening: use whiten=off")
        self.network = load_network(config, context, maps=maps)
        self.runtime = self.network.runtime
        self.dim = self.network.dim
        #: Per channel, in 0-255 units (what :meth:`normalise` hands OpenCV).
        self._mean = tuple(float(m) * 255.0 for m in self.network.mean)
        self._inv_std = tuple(1.0 / (float(s) * 255.0) for s in self.network.std)
        self._torch: Network | None = self.network if self.runtime == "torch" else None
        self._state: dict[str, np.ndarray] = {}

    @property
    def net(self) -> RetrievalNet:
        """The PyTorch network, for training (built on first use when the runtime is ONNX), with the
        whitening this extractor learned."""
        if self._torch is None:
            from imgdb.features.torch_net import TorchNetwork

            self._torch = TorchNetwork(self.config, "cpu", network_weights(self.config, self.context))
            self._set_torch_whitening()
        return self._torch.net  # type: ignore[attr-defined]

    @property
    def model(self) -> torch.nn.Module:
        """The shared backbone the PyTorch network is built on."""
        self.net  # noqa: B018 - (builds it)
        return self._torch.model  # type: ignore[union-attr]

    @classmethod
    def canonical(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> str:
        return str(CnnConfig.parse(spec))

    @classmethod
    def from_spec(cls, spec: Spec, context: ExtractorContext = ExtractorContext()) -> CnnExtractor:
        return cls(CnnConfig.parse(spec), context)

    @classmethod
    def networks(cls, spec: Spec) -> tuple[str, ...]:
        net = CnnConfig.parse(spec).net
        return (net,) if net else ()

    @classmethod
    def store_files(cls, spec: Spec, context: ExtractorContext) -> tuple[Spec, list[StoredNetwork]]:
        """``weights=PATH``: the file's network stored by hash (``net=<sha256>``)."""
        config = CnnConfig.parse(spec)
        if config.weights is None:
            return spec, []
        from imgdb.features.torch_net import network_from_file  # (torch: only for this)

        sha, blob = network_from_file(config)
        stored = StoredNetwork(sha, config.backbone, blob, "file", {"file": config.weights})
        return parse_spec(str(replace(config, weights=None, net=sha))), [stored]

    @classmethod
    def variants(cls) -> list[tuple[str, str, str]]:
        return [
            (f"cnn-{name}", f"cnn:{DEFAULT_BACKBONE}/{name}",
             f"EfficientNet-Lite2 (ImageNet) last feature map, {pooling.label} pooling")
            for name, pooling in KINDS.items()
        ]

    # ------------------------------------------------------------ pipeline

    def scale_hint(self, width: int, height: int) -> float:
        size = self.config.size * max(self.config.scales)
        return min(size / min(width, height), size * MAX_ASPECT / max(width, height))

    def prepare(self, image: Image.Image) -> list[np.ndarray]:
        """One normalised ``(3, H, W)`` float32 array per scale, aspect kept, off the main thread."""
        pixels = np.asarray(image)
        return [self.normalise(self.resized(pixels, scale)) for scale in self.config.scales]

    def resized(self, pixels: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """RGB ``pixels`` resized to what the network sees at ``scale`` (1: the shorter side at ``size``).

        Area averaging when shrinking: on the museum set it retrieves better than Pillow's bilinear,
        bicubic or Lanczos filters (recall@1 0.917 against 0.883-0.900).
        """
        height, width = pixels.shape[:2]
        factor = self.scale_hint(width, height) / max(self.config.scales) * scale
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        shrinking = size[0] < width
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB ``(H, W, 3)`` to the network's normalised float32 ``(3, H, W)``: ``(x - mean) / std``
        per channel, by OpenCV in one pass over the pixels (numpy's cast, arithmetic and transposing
        copy made four, about 1 ms of an image's 10 ms of decoding and resizing)."""
        params = cv2.dnn.Image2BlobParams(scalefactor=self._inv_std, mean=self._mean, ddepth=cv2.CV_32F)
        return cv2.dnn.blobFromImageWithParams(np.ascontiguousarray(pixels), params)[0]

    def _single_scale(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Pooled vectors of same-scale arrays; arrays of equal shape share a forward pass."""
        if not arrays:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.stack(self._outputs(arrays)).astype(np.float32, copy=False)

    def maps(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each array's map ``(dim, h, w)`` (of a network loaded with ``maps``)."""
        return self._outputs(arrays)

    def _outputs(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The network's output for each array, in order; arrays of equal shape share a pass."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, array in enumerate(arrays):
            by_shape.setdefault(array.shape, []).append(i)
        groups = list(by_shape.values())
        out: list[np.ndarray] = [np.empty(0)] * len(arrays)
        for rows, outputs in zip(groups, self.network.run_each([np.stack([arrays[i] for i in rows]) for rows in groups])):
            for i, output in zip(rows, outputs):
                out[i] = output
        return out

    def _unwhitened(self, prepared: Sequence[list[np.ndarray]]) -> np.ndarray:
        if len(self.config.scales) == 1:
            return self._single_scale([p[0] for p in prepared])
        return sum(l2_normalize(self._single_scale([p[s] for p in prepared]))
                   for s in range(len(self.config.scales)))

    def describe(self, prepared: Sequence[list[np.ndarray]]) -> np.ndarray:
        """L2 → whitening → L2 of the (summed) pooled vectors: :meth:`RetrievalNet.head`, in numpy."""
        x = unit_rows(self._unwhitened(prepared))
        if self._whitening is None:
            return x
        weight, bias = self._whitening
        return unit_rows(x @ weight.T + bias)

    # ------------------------------------------------------------ whitening

    @property
    def trained(self) -> bool:
        return not self.trainable or bool(self._state)

    def sample_size(self, available: int) -> int:
        if self.config.whiten == "auto" and available < WHITEN_MIN_RATIO * self.dim:
            return 0  # too few images to whiten: nothing to look at
        return super().sample_size(available)

    def fit(self, prepared: Sequence[list[np.ndarray]]) -> None:
        """Learn the PCA-whitening from a sample, or record (``auto``) that the sample is too small."""
        if self.config.whiten == "auto" and len(prepared) < WHITEN_MIN_RATIO * self.dim:
            self._state = {"whitened": np.zeros(1, dtype=np.float32)}
            return
        if len(prepared) < 2:
            raise ExtractorSpecError(f"{self.spec}: whitening needs a sample of at least 2 images")
        vectors = l2_normalize(np.concatenate([self._unwhitened(prepared[i:i + self.batch_size])
                                               for i in range(0, len(prepared), self.batch_size)]))
        self.load_state({"whitened": np.ones(1, dtype=np.float32), **learn_projection(vectors, self.dim, whiten=True)})

    def state(self) -> dict[str, np.ndarray]:
        return dict(self._state)

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._state = dict(state)
        if state.get("pca_components") is not None:
            self._whitening = whitening_layer(self.dim, *(state[f"pca_{k}"] for k in ("mean", "components", "scale")))
            self._set_torch_whitening()

    def _set_torch_whitening(self) -> None:
        if self._torch is not None and self._state.get("pca_components") is not None:
            import torch

            self._torch.net.set_whitening(  # type: ignore[attr-defined]
                *(torch.from_numpy(self._state[f"pca_{k}"]) for k in ("mean", "components", "scale")))


def whitening_layer(dim: int, mean: np.ndarray, components: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A learned PCA-whitening as ``(W, b)`` with ``W = diag(scale)·components``, ``b = -W·mean``; rows
    past the learned components stay zero (:meth:`RetrievalNet.set_whitening`, the same layer)."""
    weight = np.zeros((dim, components.shape[1]), dtype=np.float32)
    weight[: len(components)] = scale[:, None] * components
    return weight, (-(weight @ mean)).astype(np.float32)


def stored_whitening(weights: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """The whitening layer a stored network carries, if any, read without torch."""
    from safetensors.numpy import load

    try:
        state = load(weights)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign bytes
        raise ExtractorSpecError(f"network weights are not readable safetensors: {exc}") from None
    if "whiten.weight" not in state:
        return None
    return state["whiten.weight"].astype(np.float32), state["whiten.bias"].astype(np.float32)
