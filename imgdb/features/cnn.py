"""Deep global descriptors: a pretrained CNN's last feature map, pooled into one vector.

Spec: ``cnn:BACKBONE/POOLING[/OPTION=V]...[/size=S][/weights=PATH]`` — a timm (or torchvision) backbone
name, a pooling from :mod:`imgdb.features.pooling` with its own options (GeM's ``p``, R-MAC's ``levels``,
CroW's ``a`` and ``b``: see ``POOLINGS``), and the length the *shorter* image side is resized to. The
aspect ratio is kept (no centre crop), so nothing near the borders of a painting or a photo is lost;
images in a batch that share a size go through the network together. A pooling option the chosen
pooling does not take (``max/p=3``) is refused like any unknown option.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from imgdb.errors import ExtractorSpecError
from imgdb.features.backbones import backbone_normalization, create_backbone
from imgdb.features.base import Extractor
from imgdb.features.pooling import POOLINGS
from imgdb.features.spec import Spec, reject_leftovers, take_float, take_int

DEFAULT_BACKBONE = "tf_efficientnet_lite2"
DEFAULT_SIZE = 260
#: The longer side is capped at this multiple of ``size`` so that a panorama cannot blow up memory.
MAX_ASPECT = 4


class CnnExtractor(Extractor):
    family = "cnn"
    batch_size = 16

    def __init__(self, backbone: str, pooling: str, params: dict[str, int | float], size: int,
                 weights: str | None) -> None:
        self.backbone = backbone
        self.pooling = pooling
        self.params = params
        self.size = size
        self.weights = weights
        self.spec = self._format(backbone, pooling, params, size, weights)
        self.model = create_backbone(backbone, Path(weights) if weights else None)
        mean, std = backbone_normalization(backbone, self.model)
        self._mean = np.asarray(mean, dtype=np.float32) * 255.0
        self._inv_std = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)
        self.dim = int(self._pooled(torch.zeros(1, 3, 64, 64)).shape[1])

    @staticmethod
    def _format(backbone: str, pooling: str, params: dict[str, int | float], size: int,
                weights: str | None) -> str:
        parts = [f"cnn:{backbone}", pooling]
        parts.extend(f"{name}={params[name]:g}" for name in POOLINGS[pooling].params)
        parts.append(f"size={size}")
        if weights:
            parts.append(f"weights={weights}")
        return "/".join(parts)

    @classmethod
    def _parse(cls, spec: Spec) -> tuple[str, str, dict[str, int | float], int, str | None]:
        backbone = spec.arg or DEFAULT_BACKBONE
        if "@" in backbone:
            raise ExtractorSpecError("intermediate layers (@layer) are not supported yet; use the last stage")
        words = list(spec.words)
        poolings = [w for w in words if w in POOLINGS]
        if len(poolings) > 1:
            raise ExtractorSpecError(f"more than one pooling in spec: {', '.join(poolings)}")
        pooling = poolings[0] if poolings else "gem"
        if poolings:
            words.remove(pooling)
        options = dict(spec.options)
        params = {name: (take_int if isinstance(default, int) else take_float)(options, name, default)
                  for name, default in POOLINGS[pooling].params.items()}
        size = take_int(options, "size", DEFAULT_SIZE, minimum=32)
        weights = options.pop("weights", None)
        if weights is not None:
            weights = str(Path(weights).expanduser().resolve())
        reject_leftovers(spec, options, words)
        return backbone, pooling, params, size, weights

    @classmethod
    def canonical(cls, spec: Spec) -> str:
        return cls._format(*cls._parse(spec))

    @classmethod
    def from_spec(cls, spec: Spec) -> CnnExtractor:
        return cls(*cls._parse(spec))

    @classmethod
    def variants(cls) -> list[tuple[str, str, str]]:
        return [
            (f"cnn-{name}", f"cnn:{DEFAULT_BACKBONE}/{name}",
             f"EfficientNet-Lite2 (ImageNet) last feature map, {pooling.label} pooling")
            for name, pooling in POOLINGS.items()
        ]

    def _target_size(self, width: int, height: int) -> tuple[int, int]:
        scale = self.scale_hint(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def scale_hint(self, width: int, height: int) -> float:
        return min(self.size / min(width, height), self.size * MAX_ASPECT / max(width, height))

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Resize (aspect kept) and normalise to a ``(3, H, W)`` float32 array, off the main thread.

        Area averaging when shrinking: on the museum set it retrieves better than Pillow's bilinear,
        bicubic or Lanczos filters (recall@1 0.917 against 0.883-0.900).
        """
        width, height = self._target_size(*image.size)
        shrinking = width < image.size[0]
        pixels = cv2.resize(np.asarray(image), (width, height),
                            interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
        pixels = (pixels.astype(np.float32) - self._mean) * self._inv_std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _pooled(self, batch: torch.Tensor) -> torch.Tensor:
        pool = POOLINGS[self.pooling].fn
        with torch.inference_mode():
            fmap = self.model.forward_features(batch)
            return pool(fmap, **self.params)

    def describe(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(prepared), self.dim), dtype=np.float32)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, array in enumerate(prepared):
            by_shape.setdefault(array.shape, []).append(i)
        for rows in by_shape.values():
            batch = torch.from_numpy(np.stack([prepared[i] for i in rows]))
            out[rows] = self._pooled(batch).float().numpy()
        return out
