"""The poolings whose arithmetic is laid out from the map's size, torch-free: their geometry
(SPoC's centre prior, R-MAC's region grid) and the numpy pooling the ONNX runtime applies to the
map its graph returns.

A graph is traced once and must serve every image size; a Python loop over regions computed from
the map's height and width cannot be traced into it. The torch versions in
:mod:`imgdb.features.pooling` (training, the PyTorch runtime) use the same geometry from here, so
both runtimes pool over exactly the same cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

def spoc_centre_prior(h: int, w: int) -> np.ndarray:
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
    dy = np.arange(h, dtype=np.float64) - (h - 1) / 2.0
    dx = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    squared = dy[:, None] ** 2 + dx[None, :] ** 2
    return np.exp(-squared / (2.0 * sigma**2)).astype(np.float32)


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
    steps = np.asarray(_RMAC_STEPS, dtype=np.float32)
    b = (longer - side) / (steps - 1)
    distance = np.abs((side**2 - side * b) / side**2 - np.float32(overlap))
    return int(np.argmin(distance)) + 1


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


def spoc(x: np.ndarray, centre_prior: bool = True) -> np.ndarray:
    """:func:`imgdb.features.pooling.spoc` on a numpy map ``(N, C, H, W)``."""
    if not centre_prior:
        return x.sum(axis=(-2, -1))
    return (x * spoc_centre_prior(x.shape[-2], x.shape[-1])).sum(axis=(-2, -1))


def rmac(x: np.ndarray, levels: int = 3, overlap: float = 0.4, eps: float = 1e-6) -> np.ndarray:
    """:func:`imgdb.features.pooling.rmac` on a numpy map ``(N, C, H, W)``."""
    total = np.zeros(x.shape[:-2], dtype=x.dtype)
    for y, x0, height, width in rmac_regions(x.shape[-2], x.shape[-1], levels, overlap):
        v = x[..., y : y + height, x0 : x0 + width].max(axis=(-2, -1))
        total += v / (np.linalg.norm(v, axis=-1, keepdims=True) + eps)
    return total


#: The shape-dependent poolings of :data:`~imgdb.features.pooling_kinds.KINDS`, by name.
NUMPY_POOLINGS: Mapping[str, Callable[..., np.ndarray]] = {"spoc": spoc, "rmac": rmac}
