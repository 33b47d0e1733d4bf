"""SURF local features: Bay, Ess, Tuytelaars & Van Gool, "Speeded-Up Robust Features", CVIU 110(3), 2008.

SURF is patented-era "non-free" code in OpenCV's contrib modules and is missing from the PyPI wheels,
so it is rebuilt here from the paper with numpy and OpenCV primitives. Everything the paper computes
with box filters is a handful of look-ups into one integral image (section 2), so each step below is
vectorised over a whole filter layer, a whole set of candidates or a whole set of keypoints; Python
only loops over octaves and filter sizes.

Pipeline, with the paper's section numbers:

1. **Integral image** (section 2): any axis-aligned box sum costs four look-ups, whatever its size,
   which is what makes scaling the *filter* (instead of the image) affordable.
2. **Fast-Hessian detector** (3.1-3.3): box approximations ``Dxx, Dyy, Dxy`` of Gaussian second
   derivatives, ``det(H) ~ Dxx*Dyy - (0.9*Dxy)^2``; an octave is four filter sizes, the sampling
   step doubles every octave; 3x3x3 non-maximum suppression in (x, y, scale) and sub-sample
   refinement of position and scale with a 3-D quadratic (Brown & Lowe 2002).
3. **Orientation** (4.1, optional): the dominant direction of Haar responses around the keypoint.
4. **Descriptor** (4.2): sums of Haar responses ``(Σdx, Σdy, Σ|dx|, Σ|dy|)`` in a 4x4 grid of
   sub-regions, 64 numbers, unit length; plus the sign of the Laplacian (4.3) for cheap matching.

Conventions: pixel centres sit on integer coordinates (as in OpenCV keypoints), ``x`` is the column
and ``y`` the row, angles are measured from +x towards +y (i.e. clockwise on screen, since y points
down).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: det(H) threshold in the units of :func:`surf` (area-normalised box responses on [0, 1] intensities).
#: An isolated Gaussian blob of contrast ``c`` peaks at about ``0.032 * c**2`` whatever its size, so
#: 0.0004 keeps blobs down to a contrast of ~0.11 (~28 grey levels of 255); it is also the default of
#: OpenSURF (C. Evans), which normalises the same way.
DEFAULT_HESSIAN_THRESHOLD = 4e-4
#: Length of a SURF descriptor: 4x4 sub-regions x (Σdx, Σdy, Σ|dx|, Σ|dy|).
DESCRIPTOR_SIZE = 64

#: Section 3.3: the 9x9 box filter approximates a Gaussian of σ = 1.2, and σ grows with the filter size.
_SIGMA_PER_FILTER_SIZE = 1.2 / 9
#: Section 3.2: relative weight of Dxy, |Lxy(1.2)|_F |Dyy(9)|_F / (|Lyy(1.2)|_F |Dxy(9)|_F) ≈ 0.912.
_DXY_WEIGHT = 0.9
_LAYERS_PER_OCTAVE = 4
#: Section 4.2: 20s x 20s window, 4x4 sub-regions of 5x5 regularly spaced samples (spacing s).
_GRID = 4
_SAMPLES_PER_REGION = 5
_DESCRIPTOR_SIGMA = 3.3
#: Section 4.1: samples at spacing s within radius 6s, Gaussian σ = 2s, sliding window of π/3.
_ORIENTATION_RADIUS = 6
_ORIENTATION_SIGMA = 2.0
_ORIENTATION_WINDOW = np.pi / 3
#: Start angles tried for the sliding orientation window (5° apart); a multiple of 6 so that the
#: π/3 window spans a whole number of steps.
_ORIENTATION_WINDOWS = 72


@dataclass(frozen=True)
class SurfKeypoints:
    """SURF interest points, one row per keypoint, in the order of the descriptor rows."""

    #: ``(n, 2)`` float32 pixel coordinates ``(x, y)``, pixel centres on integers.
    xy: np.ndarray
    #: ``(n,)`` float32 scale ``s = 1.2 L / 9`` in pixels for (interpolated) filter size ``L``: the σ the
    #: paper assigns to the box filters, and the unit of the descriptor window. The boxes are in fact
    #: blurrier than that Gaussian, so an isolated Gaussian blob of σ_b is found at s ≈ 0.7 σ_b.
    scale: np.ndarray
    #: ``(n,)`` float32 det(H) at the interpolated keypoint, in :func:`surf`'s threshold units (the
    #: threshold itself applies to the sampled maximum the keypoint was refined from).
    response: np.ndarray
    #: ``(n,)`` int8 sign of the Laplacian (trace of H): -1 for a bright blob on a dark background.
    laplacian: np.ndarray
    #: ``(n,)`` float32 orientation in radians; 0 for upright (U-SURF) keypoints.
    angle: np.ndarray

    def __len__(self) -> int:
        return len(self.scale)


def surf(
    gray: np.ndarray,
    *,
    hessian_threshold: float = DEFAULT_HESSIAN_THRESHOLD,
    octaves: int = 4,
    max_keypoints: int | None = None,
    upright: bool = True,
) -> tuple[SurfKeypoints, np.ndarray]:
    """Detect SURF keypoints in a grey image and describe them.

    ``gray`` is a 2-D ``uint8`` array (read as intensity/255) or a floating array already on a [0, 1]
    scale. ``hessian_threshold`` applies to det(H) of the box responses normalised by the filter
    area, on those [0, 1] intensities: the area normalisation makes the responses scale-normalised
    second derivatives (section 3.3), so the threshold means the same contrast at every scale, and
    det(H) grows with the square of the contrast. (OpenCV's ``hessianThreshold`` works on 0..255
    intensities: divide it by 255² ≈ 65025 to compare.)

    ``octaves`` filter-size octaves are searched (section 3.3: 4 cover scales s of 1.6 to ~23 px).
    Keypoints come strongest (largest det(H)) first; ``max_keypoints`` keeps only that many.
    ``upright=True`` is U-SURF (section 4.2): no orientation, faster and more distinctive while the
    camera stays roughly upright (the paper reports robustness to about ±15°); ``upright=False``
    assigns each keypoint its dominant orientation (section 4.1) and rotates the descriptor with it.

    Returns the keypoints and their ``(n, 64)`` float32 unit-length descriptors.
    """
    image = _as_unit_float(gray)
    if octaves < 1:
        raise ValueError(f"octaves must be at least 1, got {octaves}")
    if hessian_threshold < 0:
        raise ValueError(f"hessian_threshold must not be negative, got {hessian_threshold}")
    if max_keypoints is not None and max_keypoints < 0:
        raise ValueError(f"max_keypoints must not be negative, got {max_keypoints}")

    integral = cv2.integral(image, sdepth=cv2.CV_64F)
    xy, scale, response, laplacian = _fast_hessian(integral, octaves, hessian_threshold)
    order = np.argsort(-response, kind="stable")[:max_keypoints]
    xy, scale, response, laplacian = xy[order], scale[order], response[order], laplacian[order]
    angle = np.zeros(len(scale)) if upright else _orientations(integral, xy, scale)
    descriptors = _descriptors(integral, xy, scale, angle)
    keypoints = SurfKeypoints(
        xy=xy.astype(np.float32),
        scale=scale.astype(np.float32),
        response=response.astype(np.float32),
        laplacian=laplacian.astype(np.int8),
        angle=angle.astype(np.float32),
    )
    return keypoints, descriptors


def filter_sizes(octave: int) -> tuple[int, ...]:
    """The box-filter sizes of ``octave`` (1-based), section 3.3.

    Octave 1 is 9, 15, 21, 27; each further octave doubles the size increase (6, 12, 24, ...) and
    starts at the second size of the previous one, so octaves overlap and every scale is covered
    continuously. All sizes are odd multiples of 3 (the lobe length L/3 is odd), so every filter has a
    central pixel.
    """
    return tuple(3 * (2**octave * k + 1) for k in range(1, _LAYERS_PER_OCTAVE + 1))


def hessian_layer(integral: np.ndarray, size: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """det(H) and trace(H) of the ``size`` box filters at every ``step``-th pixel (sections 3.1-3.2).

    ``integral`` is :func:`cv2.integral`'s ``(H+1, W+1)`` output. The result has one value per
    sampled pixel, ``(ceil(H/step), ceil(W/step))``. Each response is divided by the filter area
    ``size²`` (section 3.3: "the filter responses are normalised with respect to their size"), which
    makes them scale-normalised, so responses of different sizes can compete in the scale-space
    maximum search. Pixels outside the image count as 0: near the border the values are not
    meaningful, and :func:`surf` keeps no extremum whose filters leave the image.
    """
    lobe = size // 3
    half = size // 2
    mid = lobe // 2
    margin = half + 1
    # Edge-padding the integral image clamps look-ups to the image, so every box sum below is a
    # plain strided slice.
    padded = np.pad(integral, margin, mode="edge")
    rows = -(-(integral.shape[0] - 1) // step)
    cols = -(-(integral.shape[1] - 1) // step)

    def corner(dy: int, dx: int) -> np.ndarray:
        r, c = margin + dy, margin + dx
        return padded[r : r + step * rows : step, c : c + step * cols : step]

    def box(top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """Sum of pixels (y+top .. y+bottom-1, x+left .. x+right-1) around every sampled (x, y)."""
        return corner(bottom, right) - corner(top, right) - corner(bottom, left) + corner(top, left)

    # Fig. 1: Dyy has three stacked lobes of `lobe` rows and 2*lobe-1 columns, weighted +1, -2, +1
    # (the whole box minus three times the middle lobe); Dxx is its transpose; Dxy has four
    # lobe x lobe squares one pixel off the centre lines, +1 on the diagonal, -1 off it.
    dxx = box(1 - lobe, lobe, -half, half + 1) - 3 * box(1 - lobe, lobe, -mid, mid + 1)
    dyy = box(-half, half + 1, 1 - lobe, lobe) - 3 * box(-mid, mid + 1, 1 - lobe, lobe)
    dxy = (
        box(-lobe, 0, -lobe, 0)
        + box(1, lobe + 1, 1, lobe + 1)
        - box(-lobe, 0, 1, lobe + 1)
        - box(1, lobe + 1, -lobe, 0)
    )
    area = float(size * size)
    dxx /= area
    dyy /= area
    dxy /= area
    return dxx * dyy - (_DXY_WEIGHT * dxy) ** 2, dxx + dyy


def _as_unit_float(gray: np.ndarray) -> np.ndarray:
    """The image as float32 on [0, 1], the scale the Hessian threshold is defined on."""
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {gray.shape}")
    if gray.dtype == np.uint8:
        return gray.astype(np.float32) / 255.0
    if np.issubdtype(gray.dtype, np.floating):
        return np.ascontiguousarray(gray, dtype=np.float32)
    raise TypeError(f"expected a uint8 or floating image, got {gray.dtype}")


def _fast_hessian(
    integral: np.ndarray, octaves: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scale-space maxima of det(H) (section 3.3-3.4): positions, scales, responses, Laplacian signs.

    Within an octave all four layers are sampled on the same grid (step 2^(octave-1)), so the 3x3x3
    neighbourhood of a middle-layer sample is a plain index window; only the two middle layers can be
    maxima, because the outer ones lack a neighbour in scale — that is why octaves overlap.
    """
    height, width = integral.shape[0] - 1, integral.shape[1] - 1
    found: list[tuple[np.ndarray, ...]] = []
    ring = np.ones((3, 3), np.uint8)
    ring[1, 1] = 0
    for octave in range(1, octaves + 1):
        step = 2 ** (octave - 1)
        sizes = filter_sizes(octave)
        if -(-height // step) < 3 or -(-width // step) < 3:
            break
        layers = [hessian_layer(integral, size, step) for size in sizes]
        det = np.stack([d for d, _ in layers])
        for i in (1, 2):
            # Every filter of the 3x3x3 neighbourhood, the largest included, must lie inside the
            # image: zero padding outside it would fake strong responses along the border.
            margin = sizes[i + 1] // 2 + step
            ys = np.arange(det.shape[1]) * step
            xs = np.arange(det.shape[2]) * step
            inside = ((ys >= margin) & (ys <= height - 1 - margin))[:, None] & (
                (xs >= margin) & (xs <= width - 1 - margin)
            )[None, :]
            centre = det[i]
            is_max = (
                inside
                & (centre > threshold)
                & (centre > cv2.dilate(centre, ring))
                & (centre > cv2.dilate(det[i - 1], None))
                & (centre > cv2.dilate(det[i + 1], None))
            )
            r, c = np.nonzero(is_max)
            offset, value = _refine(det, i, r, c)
            keep = np.all(np.abs(offset) < 0.5, axis=1)
            r, c, offset, value = r[keep], c[keep], offset[keep], value[keep]
            xy = np.stack([(c + offset[:, 0]) * step, (r + offset[:, 1]) * step], axis=1)
            size = sizes[i] + offset[:, 2] * (sizes[i + 1] - sizes[i])
            trace = layers[i][1][r, c]
            found.append((xy, _SIGMA_PER_FILTER_SIZE * size, value, np.where(trace >= 0, 1, -1)))
    if not found:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0, np.int8)
    xy, scale, response, laplacian = (np.concatenate(parts) for parts in zip(*found))
    return xy, scale, response, laplacian


