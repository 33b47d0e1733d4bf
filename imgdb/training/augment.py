"""Synthetic "photos of a picture": what a phone in a gallery does to a reference image.

Fine-tuning without labels (:mod:`imgdb.training.trainer`) needs positives: other views of the
same picture. They are made here from the reference image alone, each step a thing real query photos
show: a wall and a frame around the picture, a perspective (the photographer is never square to the
wall) with a slight rotation, a crop that misses or adds a margin, colour and lighting casts (warm
bulbs, a gradient across the canvas, a glare spot), defocus or shake, sensor noise, and JPEG.
Everything is OpenCV/numpy on uint8 RGB arrays and drawn from the given generator, so a seed gives
the same views.
"""

from __future__ import annotations

import cv2
import numpy as np


def photo_of(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random photo-like view of an ``(H, W, 3)`` uint8 RGB image, about the same size."""
    view = pixels
    if rng.random() < 0.6:
        view = _on_a_wall(view, rng)
    view = _perspective(view, rng)
    view = _crop(view, rng)
    view = _light(view, rng)
    if rng.random() < 0.5:
        view = _blur(view, rng)
    if rng.random() < 0.5:
        view = _noise(view, rng)
    if rng.random() < 0.7:
        view = _jpeg(view, rng)
    return view


def _wall_colour(rng: np.random.Generator) -> np.ndarray:
    """A muted wall colour (white, grey, beige, or a painted wall's darker tone)."""
    base = rng.uniform(40, 245)
    tint = rng.normal(0, 18, 3)
    return np.clip(base + tint, 0, 255)


def _on_a_wall(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The picture in a frame, on a wall: a canvas 10-70% larger, the picture somewhere near its middle."""
    h, w = pixels.shape[:2]
    frame = int(round(min(h, w) * rng.uniform(0.0, 0.08)))
    framed = pixels
    if frame > 0:
        colour = rng.uniform(0, 255, 3) if rng.random() < 0.5 else np.full(3, rng.uniform(10, 80))
        framed = cv2.copyMakeBorder(pixels, frame, frame, frame, frame, cv2.BORDER_CONSTANT, value=colour.tolist())
    fh, fw = framed.shape[:2]
    grow = rng.uniform(1.1, 1.7)
    ch, cw = int(fh * grow), int(fw * grow * rng.uniform(0.9, 1.1))
    cw = max(cw, fw + 2)
    wall = np.empty((ch, cw, 3), np.float32)
    wall[:] = _wall_colour(rng)
    wall += rng.normal(0, rng.uniform(0, 6), wall.shape).astype(np.float32)  # plaster, paper texture
    y = int(rng.uniform(0.2, 0.8) * (ch - fh))
    x = int(rng.uniform(0.2, 0.8) * (cw - fw))
    canvas = np.clip(wall, 0, 255).astype(np.uint8)
    canvas[y:y + fh, x:x + fw] = framed
    return canvas


def _perspective(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A homography: each corner moved by up to 12% of the side, then a rotation of up to 8°."""
    h, w = pixels.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    strength = rng.uniform(0.0, 0.12)
    moved = corners + rng.uniform(-strength, strength, (4, 2)).astype(np.float32) * np.float32([w, h])
    angle = np.deg2rad(rng.uniform(-8, 8))
    centre = np.float32([w / 2, h / 2])
    rotation = np.float32([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (moved - centre) @ rotation.T + centre
    moved -= moved.min(axis=0)
    out_w, out_h = (int(v) + 1 for v in moved.max(axis=0))
    matrix = cv2.getPerspectiveTransform(corners, moved.astype(np.float32))
    return cv2.warpPerspective(pixels, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _crop(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop keeping 65-100% of each side (a photo that cuts a margin off, or frames it tight)."""
    h, w = pixels.shape[:2]
    ch, cw = max(8, int(h * rng.uniform(0.65, 1.0))), max(8, int(w * rng.uniform(0.65, 1.0)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return pixels[y:y + ch, x:x + cw]


def _light(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour cast, exposure, contrast and gamma, a lighting gradient, sometimes a glare spot."""
    h, w = pixels.shape[:2]
    x = pixels.astype(np.float32) / 255.0
    x *= rng.uniform(0.8, 1.2, 3).astype(np.float32)  # white balance
    x = (x - 0.5) * rng.uniform(0.7, 1.2) + 0.5 + rng.uniform(-0.12, 0.12)  # contrast, exposure
    x = np.clip(x, 0, 1) ** rng.uniform(0.7, 1.4)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(angle) * (xx / w - 0.5) + np.sin(angle) * (yy / h - 0.5)) * rng.uniform(0, 0.5)
    x *= (1 + ramp)[..., None]
    if rng.random() < 0.3:  # glare on varnish or glass
        cy, cx, radius = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.25) * min(h, w)
        glare = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2)) * rng.uniform(0.2, 0.7)
        x += glare[..., None]
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def _blur(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Defocus (Gaussian) or camera shake (a short line kernel)."""
    if rng.random() < 0.7:
        return cv2.GaussianBlur(pixels, (0, 0), rng.uniform(0.3, 1.6))
    length = int(rng.integers(3, 8))
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2] = 1.0 / length
    rotation = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), rng.uniform(0, 180), 1.0)
    kernel = cv2.warpAffine(kernel, rotation, (length, length))
    return cv2.filter2D(pixels, -1, kernel / max(kernel.sum(), 1e-6))


def _noise(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = pixels.astype(np.float32) + rng.normal(0, rng.uniform(1, 7), pixels.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(35, 95))
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # (an encoder that refuses: keep the view as it is)
        return pixels
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
