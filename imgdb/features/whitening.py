"""Learned linear projections of global descriptors: PCA, optionally whitened.

Two plain functions, shared by every extractor that learns one: :func:`learn_projection` fits it on
a sample of the collection's descriptors, :func:`project` applies it. Whitening (Jégou & Chum,
ECCV 2012) divides each principal component by its standard deviation, so that directions shared by
the whole collection (bursty, co-occurring features) stop dominating distances. A sample smaller
than the wanted dimension learns fewer components; the rest of the output stays zero, so stored
vectors keep the index's fixed dimension.
"""

from __future__ import annotations

import numpy as np

from imgdb.errors import ExtractorSpecError

#: Added to variances before whitening, so that near-empty directions are not blown up.
EPSILON = 1e-6
#: pgvector indexes ``vector`` columns of up to this many dimensions.
MAX_INDEXED_DIM = 2000
#: What encodings longer than MAX_INDEXED_DIM are reduced to when their spec does not say.
DEFAULT_REDUCED_DIM = 512


def reduced_dim(raw: int, requested: int | None) -> int | None:
    """The dimension an encoding of ``raw`` dimensions is reduced to (None: stored as it is)."""
    if requested is None and raw > MAX_INDEXED_DIM:
        return DEFAULT_REDUCED_DIM
    if requested is not None and requested > raw:
        raise ExtractorSpecError(f"dim={requested} is more than the {raw} dimensions of the encoding")
    return requested


def reduction_options(dim: int | None, whiten: bool) -> list[str]:
    """How a reduction is spelled in a canonical spec (``dim=D``, ``whiten``)."""
    return ([f"dim={dim}"] if dim else []) + (["whiten"] if whiten else [])


def learn_projection(x: np.ndarray, dim: int, *, whiten: bool, prefix: str = "pca_") -> dict[str, np.ndarray]:
    """PCA of the rows of ``x`` keeping at most ``dim`` components: ``{prefix}mean``,
    ``{prefix}components`` and ``{prefix}scale`` as arrays, ready to be stored with an index (the
    prefix tells several projections of one extractor apart)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    # SVD of the centred sample: components are the right singular vectors, variances s²/(n-1).
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    keep = min(dim, len(x) - 1, x.shape[1])
    variance = singular[:keep] ** 2 / max(len(x) - 1, 1)
    scale = 1 / np.sqrt(variance + EPSILON) if whiten else np.ones(keep)
    return {
        f"{prefix}mean": mean.astype(np.float32),
        f"{prefix}components": vt[:keep].astype(np.float32),
        f"{prefix}scale": scale.astype(np.float32),
    }


def project(x: np.ndarray, state: dict[str, np.ndarray], dim: int, prefix: str = "pca_") -> np.ndarray:
    """Apply a learned projection to rows of ``x``; the output has ``dim`` columns."""
    out = ((x - state[f"{prefix}mean"]) @ state[f"{prefix}components"].T) * state[f"{prefix}scale"]
    return np.pad(out, ((0, 0), (0, dim - out.shape[1]))).astype(np.float32)
