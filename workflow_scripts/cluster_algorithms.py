"""Reduction and clustering of pooled embeddings into one expert label per unit.

Units are utterances, or at `clustering.level: speaker` the speakers' mean embeddings, every
utterance then taking its speaker's label: routing follows what differs between speakers rather than
what each utterance says. Labels are int64, 0..K-1 with 0 the largest cluster (in utterances).
HDBSCAN noise is assigned to the nearest centroid so every utterance has an expert; more clusters
than `num_experts` are merged (smallest first) so the label count never exceeds the experts the run
trains; `clustering.max_cluster_share` then caps the share of units any one cluster holds
(cluster_balance.py). `build_summary` adds how well the labels follow etiology (NMI, ARI).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from workflow_scripts.cluster_balance import (
    cap_cluster_share,
    max_units,
    merge_smallest,
    reassign_noise,
    relabel_by_size,
)

log = logging.getLogger("workflow_scripts.cluster_algorithms")


class ClusteringError(ValueError):
    """Bad input or settings, or a clustering result the settings do not accept."""


def umap_reduce(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """x reduced to `dim` dimensions by UMAP, seeded (used for clustering and for the 2-D plot)."""
    import umap  # imported lazily: numba compilation costs ~10 s

    # A fixed random_state makes UMAP single-threaded and reproducible; n_neighbors must be < N.
    reducer = umap.UMAP(n_components=dim, n_neighbors=min(15, x.shape[0] - 1), random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def reduce_embeddings(emb: np.ndarray, method: str, dim: int, seed: int) -> tuple[np.ndarray, int]:
    """Standardise, then reduce to `dim` (capped so the method can run on N rows)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    n, d = emb.shape
    x = StandardScaler().fit_transform(emb.astype(np.float64))
    if method == "none":
        return x, d
    # PCA cannot have more components than min(N-1, D); UMAP's spectral init needs dim <= N-2.
    cap = min(n - 1, d) if method == "pca" else min(n - 2, d)
    if cap < 1:
        raise ClusteringError(f"clustering.reduce={method} needs more than {n} embeddings; use reduce: none.")
    used = min(dim, cap)
    if used < dim:
        log.info("reduce_dim %d capped to %d (N=%d embeddings, D=%d)", dim, used, n, d)
    if method == "pca":
        return PCA(n_components=used, random_state=seed).fit_transform(x), used
    return umap_reduce(x, used, seed), used


def _hdbscan(z: np.ndarray, cfg: dict, min_cluster_size: int) -> np.ndarray:
    import hdbscan

    min_samples = cfg["min_samples"] if cfg["min_samples"] is not None else min_cluster_size
    model = hdbscan.HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min(min_samples, z.shape[0] - 1),
        metric=cfg["metric"],
        allow_single_cluster=cfg["allow_single_cluster"],
        algorithm=cfg["hdbscan_algorithm"],
    )
    try:
        return np.asarray(model.fit_predict(z), dtype=np.int64)
    except ValueError as e:
        raise ClusteringError(
            f"HDBSCAN failed with clustering.metric={cfg['metric']!r}, "
            f"clustering.hdbscan_algorithm={cfg['hdbscan_algorithm']!r}: {e}. Use hdbscan_algorithm: best."
        ) from e


