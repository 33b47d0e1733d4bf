"""Global pooling of a CNN feature map ``(N, C, H, W)`` into one vector per image ``(N, C)``.

Pure functions, so that the maths is testable without a network; the CNN extractor only composes
them. Normalisation of the final vector is left to the pipeline; a pooling whose *definition*
normalises intermediate parts (R-MAC's per-region L2) does that itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

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


# --------------------------------------------------------------------------------------------------
# SPoC


def spoc_centre_prior(h: int, w: int) -> torch.Tensor:
    """SPoC's centre prior, an ``(h, w)`` map of Gaussian weights peaking (at 1) in the middle.

    Babenko & Lempitsky, "Aggregating Deep Convolutional Features for Image Retrieval" (ICCV 2015),
    §3.2: ``α(x, y) = exp(-((y - H/2)² + (x - W/2)²) / (2σ²))`` with σ one third of the distance
    from the centre to the closest boundary, i.e. ``σ = min(H, W) / 6``. Objects of interest tend to
    sit near the middle of a photo, so central activations are trusted more than those at the edges.

    Coordinates are those of cell *centres*: cell ``(i, j)`` (0-based) lies at ``(i + ½, j + ½)``, so
    the offsets from the centre are ``i - (H-1)/2`` and ``j - (W-1)/2`` (as in PyRetri's SPoC). With
    raw 0-based indices the prior would be shifted by half a cell towards the bottom right and lose
    its symmetry; with this convention it is symmetric and the central cell of an odd-sized map
    weighs exactly 1.
    """
    sigma = min(h, w) / 6.0
    dy = torch.arange(h, dtype=torch.float64) - (h - 1) / 2.0
    dx = torch.arange(w, dtype=torch.float64) - (w - 1) / 2.0
    squared = dy[:, None] ** 2 + dx[None, :] ** 2
    return torch.exp(-squared / (2.0 * sigma**2)).float()


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

#: Numbers of level-1 regions tried along the longer side of the map (the reference code's ``steps``).
_RMAC_STEPS = (2, 3, 4, 5, 6, 7)


def _rmac_extra_regions(h: int, w: int, overlap: float) -> int:
    """How many regions, beyond ``l`` at level ``l``, the longer side gets (0 for a square map).

    At level 1 the regions are ``side = min(H, W)`` squares; with ``n`` of them spread evenly along
    the longer side ``L`` the step between consecutive ones is ``b = (L - side) / (n - 1)`` and they
    overlap by ``(side² - side·b) / side²`` of their area. The ``n`` in 2..7 whose overlap is closest
    to ``overlap`` wins. This is computed exactly as in the reference code (float32, first minimum
    on ties) so that the grid matches it region for region.
    """
    if h == w:
        return 0
    side, longer = min(h, w), max(h, w)
    steps = torch.tensor(_RMAC_STEPS, dtype=torch.float32)
    b = (longer - side) / (steps - 1)
    distance = torch.abs((side**2 - side * b) / side**2 - overlap)
    return int(torch.argmin(distance).item()) + 1


def _rmac_starts(length: int, side: int, count: int) -> list[int]:
    """Offsets of ``count`` windows of ``side`` cells spread evenly over ``length`` cells.

    The reference computes ``floor(wl2 + k·b) - wl2`` with ``b = (length - side) / (count - 1)`` and
    an integer ``wl2``, which is ``floor(k·b)``: done here in integer arithmetic, so that no float
    rounding can move a window by a cell. The first window starts at 0 and the last ends at ``length``.
    (The reference computes it in float32, where ``k·b`` can land just below an integer: on maps
    more than about 3.5 times wider than tall, e.g. 9×35, one of its windows then starts a cell
    early and the last column is never covered at that level. Grids are otherwise identical.)
    """
    if count == 1:
        return [0]
    return [k * (length - side) // (count - 1) for k in range(count)]


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC's regions on an ``h × w`` map, as ``(y, x, height, width)`` in cells (0-based).

    Tolias, Sicre & Jégou, "Particular object retrieval with integral max-pooling of CNN
    activations" (ICLR 2016), §3: at scale ``l = 1..L`` square regions of side
    ``floor(2·min(H, W) / (l + 1))`` are laid out uniformly, ``l`` of them along the shorter side
    and ``l + m`` along the longer one, where ``m`` (see :func:`_rmac_extra_regions`) makes
    consecutive level-1 regions overlap by as close to 40% as possible. Regions at a scale touch
    both borders. So at l=1 the largest square regions, at l=2 some 2×2+, at l=3 some 3×3+: a
    multi-scale grid that lets a small object dominate at least one region vector.

    Following the reference implementation (Radenović's cnnimageretrieval-pytorch,
    ``cirtorch.layers.functional.rmac``, which ports Tolias's MATLAB code), the *whole map* comes
    first as an extra region ``(0, 0, h, w)``: the paper's grid is ``rmac_regions(...)[1:]``.
    Regions whose side rounds down to 0 cells (tiny maps at deep levels) are skipped, as there.
    Order: whole map, then level by level, rows (y) outer and columns (x) inner.
    """
    side = min(h, w)
    extra = _rmac_extra_regions(h, w, overlap)
    extra_h, extra_w = (extra, 0) if h > w else (0, extra)
    regions = [(0, 0, h, w)]
    for level in range(1, levels + 1):
        size = math.floor(2 * side / (level + 1))
        if size == 0:
            continue
        ys = _rmac_starts(h, size, level + extra_h)
        xs = _rmac_starts(w, size, level + extra_w)
        regions.extend((y, x, size, size) for y in ys for x in xs)
    return regions


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
    """A pooling as a spec names it: its function, and the spec options it takes with their defaults.

    Each option is passed to ``fn`` as the keyword of the same name; the type of its default (int or
    float) is the type the spec parser expects. ``classifier``: ``fn`` also takes the backbone's
    ImageNet classifier (``weight``, ``bias``), so it pools the last map only.
    """

    fn: Callable[..., torch.Tensor]
    label: str
    params: dict[str, int | float] = field(default_factory=dict)
    classifier: bool = False


#: Pooling name in a spec → how to apply it.
POOLINGS: dict[str, Pooling] = {
    "gem": Pooling(gem, "GeM (generalised mean, p=3)", {"p": 3.0}),
    "max": Pooling(mac, "MAC (max)"),
    "avg": Pooling(average, "average"),
    "spoc": Pooling(spoc, "SPoC (sum with a centre prior)"),
    "rmac": Pooling(rmac, "R-MAC (regional max, 3 scales)", {"levels": 3}),
    "crow": Pooling(crow, "CroW (cross-dimensional weighting)", {"a": 2.0, "b": 2.0}),
    "cam": Pooling(cam, "class-weighted (CAMs of the 5 likeliest ImageNet classes)", {"classes": 5}, classifier=True),
}
