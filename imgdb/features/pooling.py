"""Global pooling of a CNN feature map ``(N, C, H, W)`` into one vector per image ``(N, C)``.

Pure functions, so that the maths is testable without a network; the CNN extractor only composes
them. Normalisation of the final vector is left to the pipeline; a pooling whose *definition*
normalises intermediate parts (R-MAC's per-region L2) does that itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from imgdb.features import pooling_numpy
from imgdb.features.pooling_kinds import KINDS, PoolingKind
from imgdb.features.pooling_numpy import rmac_regions

__all__ = ["POOLINGS", "Pooling", "average", "cam", "crow", "crow_channel_weights", "crow_spatial_weights", "gem",
           "mac", "rmac", "rmac_regions", "spoc", "spoc_centre_prior"]


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


# --------------------------------------------------------------------------------------------------
# SPoC


def spoc_centre_prior(h: int, w: int) -> torch.Tensor:
    """SPoC's centre prior as a tensor (:func:`imgdb.features.pooling_numpy.spoc_centre_prior`)."""
    return torch.from_numpy(pooling_numpy.spoc_centre_prior(h, w))


def spoc(x: torch.Tensor, centre_prior: bool = True) -> torch.Tensor:
    """Sum-pooled convolutional features (Babenko & Lempitsky, ICCV 2015), with the centre prior.

    ``ψ = Σ_{y,x} α(x, y) · f(x, y)`` with α from :func:`spoc_centre_prior`; ``centre_prior=False``
    gives plain sum pooling (which L2 normalisation turns into the same vector as :func:`average`).
    Sum pooling is linear, so negative (SiLU) activations need no clamping. The paper then
    L2-normalises, PCA-whitens and L2-normalises again; whitening is a learned step handled elsewhere.
    """
    if not centre_prior:
        return x.sum(dim=(-2, -1))
    prior = spoc_centre_prior(x.shape[-2], x.shape[-1]).to(device=x.device, dtype=x.dtype)
    return (x * prior).sum(dim=(-2, -1))


# --------------------------------------------------------------------------------------------------
# R-MAC

def rmac(x: torch.Tensor, levels: int = 3, overlap: float = 0.4, eps: float = 1e-6) -> torch.Tensor:
    """Regional MAC (Tolias, Sicre & Jégou, ICLR 2016): L2-normalised region MACs, summed.

    One MAC vector per region of :func:`rmac_regions` (whole map included, as in the reference
    code), each L2-normalised — so that every region votes equally whatever its activation
    strength — and summed. In the paper each region vector is also PCA-whitened before the sum
    (then L2 again); that whitening is learned from data and handled elsewhere, not here. The
    per-region normalisation uses ``v / (‖v‖ + eps)`` like the reference, so an all-zero region
    contributes nothing rather than NaN. Like :func:`mac`, activations are not clamped.
    """
    total = torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)
    for y, x0, height, width in rmac_regions(x.shape[-2], x.shape[-1], levels, overlap):
        v = x[..., y : y + height, x0 : x0 + width].amax(dim=(-2, -1))
        total = total + v / (v.norm(dim=-1, keepdim=True) + eps)
    return total


# --------------------------------------------------------------------------------------------------
# CroW
#
# CroW is defined on ReLU maps: it counts *non-zero* activations and raises sums to fractional
# powers. Backbones ending in SiLU (EfficientNet) also output small negative values, which a ReLU
# would have zeroed; so every CroW function first clamps activations at 0 and "non-zero" means
# "> 0". On a ReLU backbone the clamp changes nothing.


