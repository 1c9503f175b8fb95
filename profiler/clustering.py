"""Functional groups of experts: agglomerative clustering with average linkage (as HC-SMoE groups experts by their
outputs) on the distance d_ij = 1 - (cos_ij + cos_ji) / 2, cut at `threshold`."""
from __future__ import annotations

import numpy as np


def cluster_experts(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """[E] labels, numbered in order of first appearance; experts closer than `threshold` end up together."""
    from sklearn.cluster import AgglomerativeClustering

    e = similarity.shape[0]
    if e < 2:
        return np.zeros(e, np.int64)
    dist = 1.0 - (similarity + similarity.T) / 2.0
    np.fill_diagonal(dist, 0.0)
    dist = np.clip(dist, 0.0, None)
    labels = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                     distance_threshold=threshold).fit_predict(dist)
    remap: dict[int, int] = {}
    return np.array([remap.setdefault(int(x), len(remap)) for x in labels], dtype=np.int64)


def finalize_clusters(stats: dict[str, np.ndarray], layers: list[int], threshold: float) -> None:
    """(Re)compute the cluster labels of every layer from its accumulated cosine sums."""
    for l in layers:
        sim = stats[f"L{l}.cos_sum"] / max(int(stats[f"L{l}.probe_count"][0]), 1)
        stats[f"L{l}.clusters"] = cluster_experts(sim, threshold)
