"""Clustering stage: pooled encoder embeddings -> one expert label per utterance.

    python -m workflow_scripts.clustering cluster --embeddings-dir DIR --labels-out cluster_labels.npy \
        --summary-out clusters.json --settings JSON

The 2-D scatter of the clusters is `workflow_scripts.cluster_plot`, a separate step so that the workflow
can drop the plot rule (`clustering.plot: false`) without touching the labels.

Labels are int64, one per embeddings row, 0..K-1 with 0 the largest cluster (in utterances).
`clustering.level: speaker` clusters the mean embedding of each speaker instead of each utterance, and
every utterance takes its speaker's cluster: routing then follows what differs between speakers
rather than what each utterance says. HDBSCAN noise is assigned to the nearest centroid so every
utterance has an expert; more clusters than `num_experts` are merged (smallest first) so the label
count never exceeds the experts the run trains; `clustering.max_cluster_share` then caps the share of
units (utterances or speakers) any one cluster holds. clusters.json reports how well the labels follow
etiology (NMI, ARI), whatever the settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workflow_scripts.atomic import atomic_file, write_json
from workflow_scripts.cluster_balance import (
    cap_cluster_share,
    max_units,
    merge_smallest,
    reassign_noise,
    relabel_by_size,
)
from workflow_scripts.settings import parse_settings_arg

log = logging.getLogger("workflow_scripts.clustering")

DEFAULTS: dict[str, Any] = {
    "algorithm": "hdbscan",
    "level": "utterance",
    "max_cluster_share": 1.0,
    "reduce": "pca",
    "reduce_dim": 50,
    "min_cluster_size": 5,
    "min_samples": None,
    "metric": "euclidean",
    "allow_single_cluster": False,
    "hdbscan_algorithm": "best",
    "min_clusters": None,
    "reduce_experts": True,
    "min_experts": 2,
    "max_retries": 5,
    "plot_method": "umap",
}
# `plot` belongs to the workflow (whether the plot rule exists); accepted here so the same section
# can be passed unchanged.
_WORKFLOW_KEYS = {"plot"}
_CHOICES = {
    "algorithm": ("hdbscan", "spectral", "kmeans"),
    "level": ("utterance", "speaker"),
    "reduce": ("none", "pca", "umap"),
    "plot_method": ("pca", "umap"),
    "hdbscan_algorithm": (
        "best",
        "generic",
        "prims_kdtree",
        "prims_balltree",
        "boruvka_kdtree",
        "boruvka_balltree",
    ),
}


class ClusteringError(ValueError):
    """Bad input or settings, or a clustering result the settings do not accept."""


def resolve_settings(raw: dict) -> tuple[dict, int, int]:
    """The clustering section with defaults filled in, plus `num_experts` and `seed`."""
    section = dict(raw.get("clustering") or {})
    unknown = sorted(set(section) - set(DEFAULTS) - _WORKFLOW_KEYS)
    if unknown:
        raise ClusteringError(
            f"settings clustering: unknown key(s) {unknown}; allowed: {sorted(DEFAULTS)}. Fix the spelling."
        )
    cfg = {**DEFAULTS, **section}
    for key, allowed in _CHOICES.items():
        if cfg[key] not in allowed:
            raise ClusteringError(f"settings clustering.{key}={cfg[key]!r}: use one of {list(allowed)}.")
    num_experts = raw.get("num_experts")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ClusteringError(f"settings num_experts={num_experts!r}: give a positive integer.")
    for key, low in (("reduce_dim", 1), ("min_cluster_size", 2), ("min_experts", 1), ("max_retries", 0)):
        if not isinstance(cfg[key], int) or cfg[key] < low:
            raise ClusteringError(f"settings clustering.{key}={cfg[key]!r}: give an integer >= {low}.")
    for key in ("min_samples", "min_clusters"):
        if cfg[key] is not None and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ClusteringError(f"settings clustering.{key}={cfg[key]!r}: give an integer >= 1 or null.")
    share = cfg["max_cluster_share"]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ClusteringError(f"settings clustering.max_cluster_share={share!r}: give a number in (0, 1].")
    if share < 1 / num_experts:
        raise ClusteringError(
            f"settings clustering.max_cluster_share={share} is impossible: {num_experts} clusters of at most "
            f"{share:.0%} cannot hold every unit; the smallest allowed value is 1/num_experts = {1 / num_experts:.4g}."
        )
    if cfg["min_experts"] > num_experts:
        raise ClusteringError(
            f"settings clustering.min_experts={cfg['min_experts']} exceeds num_experts={num_experts}; "
            f"lower min_experts."
        )
    return cfg, num_experts, int(raw.get("seed", 0))


def load_embeddings(embeddings_dir: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """float32 embeddings (N, D) and the etiology of each row, checked against mapping.json."""
    folder = Path(embeddings_dir)
    npy, mapping_path = folder / "embeddings.npy", folder / "mapping.json"
    for p in (npy, mapping_path):
        if not p.is_file():
            raise ClusteringError(f"{p} is missing; run the embeddings stage first.")
    emb = np.load(npy).astype(np.float32)
    with open(mapping_path) as f:
        mapping = json.load(f)
    utts = mapping.get("utterances") or {}
    if emb.ndim != 2 or emb.shape[0] != len(utts):
        raise ClusteringError(
            f"{npy} has shape {emb.shape} but {mapping_path} lists {len(utts)} utterances; rerun the embeddings stage."
        )
    if mapping.get("dim") not in (None, emb.shape[1]):
        raise ClusteringError(f"{mapping_path} says dim {mapping['dim']} but {npy} rows have {emb.shape[1]}.")
    etiologies: list[str | None] = [None] * len(utts)
    for utt_id, info in utts.items():
        row = info.get("row")
        if not isinstance(row, int) or not 0 <= row < len(utts) or etiologies[row] is not None:
            raise ClusteringError(f"{mapping_path}: utterance {utt_id} has a bad or duplicate row {row!r}.")
        etiologies[row] = str(info.get("etiology", "unknown"))
    if not np.isfinite(emb).all():
        raise ClusteringError(f"{npy} contains NaN/inf values; rerun the embeddings stage.")
    return emb, etiologies  # type: ignore[return-value]


def row_speakers(embeddings_dir: str | os.PathLike) -> list[str]:
    """The speaker of each embeddings row, from mapping.json (rows checked by `load_embeddings`)."""
    mapping_path = Path(embeddings_dir) / "mapping.json"
    with open(mapping_path) as f:
        utts = json.load(f)["utterances"]
    speakers = [""] * len(utts)
    for utt_id, info in utts.items():
        if not info.get("speaker"):
            raise ClusteringError(
                f"{mapping_path}: utterance {utt_id} has no speaker; rerun the embeddings stage or use "
                f"clustering.level: utterance."
            )
        speakers[info["row"]] = str(info["speaker"])
    return speakers


def umap_reduce(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
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


def run_cluster(embeddings_dir: str, labels_out: str, summary_out: str, raw_settings: dict) -> dict:
    cfg, num_experts, seed = resolve_settings(raw_settings)
    emb, etiologies = load_embeddings(embeddings_dir)
    speakers = row_speakers(embeddings_dir) if cfg["level"] == "speaker" else None
    labels, info, reduced = cluster_embeddings(emb, cfg, num_experts, seed, speakers)
    summary = build_summary(labels, info, etiologies, reduced)
    with atomic_file(labels_out) as f:
        np.save(f, labels)
    write_json(summary_out, summary)
    log.info("%d clusters (%s), sizes %s", summary["num_clusters"], summary["algorithm_used"], summary["sizes"])
    return summary


def settings_or_exit(parser: argparse.ArgumentParser, value: str) -> dict:
    """--settings of the clustering CLIs, or exit 2 with a message saying what is wrong with it."""
    try:
        raw = parse_settings_arg(value)
        if not isinstance(raw, dict):
            raise ValueError("expected a mapping with num_experts, seed and a clustering section")
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: --settings is neither inline JSON nor a readable JSON/YAML file: {e}\n")
    return raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.clustering", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cluster", help="write cluster_labels.npy and clusters.json")
    c.add_argument("--embeddings-dir", required=True)
    c.add_argument("--labels-out", required=True)
    c.add_argument("--summary-out", required=True)
    c.add_argument("--settings", required=True, help="inline JSON or a JSON/YAML file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raw = settings_or_exit(parser, args.settings)
    try:
        run_cluster(args.embeddings_dir, args.labels_out, args.summary_out, raw)
    except ClusteringError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