def _refine(det: np.ndarray, i: int, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brown & Lowe's sub-sample refinement of the maxima (layer ``i``, rows ``r``, columns ``c``).

    Section 3.4: fit a 3-D quadratic to det(H) around each maximum by finite differences and move to
    its vertex, ``offset = -H⁻¹ g`` in (x, y, layer) sample units. Returns the offsets (callers keep
    those under half a sample: larger ones mean the true maximum belongs to another sample) and the
    interpolated det(H), ``D + g·offset / 2``. Singular fits give non-finite offsets, which fail
    that test too.
    """

    def at(ds: int, dy: int, dx: int) -> np.ndarray:
        return det[i + ds, r + dy, c + dx]

    value = at(0, 0, 0)
    grad = np.stack(
        [
            (at(0, 0, 1) - at(0, 0, -1)) / 2,
            (at(0, 1, 0) - at(0, -1, 0)) / 2,
            (at(1, 0, 0) - at(-1, 0, 0)) / 2,
        ],
        axis=1,
    )
    dxx = at(0, 0, 1) + at(0, 0, -1) - 2 * value
    dyy = at(0, 1, 0) + at(0, -1, 0) - 2 * value
    dss = at(1, 0, 0) + at(-1, 0, 0) - 2 * value
    dxy = (at(0, 1, 1) - at(0, 1, -1) - at(0, -1, 1) + at(0, -1, -1)) / 4
    dxs = (at(1, 0, 1) - at(1, 0, -1) - at(-1, 0, 1) + at(-1, 0, -1)) / 4
    dys = (at(1, 1, 0) - at(1, -1, 0) - at(-1, 1, 0) + at(-1, -1, 0)) / 4
    a = np.stack([dxx, dxy, dxs], axis=1)
    b = np.stack([dxy, dyy, dys], axis=1)
    d = np.stack([dxs, dys, dss], axis=1)
    # Inverse of a symmetric 3x3 matrix with rows a, b, d: its adjugate's rows are the pairwise cross
    # products, divided by the determinant. Closed form, so a singular fit yields inf/nan instead of
    # aborting the whole batch as np.linalg.solve would.
    adjugate = np.stack([np.cross(b, d), np.cross(d, a), np.cross(a, b)], axis=1)
    determinant = np.einsum("ij,ij->i", a, adjugate[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = -np.einsum("nij,nj->ni", adjugate, grad) / determinant[:, None]
        refined = value + 0.5 * np.einsum("ij,ij->i", grad, offset)
    return offset, refined


def _haar(
    integral: np.ndarray, x: np.ndarray, y: np.ndarray, half: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Haar wavelet responses (dx, dy) of side ``2*half`` centred on the points (x, y).

    Arrays broadcast together. Box edges fall on pixel boundaries, so the centre is rounded to the
    nearest boundary (``round(p + 0.5)`` in integral-image indices); look-ups are clamped to the
    image, i.e. pixels outside it count as 0. dx is right half minus left half, dy bottom minus top.
    """
    rows, cols = integral.shape[0] - 1, integral.shape[1] - 1
    cy = np.rint(y + 0.5).astype(np.intp)
    cx = np.rint(x + 0.5).astype(np.intp)
    top, bottom = np.clip(cy - half, 0, rows), np.clip(cy + half, 0, rows)
    left, right = np.clip(cx - half, 0, cols), np.clip(cx + half, 0, cols)
    mid_y, mid_x = np.clip(cy, 0, rows), np.clip(cx, 0, cols)

    def box(t: np.ndarray, b: np.ndarray, l: np.ndarray, r: np.ndarray) -> np.ndarray:
        return integral[b, r] - integral[t, r] - integral[b, l] + integral[t, l]

    dx = box(top, bottom, mid_x, right) - box(top, bottom, left, mid_x)
    dy = box(mid_y, bottom, left, right) - box(top, mid_y, left, right)
    return dx, dy


def _orientations(integral: np.ndarray, xy: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Dominant orientation per keypoint (section 4.1), radians.

    Haar responses of side 4s at spacing s within radius 6s, Gaussian-weighted (σ = 2s), are points
    in the (dx, dy) plane; a window of π/3 slides round the circle, and the longest vector sum of the
    responses inside it gives the orientation. Summing vectors over a sector rather than picking
    the single strongest response is what averages out noise from individual samples.
    """
    if len(scale) == 0:
        return np.zeros(0)
    span = np.arange(-_ORIENTATION_RADIUS, _ORIENTATION_RADIUS + 1)
    u, v = np.meshgrid(span, span)
    disc = u**2 + v**2 < _ORIENTATION_RADIUS**2
    u, v = u[disc].astype(np.float64), v[disc].astype(np.float64)
    weight = np.exp(-(u**2 + v**2) / (2 * _ORIENTATION_SIGMA**2))
    s = scale[:, None]
    half = np.maximum(1, np.rint(2 * s)).astype(np.intp)
    dx, dy = _haar(integral, xy[:, :1] + u * s, xy[:, 1:] + v * s, half)
    dx, dy = dx * weight, dy * weight
    # Window starts are multiples of 2π/K and the window spans K/6 such steps, so a response's
    # membership depends only on which 2π/K bin its angle falls in: per-bin sums plus a circular
    # running sum give every window exactly, in O(n·K) instead of O(n·K·samples).
    bins = _ORIENTATION_WINDOWS
    width = bins // 6
    turns = np.mod(np.arctan2(dy, dx), 2 * np.pi) / (2 * np.pi)
    index = np.minimum((turns * bins).astype(np.intp), bins - 1) + np.arange(len(scale))[:, None] * bins

    def window_sums(values: np.ndarray) -> np.ndarray:
        per_bin = np.bincount(index.ravel(), weights=values.ravel(), minlength=len(scale) * bins)
        per_bin = per_bin.reshape(len(scale), bins)
        wrapped = np.concatenate([np.zeros((len(scale), 1)), per_bin, per_bin[:, : width - 1]], axis=1)
        running = np.cumsum(wrapped, axis=1)
        return running[:, width:] - running[:, :bins]

    sum_x, sum_y = window_sums(dx), window_sums(dy)
    best = np.argmax(sum_x**2 + sum_y**2, axis=1)
    rows = np.arange(len(scale))
    return np.arctan2(sum_y[rows, best], sum_x[rows, best])


def _descriptors(integral: np.ndarray, xy: np.ndarray, scale: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """64-D SURF descriptors (section 4.2), float32, unit length.

    A 20s x 20s window, rotated by ``angle``, is sampled at 20x20 points (spacing s); at each point
    the Haar responses of side 2s are computed on the image axes and rotated into the window's frame
    (as OpenSURF and OpenCV do: rotating the image patch would cost an interpolation per sample), weighted
    by a Gaussian of σ = 3.3s centred on the keypoint (robustness to misregistration), and summed per
    5x5-sample sub-region as (Σdx, Σdy, Σ|dx|, Σ|dy|): the absolute sums tell apart regions whose
    signed sums cancel (e.g. a stripe from a uniform patch). Unit length gives invariance to contrast.
    """
    n = len(scale)
    if n == 0:
        return np.zeros((0, DESCRIPTOR_SIZE), np.float32)
    side = _GRID * _SAMPLES_PER_REGION
    offsets = np.arange(side) - (side - 1) / 2  # -9.5 .. 9.5, sample centres in units of s
    v, u = np.meshgrid(offsets, offsets, indexing="ij")
    u, v = u.ravel(), v.ravel()
    weight = np.exp(-(u**2 + v**2) / (2 * _DESCRIPTOR_SIGMA**2))
    s = scale[:, None]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x = xy[:, :1] + s * (u * cos - v * sin)
    y = xy[:, 1:] + s * (u * sin + v * cos)
    half = np.maximum(1, np.rint(s)).astype(np.intp)
    dx, dy = _haar(integral, x, y, half)
    along = (dx * cos + dy * sin) * weight
    across = (dy * cos - dx * sin) * weight
    # (n, 400) in row-major sample order -> (n, region row, sample row, region col, sample col).
    shape = (n, _GRID, _SAMPLES_PER_REGION, _GRID, _SAMPLES_PER_REGION)
    along, across = along.reshape(shape), across.reshape(shape)
    parts = [along, across, np.abs(along), np.abs(across)]
    descriptor = np.stack([p.sum(axis=(2, 4)) for p in parts], axis=-1).reshape(n, DESCRIPTOR_SIZE)
    norm = np.linalg.norm(descriptor, axis=1, keepdims=True)
    return (descriptor / np.maximum(norm, 1e-12)).astype(np.float32)