def crow_spatial_weights(x: torch.Tensor, a: float = 2.0, b: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """CroW's spatial weights ``(N, H, W)``: ``S = (S' / ‖S'‖_a)^(1/b)`` with ``S' = Σ_c x``.

    Kalantidis, Mellina & Osindero, "Cross-dimensional Weighting for Aggregated Deep Convolutional
    Features" (ECCV Workshops 2016), §3.2: locations where many channels fire strongly are likely
    to hold the object; the a-norm normalisation (a=2) and the 1/b power (b=2) soften the map. A map
    with no positive activation at all (``‖S'‖ = 0``) gets all-zero weights instead of 0/0 = NaN.
    """
    response = x.clamp(min=0).sum(dim=1)
    norm = response.pow(a).sum(dim=(-2, -1), keepdim=True).pow(1.0 / a)
    return (response / norm.clamp(min=eps)).pow(1.0 / b)


def crow_channel_weights(x: torch.Tensor) -> torch.Tensor:
    """CroW's channel weights ``(N, C)``: ``β_k = log(Σ_j Ω_j / Ω_k)``, the log inverse sparsity.

    ``Ω_k`` is the fraction of positions where channel k is non-zero (here: > 0, see above). Rare
    channels — those that fire at few positions — are boosted, like an idf weighting of visual words
    (Kalantidis et al. 2016, §3.2). A channel with ``Ω_k = 0`` would give ``log(Σ/0) = ∞``, and
    ∞ · 0 = NaN in the output; as in the authors' reference code (yahoo/crow), its weight is set
    to 0. Its pooled response is 0 anyway, so any finite weight would give the same descriptor; 0
    keeps the weights themselves finite. If no channel fires at all, every weight is 0.
    """
    omega = (x > 0).to(x.dtype).mean(dim=(-2, -1))
    total = omega.sum(dim=1, keepdim=True)
    active = omega > 0
    safe = torch.where(active, omega, torch.ones_like(omega))
    return torch.where(active, torch.log(total / safe), torch.zeros_like(omega))


def crow(x: torch.Tensor, a: float = 2.0, b: float = 2.0) -> torch.Tensor:
    """Cross-dimensional weighting (Kalantidis, Mellina & Osindero, ECCVW 2016).

    ``f_k = β_k · Σ_{y,x} S(y, x) · x_k(y, x)``: sum pooling weighted spatially by
    :func:`crow_spatial_weights` and per channel by :func:`crow_channel_weights`, on activations
    clamped at 0 (see the note above). The paper then L2-normalises, PCA-whitens and normalises
    again; the whitening is a learned step handled elsewhere.
    """
    x = x.clamp(min=0)
    spatial = crow_spatial_weights(x, a, b)
    pooled = (x * spatial.unsqueeze(1)).sum(dim=(-2, -1))
    return crow_channel_weights(x) * pooled


# --------------------------------------------------------------------------------------------------
# Class-weighted convolutional features


def cam(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, classes: int = 5, eps: float = 1e-6) -> torch.Tensor:
    """Class-weighted features (Jiménez, Álvarez & Giró-i-Nieto, "Class-Weighted Convolutional
    Features for Visual Instance Search", BMVC 2017).

    The backbone's own ImageNet classifier (``weight (K, C)``, ``bias (K,)``, applied to the
    average-pooled map as the network classifies) picks the ``classes`` most probable classes; each
    one's class activation map ``CAM_c = Σ_k w_ck · x_k`` (Zhou et al. 2016), rescaled to [0, 1],
    weights the map, which is then sum-pooled into one vector per class. Those are L2-normalised
    and summed, so that every likely class votes equally; the paper's per-class PCA-whitening is a
    learned step handled elsewhere. Where a class's map is flat, it weighs every cell alike (0/0 is
    avoided by ``eps``).
    """
    logits = x.mean(dim=(-2, -1)) @ weight.T + bias
    top = logits.topk(min(classes, weight.shape[0]), dim=1).indices
    maps = torch.einsum("nkhw,nck->nchw", x, weight[top])
    low, high = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    maps = (maps - low) / (high - low).clamp(min=eps)
    per_class = torch.einsum("nchw,nkhw->nck", maps, x)
    return (per_class / (per_class.norm(dim=-1, keepdim=True) + eps)).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Pooling:
    """A pooling's torch function and what it is (:class:`~imgdb.features.pooling_kinds.PoolingKind`)."""

    fn: Callable[..., torch.Tensor]
    kind: PoolingKind

    @property
    def label(self) -> str:
        return self.kind.label

    @property
    def params(self) -> dict[str, int | float]:
        return self.kind.params

    @property
    def classifier(self) -> bool:
        return self.kind.classifier


_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gem": gem, "max": mac, "avg": average, "spoc": spoc, "rmac": rmac, "crow": crow, "cam": cam,
}
#: Pooling name in a spec → how to apply it.
POOLINGS: dict[str, Pooling] = {name: Pooling(_FUNCTIONS[name], kind) for name, kind in KINDS.items()}
