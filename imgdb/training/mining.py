"""Hard negatives: for each query view, the nearest images of the collection that are not it.

Radenović et al. mine negatives from the current network's own descriptors and refresh them each
epoch: the images the network confuses now are the ones worth learning from. ``positives`` says,
per query, which gallery rows must never be its negatives (its own image, and any other image known
to show the same thing).
"""

from __future__ import annotations

import numpy as np


def hard_negatives(queries: np.ndarray, gallery: np.ndarray, positives: list[set[int]], count: int) -> np.ndarray:
    """``(Q, count)`` gallery rows nearest each query among those not in its ``positives``.

    Descriptors are unit length, so the largest dot product is the nearest. Raises ValueError when
    a query has fewer than ``count`` rows to choose from.
    """
    if any(len(gallery) - len(p) < count for p in positives):
        raise ValueError(f"a query has fewer than {count} gallery images that are not its positives")
    similarity = queries @ gallery.T
    for row, excluded in enumerate(positives):
        similarity[row, list(excluded)] = -np.inf
    top = np.argpartition(-similarity, count - 1, axis=1)[:, :count]
    order = np.take_along_axis(similarity, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)
