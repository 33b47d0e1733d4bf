"""Encoding a set of local descriptors as one vector over a codebook learned from the collection.

Pure functions: training (k-means, diagonal GMM) and encoding (bag of visual words with tf-idf,
VLAD, Fisher vectors), each exactly as its paper defines it, so that each can be checked by hand.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

#: Descriptors used to learn a codebook at most. On the museum set, RootSIFT-VLAD learned from all
#: 574k gallery descriptors reaches mAP 0.992 against 0.978 from a 200k subsample.
MAX_TRAINING_DESCRIPTORS = 1_000_000


def training_sample(descriptor_sets: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """All descriptors of the sample images, subsampled uniformly to MAX_TRAINING_DESCRIPTORS."""
    stacked = np.concatenate([d for d in descriptor_sets if len(d)], axis=0)
    if len(stacked) > MAX_TRAINING_DESCRIPTORS:
        rows = np.random.default_rng(seed).choice(len(stacked), MAX_TRAINING_DESCRIPTORS, replace=False)
        stacked = stacked[rows]
    return stacked.astype(np.float32)


def learn_kmeans(descriptors: np.ndarray, k: int, seed: int = 0, restarts: int = 1) -> np.ndarray:
    """k visual words (cluster centres), ``(k, d)``: the best of ``restarts`` runs (a small codebook
    of dense descriptors retrieves differently from one start to the next; more runs steady it)."""
    if len(descriptors) < k:
        raise ValueError(f"{len(descriptors)} descriptors cannot train {k} visual words")
    model = KMeans(n_clusters=k, n_init=restarts, max_iter=100, random_state=seed).fit(descriptors)
    return model.cluster_centers_.astype(np.float32)


def learn_gmm(descriptors: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A diagonal-covariance GMM: ``(weights (k,), means (k, d), variances (k, d))``."""
    if len(descriptors) < k:
        raise ValueError(f"{len(descriptors)} descriptors cannot train a {k}-component GMM")
    gmm = GaussianMixture(n_components=k, covariance_type="diag", max_iter=100, reg_covar=1e-4,
                          random_state=seed).fit(descriptors)
    return gmm.weights_.astype(np.float64), gmm.means_.astype(np.float64), gmm.covariances_.astype(np.float64)


def assign(descriptors: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each descriptor (hard assignment)."""
    distances = (
        (descriptors**2).sum(axis=1, keepdims=True) - 2 * descriptors @ centres.T + (centres**2).sum(axis=1)
    )
    return distances.argmin(axis=1)


def bow(descriptors: np.ndarray, centres: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """Bag of visual words with tf-idf weighting (Sivic & Zisserman 2003): term frequency of each word
    in the image times log(N / n_i), N images in the training sample, n_i of them containing word i."""
    counts = np.bincount(assign(descriptors, centres), minlength=len(centres)).astype(np.float32)
    if counts.sum() == 0:
        return counts
    return counts / counts.sum() * idf


def learn_idf(descriptor_sets: list[np.ndarray], centres: np.ndarray) -> np.ndarray:
    """Inverse document frequency of every visual word over the training images."""
    present = np.zeros(len(centres))
    for descriptors in descriptor_sets:
        if len(descriptors):
            present[np.unique(assign(descriptors, centres))] += 1
    return np.log(len(descriptor_sets) / np.maximum(present, 1)).astype(np.float32)


def vlad(descriptors: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """VLAD (Jégou et al. 2010) with the normalisations of Arandjelović & Zisserman, "All about VLAD"
    (CVPR 2013): per word, the sum of residuals x - c_k of the descriptors assigned to it;
    intra-normalisation (each word's block L2-normalised, so bursty words cannot dominate); then
    signed square root and a final L2 normalisation."""
    k, d = centres.shape
    out = np.zeros((k, d), dtype=np.float32)
    if len(descriptors):
        words = assign(descriptors, centres)
        np.add.at(out, words, descriptors - centres[words])
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out = np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
    out = np.sign(out) * np.sqrt(np.abs(out))
    flat = out.ravel()
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 0 else flat


def fisher(descriptors: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """The improved Fisher vector (Perronnin, Sánchez & Mensink, ECCV 2010): gradients of the
    log-likelihood w.r.t. means and standard deviations of a diagonal GMM,

        u_k = 1/(N √w_k) Σ_t γ_t(k) (x_t − μ_k)/σ_k
        v_k = 1/(N √(2 w_k)) Σ_t γ_t(k) [((x_t − μ_k)/σ_k)² − 1]

    concatenated as [u_1..u_K, v_1..v_K], then power-normalised (signed square root) and
    L2-normalised."""
    k, d = means.shape
    if len(descriptors) == 0:
        return np.zeros(2 * k * d, dtype=np.float32)
    x = descriptors.astype(np.float64)
    n = len(x)
    gamma = posteriors(x, weights, means, variances)  # (N, k)
    # The sums over t expanded into moments, so that no (N, k, d) array is ever built:
    # Σγ(x−μ) = S1 − μ S0 and Σγ(x−μ)² = S2 − 2μ S1 + μ² S0.
    s0 = gamma.sum(axis=0)[:, None]  # (k, 1)
    s1 = gamma.T @ x  # (k, d)
    s2 = gamma.T @ (x**2)  # (k, d)
    u = (s1 - means * s0) / np.sqrt(variances) / (n * np.sqrt(weights))[:, None]
    v = ((s2 - 2 * means * s1 + means**2 * s0) / variances - s0) / (n * np.sqrt(2 * weights))[:, None]
    out = np.concatenate([u.ravel(), v.ravel()])
    out = np.sign(out) * np.sqrt(np.abs(out))
    norm = np.linalg.norm(out)
    return (out / norm if norm > 0 else out).astype(np.float32)


def posteriors(x: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Soft assignments γ_t(k) of each descriptor to each Gaussian, computed in log space."""
    log_det = np.log(variances).sum(axis=1)  # (k,)
    precision = 1.0 / variances
    mahalanobis = (x**2) @ precision.T - 2 * x @ (means * precision).T + (means**2 * precision).sum(axis=1)
    log_p = np.log(weights)[None] - 0.5 * (mahalanobis + log_det[None] + x.shape[1] * np.log(2 * np.pi))
    log_p -= log_p.max(axis=1, keepdims=True)
    p = np.exp(log_p)
    return p / p.sum(axis=1, keepdims=True)
