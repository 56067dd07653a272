"""Post-processing of raw cluster labels: noise, too many clusters, oversize clusters, label order.

All functions work on "units" (the rows that were clustered: utterances, or speakers at
`clustering.level: speaker`) in the reduced space `z`, and are deterministic: ties go to the lower
index or label.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.distance import cdist


def centroids(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids (noise -1 left out) and their centroids in z."""
    ids = np.unique(labels[labels >= 0])
    return ids, np.stack([z[labels == c].mean(axis=0) for c in ids])


def reassign_noise(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Give each noise point (-1) the label of the nearest cluster centroid."""
    noise = labels < 0
    if not noise.any():
        return labels, 0
    ids, cents = centroids(z, labels)
    dists = ((z[noise, None, :] - cents[None, :, :]) ** 2).sum(axis=-1)
    out = labels.copy()
    out[noise] = ids[dists.argmin(axis=1)]
    return out, int(noise.sum())


def merge_smallest(z: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Merge the smallest cluster into the one with the nearest centroid until k remain."""
    out, merged = labels.copy(), 0
    while len(np.unique(out)) > k:
        ids, cents = centroids(z, out)
        sizes = np.array([(out == c).sum() for c in ids])
        small = int(sizes.argmin())  # ties: lowest id, so the result is deterministic
        dist = ((cents - cents[small]) ** 2).sum(axis=1)
        dist[small] = np.inf
        out[out == ids[small]] = ids[int(dist.argmin())]
        merged += 1
    return out, merged


def max_units(share: float, n: int) -> int:
    """Most units one cluster may hold under `clustering.max_cluster_share`: ceil(share × n)."""
    return math.ceil(share * n - 1e-9)  # 0.1 * 30 is 3.0000000000000004 in floats, which must give 3


def cap_cluster_share(z: np.ndarray, labels: np.ndarray, share: float) -> tuple[np.ndarray, int]:
    """Move units out of clusters holding more than `max_units(share, N)`; returns (labels, moves).

    Moving unit i from its cluster to cluster c costs |z_i - centroid_c| - |z_i - centroid_own|
    (centroids of the uncapped clusters). Moves are made cheapest first, each into a cluster that
    still has room, so every unit lands in the nearest cluster with room. The caller makes sure the
    clusters can hold all units (K × cap >= N).
    """
    n = len(labels)
    cap = max_units(share, n)
    ids, cents = centroids(z, labels)
    own = np.searchsorted(ids, labels)  # column of each unit's cluster
    sizes = np.bincount(own, minlength=len(ids))
    if sizes.max() <= cap:
        return labels.copy(), 0
    dist = cdist(z, cents)
    increase = dist - dist[np.arange(n), own][:, None]
    # Clusters only shrink down to the cap and only fill up to it, so the candidate moves are fixed
    # now and taking them in cost order equals picking the cheapest valid move again and again.
    units, targets = np.nonzero((sizes[own] > cap)[:, None] & (sizes < cap)[None, :])
    order = np.lexsort((targets, units, increase[units, targets]))  # ties: lower unit, then lower cluster
    out, moves = own.copy(), 0
    for i, c in zip(units[order], targets[order], strict=True):
        if out[i] != own[i] or sizes[own[i]] <= cap or sizes[c] >= cap:
            continue
        sizes[own[i]] -= 1
        sizes[c] += 1
        out[i] = c
        moves += 1
    return ids[out], moves


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Labels 0..K-1, 0 the largest cluster (ties: lower original label first)."""
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    lookup = {int(old): new for new, old in enumerate(order)}
    return np.array([lookup[int(v)] for v in labels], dtype=np.int64)
