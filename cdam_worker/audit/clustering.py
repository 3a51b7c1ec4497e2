"""Spectral clustering of one class's images on a sparse k-nearest-neighbour graph, k chosen by the eigengap.

1. Graph: each image's ``neighbours`` nearest images in descriptor space (scikit-learn, a sparse matrix;
   never an N x N one), weighted by a self-tuning Gaussian ``exp(-d_ij^2 / (s_i s_j))`` with ``s_i`` the
   distance to the image's last neighbour, and symmetrised.
2. Embedding: the leading eigenvectors of the normalised affinity ``D^-1/2 W D^-1/2`` (scipy ``eigsh``,
   sparse), i.e. the smallest of the normalised Laplacian ``L = I - D^-1/2 W D^-1/2``.
3. Number of clusters: the largest gap between consecutive Laplacian eigenvalues
   ``lambda_0 <= lambda_1 <= ...`` among the first ``MAX_CLUSTERS + 1``; one cluster when the first gap
   wins (no structure).
4. Clusters: k-means on the first k eigenvectors, rows normalised (Ng, Jordan & Weiss).
5. 2-D coordinates for plots: the first two non-trivial eigenvectors (Laplacian eigenmaps).

A class is a small problem (tens to thousands of images): it runs on one thread, because OpenMP and
BLAS thread pools cost more than they save there (and spin on a busy machine).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from sklearn.cluster import KMeans
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import ThreadpoolController

MAX_CLUSTERS = 8
SEED = 0


@dataclass
class Clustering:
    """One class's clusters: a label per image, 2-D coordinates and the Laplacian spectrum used."""

    labels: np.ndarray  # (n,) int, 0 .. k-1, cluster 0 the largest
    coordinates: np.ndarray  # (n, 2) float
    eigenvalues: np.ndarray  # the smallest Laplacian eigenvalues, ascending
    n_clusters: int


def neighbour_count(n: int) -> int:
    """Neighbours per image in the graph: about sqrt(n)/2, between 5 and 15 (fewer for tiny classes)."""
    return int(min(n - 1, max(5, min(15, round(np.sqrt(n) / 2)))))


def knn_affinity(descriptors: np.ndarray) -> sp.csr_matrix:
    """Symmetric sparse affinity of the k-nearest-neighbour graph, self-tuning Gaussian weights."""
    n = len(descriptors)
    k = neighbour_count(n)
    distances, indices = NearestNeighbors(n_neighbors=k + 1).fit(descriptors).kneighbors(descriptors)
    distances, indices = distances[:, 1:], indices[:, 1:]  # drop each image itself
    scale = np.maximum(distances[:, -1], 1e-12)
    weights = np.exp(-(distances**2) / (scale[:, None] * scale[indices]))
    graph = sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), k), indices.ravel())), shape=(n, n))
    return graph.maximum(graph.T).tocsr()


def spectral_clusters(descriptors: np.ndarray) -> Clustering:
    """Cluster ``descriptors`` (n, F) as the module docstring says (n >= 4)."""
    with _thread_pools().limit(limits=1):
        return _spectral_clusters(descriptors)


@functools.cache
def _thread_pools() -> ThreadpoolController:
    """The process's OpenMP and BLAS pools, found once (finding them reads the loaded libraries)."""
    return ThreadpoolController()


def _spectral_clusters(descriptors: np.ndarray) -> Clustering:
    n = len(descriptors)
    affinity = knn_affinity(descriptors)
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    inverse_sqrt = sp.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    normalised = (inverse_sqrt @ affinity @ inverse_sqrt).tocsr()
    n_vectors = min(MAX_CLUSTERS + 1, n - 2)
    start = np.random.default_rng(SEED).uniform(0.5, 1.5, n)  # fixed: the same clusters every run
    try:
        values, vectors = eigsh(normalised, k=n_vectors, which="LA", v0=start)
    except ArpackNoConvergence as error:  # keep what converged (always the leading eigenvectors)
        values, vectors = error.eigenvalues, error.eigenvectors
        n_vectors = len(values)
        if n_vectors == 0:
            return Clustering(
                labels=np.zeros(n, dtype=np.int64), coordinates=np.zeros((n, 2)), eigenvalues=np.zeros(0), n_clusters=1
            )
    order = np.argsort(-values)
    eigenvalues = np.clip(1.0 - values[order], 0.0, 2.0)
    vectors = vectors[:, order]

    gaps = np.diff(eigenvalues)
    n_clusters = int(np.argmax(gaps[: n_vectors - 1]) + 1) if n_vectors > 1 else 1
    coordinates = inverse_sqrt @ vectors[:, 1:3] if n_vectors >= 3 else np.zeros((n, 2))
    if n_clusters == 1:
        labels = np.zeros(n, dtype=np.int64)
    else:
        embedding = vectors[:, :n_clusters]
        embedding = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
        labels = KMeans(n_clusters=n_clusters, n_init=4, random_state=SEED).fit_predict(embedding)
        labels = _by_size(labels)
        n_clusters = int(labels.max()) + 1
    return Clustering(
        labels=labels, coordinates=_unit_box(np.asarray(coordinates)), eigenvalues=eigenvalues, n_clusters=n_clusters
    )


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0, 1, ... from the largest to the smallest (empty ones dropped)."""
    counts = np.bincount(labels)
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]
    relabel = np.empty(len(counts), dtype=np.int64)
    relabel[order] = np.arange(len(order))
    return relabel[labels]


def _unit_box(coordinates: np.ndarray) -> np.ndarray:
    """Coordinates shifted and scaled into [-1, 1] per axis (plots need no further scaling)."""
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    return 2.0 * (coordinates - low) / np.where(high - low > 1e-12, high - low, 1.0) - 1.0