def kmeans(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means with 10 restarts; exactly min(k, N) clusters."""
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=min(k, z.shape[0]), n_init=10, random_state=seed)
    return np.asarray(model.fit_predict(z), dtype=np.int64)


def spectral(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spectral clustering on a nearest-neighbour graph; k is capped by N."""
    from sklearn.cluster import SpectralClustering

    n = z.shape[0]
    model = SpectralClustering(
        n_clusters=min(k, n),
        affinity="nearest_neighbors",
        n_neighbors=max(1, min(10, n - 1)),
        random_state=seed,
    )
    with warnings.catch_warnings():
        # Well-separated groups give a disconnected graph; the embedding is still usable.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return np.asarray(model.fit_predict(z), dtype=np.int64)


def _n_clusters(labels: np.ndarray) -> int:
    return len(np.unique(labels[labels >= 0]))


def _run_hdbscan(z: np.ndarray, cfg: dict, min_clusters: int) -> tuple[np.ndarray, int, int]:
    """HDBSCAN, retried with a halved min_cluster_size while it gives fewer than min_clusters.

    Returns the labels with the most clusters (earliest attempt on ties), the min_cluster_size that
    gave them and the number of retries made.
    """
    mcs = min(cfg["min_cluster_size"], max(2, z.shape[0]))
    best, best_mcs, retries = _hdbscan(z, cfg, mcs), mcs, 0
    log.info("HDBSCAN min_cluster_size=%d: %d clusters", mcs, _n_clusters(best))
    while _n_clusters(best) < min_clusters and retries < cfg["max_retries"] and mcs > 2:
        mcs, retries = max(2, mcs // 2), retries + 1
        labels = _hdbscan(z, cfg, mcs)
        log.info("HDBSCAN retry %d min_cluster_size=%d: %d clusters", retries, mcs, _n_clusters(labels))
        if _n_clusters(labels) > _n_clusters(best):
            best, best_mcs = labels, mcs
    return best, best_mcs, retries


def _cluster_units(x: np.ndarray, cfg: dict, num_experts: int, seed: int) -> tuple[np.ndarray, dict, np.ndarray]:
    """Raw labels of the rows of x (at most num_experts clusters, no noise), how they were made, the reduced x."""
    n = x.shape[0]
    if n < 2:
        raise ClusteringError(f"clustering needs at least 2 units (utterances or speakers), got {n}; sample more.")
    z, dim_used = reduce_embeddings(x, cfg["reduce"], cfg["reduce_dim"], seed)
    info: dict[str, Any] = {
        "algorithm_used": cfg["algorithm"],
        "fallback": None,
        "noise_reassigned": 0,
        "retries": 0,
        "min_cluster_size_used": None,
        "merged_clusters": 0,
        "reduce": cfg["reduce"],
        "reduce_dim_used": dim_used,
        "num_experts_requested": num_experts,
    }
    if cfg["algorithm"] == "spectral":
        labels = spectral(z, num_experts, seed)
    elif cfg["algorithm"] == "kmeans":
        labels = kmeans(z, num_experts, seed)
    else:
        min_clusters = cfg["min_clusters"] if cfg["min_clusters"] is not None else num_experts
        labels, info["min_cluster_size_used"], info["retries"] = _run_hdbscan(z, cfg, min_clusters)
        found = _n_clusters(labels)
        if found < num_experts and not cfg["reduce_experts"]:
            raise ClusteringError(
                f"HDBSCAN found {found} clusters after {info['retries']} retries, fewer than "
                f"num_experts={num_experts}, and clustering.reduce_experts is false. Set reduce_experts: "
                f"true, lower clustering.min_cluster_size, raise max_retries, or use algorithm: spectral."
            )
        if found < cfg["min_experts"]:
            info["algorithm_used"] = "spectral"
            info["fallback"] = (
                f"HDBSCAN found {found} clusters after {info['retries']} retries (< min_experts="
                f"{cfg['min_experts']}); used spectral with {min(num_experts, n)} clusters"
            )
            log.warning(info["fallback"])
            labels = spectral(z, num_experts, seed)
        else:
            labels, info["noise_reassigned"] = reassign_noise(z, labels)
    labels, info["merged_clusters"] = merge_smallest(z, labels, num_experts)
    if _n_clusters(labels) < num_experts and not cfg["reduce_experts"]:
        raise ClusteringError(
            f"only {_n_clusters(labels)} clusters possible from {n} units, fewer than num_experts="
            f"{num_experts}, and clustering.reduce_experts is false; sample more utterances."
        )
    return labels, info, z


def _cap_share(z: np.ndarray, labels: np.ndarray, share: float) -> tuple[np.ndarray, int]:
    """`cap_cluster_share`, after checking that the clusters found can hold every unit under the cap."""
    k, n = _n_clusters(labels), len(labels)
    if k * max_units(share, n) < n:
        raise ClusteringError(
            f"clustering.max_cluster_share={share} is impossible here: {k} clusters were found, and {k} clusters "
            f"of at most {max_units(share, n)} of the {n} units cannot hold them all; the smallest allowed value "
            f"is 1/{k} = {1 / k:.4g}. Raise max_cluster_share, or use algorithm: kmeans or spectral to get "
            f"num_experts clusters."
        )
    return cap_cluster_share(z, labels, share)


def cluster_embeddings(
    emb: np.ndarray, cfg: dict, num_experts: int, seed: int, speakers: Sequence[str] | None = None
) -> tuple[np.ndarray, dict, np.ndarray]:
    """Labels (int64, one per row, 0..K-1 by size), the summary fields saying how they were made, the reduced space.

    At `level: speaker` the units clustered are the speakers' mean embeddings (`speakers` gives each
    row's speaker), each row takes its speaker's label, and the reduced space has one row per
    embeddings row: its speaker's point.
    """
    if cfg["level"] == "speaker":
        if speakers is None or len(speakers) != len(emb):
            raise ClusteringError("clustering.level: speaker needs the speaker of every embeddings row "
                                  "(mapping.json); rerun the embeddings stage or use level: utterance.")
        names, unit_of_row = np.unique(np.asarray(speakers), return_inverse=True)
        units = np.stack([emb[unit_of_row == u].mean(axis=0) for u in range(len(names))])
        log.info("clustering the mean embeddings of %d speakers (%d utterances)", len(names), len(emb))
    else:
        unit_of_row, units = np.arange(len(emb)), emb
    raw, info, z = _cluster_units(units, cfg, num_experts, seed)
    capped, info["capped_moves"] = _cap_share(z, raw, cfg["max_cluster_share"])
    # Ordered by utterances, not units: utterances are what each expert trains on.
    labels = relabel_by_size(capped[unit_of_row])
    new_id = dict(zip(capped[unit_of_row].tolist(), labels.tolist(), strict=True))
    k = len(new_id)
    info.update(
        level=cfg["level"],
        n_units=len(units),
        max_cluster_share=cfg["max_cluster_share"],
        unit_sizes_before_cap=np.bincount([new_id[c] for c in raw.tolist()], minlength=k).tolist(),
        unit_sizes=np.bincount([new_id[c] for c in capped.tolist()], minlength=k).tolist(),
    )
    return labels, info, z[unit_of_row]


def _silhouette(z: np.ndarray, labels: np.ndarray, k: int) -> float | None:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(z, labels)) if 2 <= k <= z.shape[0] - 1 else None


def build_summary(labels: np.ndarray, info: dict, etiologies: list[str], reduced: np.ndarray) -> dict:
    """clusters.json: `info` plus cluster sizes, etiologies per cluster, silhouette, NMI and ARI to etiology."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    k = int(labels.max()) + 1
    per_eti: dict[str, dict[str, int]] = {}
    for eti, lab in zip(etiologies, labels.tolist(), strict=True):
        per_eti.setdefault(eti, {}).setdefault(str(lab), 0)
        per_eti[eti][str(lab)] += 1
    summary = dict(info)
    summary.update(
        num_clusters=k,
        sizes=np.bincount(labels, minlength=k).tolist(),
        per_etiology={e: per_eti[e] for e in sorted(per_eti)},
        silhouette=_silhouette(reduced, labels, k),
        # How far the clusters follow etiology (1 = exactly, 0 = no better than chance).
        nmi_etiology=float(normalized_mutual_info_score(etiologies, labels)),
        ari_etiology=float(adjusted_rand_score(etiologies, labels)),
    )
    return summary
