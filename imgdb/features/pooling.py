"""Global pooling of a CNN feature map ``(N, C, H, W)`` into one vector per image ``(N, C)``.

Pure functions, so that the maths is testable without a network; the CNN extractor only composes
them. Normalisation is left to the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean (Radenović et al. 2018): ``(mean x^p)^(1/p)``; p=1 is average, p→∞ is max.

    Activations are clamped at ``eps`` first: the power of a negative value is undefined for
    fractional p, and backbones whose last activation is not a ReLU (e.g. SiLU) do produce them.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions (Tolias et al. 2016): the per-channel spatial maximum."""
    return x.amax(dim=(-2, -1))


def average(x: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial average (sum pooling up to a scale the L2 normalisation removes)."""
    return x.mean(dim=(-2, -1))


#: Pooling name in a spec → (function, whether it takes GeM's ``p``).
POOLINGS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "gem": (gem, True),
    "max": (mac, False),
    "avg": (average, False),
}
