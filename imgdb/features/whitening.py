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
from imgdb.features.spec import take_int

#: Added to variances before whitening, so that near-empty directions are not blown up.
EPSILON = 1e-6
#: What ``whiten`` without ``dim`` reduces an encoding longer than MAX_INDEXED_DIM to (whitening is
#: learned with a reduction; 512 is what such a spec meant before whole encodings became the default).
DEFAULT_WHITENED_DIM = 512
#: ``dim=full``: the encoding kept whole, no PCA; the default. A PCA learned from a sample keeps
#: fewer components than the sample has images, and on photos it did not learn from a reduced VLAD
#: or Fisher vector loses to the whole one (RootSIFT-VLAD's codebook learned from 21 other images:
#: held-out copies mAP 0.623 at dim=512, 0.986 whole; benchmarks/codebook_sources.py). The cost is
#: room (4 bytes a dimension) and a first stage that takes any length (an index created without
#: ``--ann`` gets one: :func:`imgdb.ann.registry.default_for`).
FULL = "full"
#: An encoding this long or shorter is not spelled ``dim=full`` when whole (what pgvector's HNSW
#: indexes; longer whole encodings spell it, as indexes created before it was the default do).
MAX_INDEXED_DIM = 2000


def take_dim(options: dict[str, str]) -> int | str | None:
    """A spec's ``dim`` option, taken out of ``options``: a number, :data:`FULL`, or None (not given)."""
    if options.get("dim") == FULL:
        return options.pop("dim")
    return take_int(options, "dim", 0, minimum=0) or None


def reduction(raw: int, requested: int | str | None, whiten: bool) -> tuple[int | None, list[str]]:
    """The dimension an encoding of ``raw`` dimensions is reduced to (None: stored whole), and how a
    canonical spec spells the reduction (``dim=D``, ``dim=full``, ``whiten``)."""
    if requested == FULL:
        if whiten:
            raise ExtractorSpecError("whiten needs a reduction to learn: give dim=D, not dim=full")
        return None, [f"dim={FULL}"]
    if requested is None and raw > MAX_INDEXED_DIM:
        if not whiten:
            return None, [f"dim={FULL}"]
        requested = DEFAULT_WHITENED_DIM
    if requested is not None and int(requested) > raw:
        raise ExtractorSpecError(f"dim={requested} is more than the {raw} dimensions of the encoding")
    dim = None if requested is None else int(requested)
    return dim, ([f"dim={dim}"] if dim else []) + (["whiten"] if whiten else [])


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
