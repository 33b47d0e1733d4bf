"""What a CNN spec says: ``cnn:BACKBONE[@LAYER]/POOLING[/OPTION=V]...[/size=S][/scales=...][/whiten=...]
[/net=SHA256][/weights=PATH]`` parsed into a :class:`CnnConfig` with every default filled in (the
grammar is :mod:`imgdb.features.cnn`'s docstring). Imported by everything that builds or runs the
network, and importing none of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgdb.errors import ExtractorSpecError
from imgdb.features.pooling_kinds import KINDS
from imgdb.features.spec import Spec, reject_leftovers, take_float, take_int
from imgdb.io.reader import SHA256_HEX

DEFAULT_BACKBONE = "tf_efficientnet_lite2"
DEFAULT_SIZE = 260
WHITEN_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CnnConfig:
    """Everything a CNN spec says, with defaults filled in."""

    backbone: str = DEFAULT_BACKBONE
    layer: str | None = None
    pooling: str = "gem"
    params: tuple[tuple[str, float], ...] = (("p", 3.0),)
    size: int = DEFAULT_SIZE
    scales: tuple[float, ...] = (1.0,)
    whiten: str = "auto"
    weights: str | None = None
    net: str | None = None

    def __str__(self) -> str:
        parts = [f"cnn:{self.backbone}" + (f"@{self.layer}" if self.layer else ""), self.pooling]
        parts += [f"{name}={value:g}" for name, value in self.params]
        parts.append(f"size={self.size}")
        if self.scales != (1.0,):
            parts.append("scales=" + ",".join(f"{s:g}" for s in self.scales))
        parts.append(f"whiten={self.whiten}")
        if self.net:
            parts.append(f"net={self.net}")
        if self.weights:
            parts.append(f"weights={self.weights}")  # a path: always last (see spec grammar)
        return "/".join(parts)

    @classmethod
    def parse(cls, spec: Spec) -> CnnConfig:
        backbone, _, layer = (spec.arg or DEFAULT_BACKBONE).partition("@")
        words = list(spec.words)
        poolings = [w for w in words if w in KINDS]
        if len(poolings) > 1:
            raise ExtractorSpecError(f"more than one pooling in spec: {', '.join(poolings)}")
        pooling = poolings[0] if poolings else "gem"
        if poolings:
            words.remove(pooling)
        options = dict(spec.options)
        params = tuple(
            (name, (take_int if isinstance(default, int) else take_float)(options, name, default))
            for name, default in KINDS[pooling].params.items()
        )
        size = take_int(options, "size", DEFAULT_SIZE, minimum=32)
        scales = _parse_scales(options.pop("scales", "1"))
        net = options.pop("net", None)
        whiten = options.pop("whiten", "auto")
        if whiten not in WHITEN_MODES:
            raise ExtractorSpecError(f"whiten={whiten!r}: use one of {', '.join(WHITEN_MODES)}")
        if net is not None and not SHA256_HEX.fullmatch(net):
            raise ExtractorSpecError(f"net={net[:70]!r}: a network is named by the sha256 of its weights (64 hex digits)")
        if layer and KINDS[pooling].classifier:
            raise ExtractorSpecError(f"{pooling} pooling weighs the last map by the classifier: no @{layer}")
        weights = options.pop("weights", None)
        if weights is not None:
            weights = str(Path(weights).expanduser().resolve())
        reject_leftovers(spec, options, words)
        return cls(backbone, layer or None, pooling, params, size, scales, whiten, weights, net)


def _parse_scales(raw: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in raw.split(","))
    except ValueError:
        raise ExtractorSpecError(f"scales={raw!r}: expected numbers separated by commas, e.g. 1,0.707,0.5") from None
    if not scales or not all(0.1 <= s <= 2 for s in scales) or len(set(scales)) != len(scales):
        raise ExtractorSpecError(f"scales={raw!r}: distinct scales between 0.1 and 2")
    return scales
