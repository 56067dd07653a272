"""Cluster plot: a 2-D scatter of the embeddings, coloured by cluster, one marker per etiology.

    python -m workflow_scripts.cluster_plot --embeddings-dir DIR --labels cluster_labels.npy \
        --out cluster_plot.png --settings JSON [--summary clusters.json]

A separate step from `workflow_scripts.clustering cluster`, so that the workflow can drop the plot rule
(`plot: false`) without touching the labels. The projection is `clustering.plot_method`
(`pca` or `umap`) of the standardised embeddings; `--summary` gives the algorithm and level actually
used for the title (the settings' values otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np

from workflow_scripts.atomic import atomic_file
from workflow_scripts.cluster_algorithms import ClusteringError, umap_reduce
from workflow_scripts.clustering import load_embeddings, resolve_settings, settings_or_exit


def project_2d(emb: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D view of the standardised embeddings for the plot."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(emb.astype(np.float64))
    n = x.shape[0]
    if method == "umap" and n >= 4:
        return umap_reduce(x, 2, seed)
    if n < 3 or x.shape[1] < 2:  # PCA needs 2 components; pad a degenerate view with zeros
        return np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))
    return PCA(n_components=2, random_state=seed).fit_transform(x)


def run_plot(
    embeddings_dir: str, labels_path: str, out: str, raw_settings: dict, summary_path: str | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cfg, _, seed = resolve_settings(raw_settings)
    emb, etiologies = load_embeddings(embeddings_dir)
    labels = np.load(labels_path, allow_pickle=False)
    if labels.shape != (emb.shape[0],) or labels.min() < 0:
        raise ClusteringError(
            f"{labels_path} has {labels.shape} labels for {emb.shape[0]} embeddings; rerun the cluster step."
        )
    algorithm, level = cfg["algorithm"], cfg["level"]
    if summary_path:
        with open(summary_path) as f:
            summary = json.load(f)
        algorithm, level = summary.get("algorithm_used", algorithm), summary.get("level", level)
    xy = project_2d(emb, cfg["plot_method"], seed)
    k = int(labels.max()) + 1
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    markers = "os^Dv<>Ph*X"
    etis = sorted(set(etiologies))
    eti_arr = np.array(etiologies)
    fig, ax = plt.subplots(figsize=(8, 6))
    for i, eti in enumerate(etis):
        sel = eti_arr == eti
        colors = [cmap(int(c) % cmap.N) for c in labels[sel]]
        ax.scatter(*xy[sel].T, c=colors, marker=markers[i % len(markers)], s=28, alpha=0.8, edgecolors="none")
    cluster_handles = [
        Line2D([], [], marker="o", ls="", color=cmap(c % cmap.N), label=f"cluster {c}") for c in range(k)
    ]
    eti_handles = [
        Line2D([], [], marker=markers[i % len(markers)], ls="", color="gray", label=eti) for i, eti in enumerate(etis)
    ]
    first = ax.legend(handles=cluster_handles, title="cluster", loc="upper left", fontsize=7)
    ax.add_artist(first)
    ax.legend(handles=eti_handles, title="etiology", loc="upper right", fontsize=7)
    ax.set_title(f"{k} clusters ({algorithm}, {level} level), {cfg['plot_method'].upper()} projection, "
                 f"N={len(labels)} utterances")
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.cluster_plot", description=__doc__.split("\n")[0])
    parser.add_argument("--embeddings-dir", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", required=True, help="inline JSON or a JSON/YAML file")
    parser.add_argument("--summary", default=None, help="clusters.json, for the algorithm actually used")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raw = settings_or_exit(parser, args.settings)
    try:
        run_plot(args.embeddings_dir, args.labels, args.out, raw, args.summary)
    except ClusteringError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
