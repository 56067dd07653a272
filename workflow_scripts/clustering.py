"""Clustering stage: pooled encoder embeddings -> one expert label per utterance.

    python -m workflow_scripts.clustering cluster --embeddings-dir DIR --labels-out cluster_labels.npy \
        --summary-out clusters.json --settings JSON

This module reads the settings and the embeddings stage's output and writes cluster_labels.npy (int64,
one label per embeddings row) and clusters.json (how the labels were made, how well they follow
etiology); the reduction and clustering themselves are `workflow_scripts.cluster_algorithms`. The 2-D
scatter of the clusters is `workflow_scripts.cluster_plot`, a separate step so that the workflow can
drop the plot rule (`plot: false`) without touching the labels.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

from workflow_scripts.atomic import atomic_file, write_json
from workflow_scripts.cluster_algorithms import ClusteringError, build_summary, cluster_embeddings
from workflow_scripts.settings import SettingsError, parse_settings_arg, with_schema_defaults

log = logging.getLogger("workflow_scripts.clustering")


def resolve_settings(raw: dict) -> tuple[dict, int, int]:
    """The clustering section with schema defaults filled in, plus `num_experts` and `seed`.

    Types, ranges and choices are config/schema.yaml's; checked here are only the limits that
    depend on two keys at once.
    """
    entry = {key: raw[key] for key in ("num_experts", "seed", "clustering") if key in raw}
    try:
        run = with_schema_defaults(entry, "settings")
    except SettingsError as e:
        raise ClusteringError(str(e)) from e
    cfg, num_experts = run["clustering"], run["num_experts"]
    share = cfg["max_cluster_share"]
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
    return cfg, num_experts, run["seed"]


def load_embeddings(embeddings_dir: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """float32 embeddings (N, D) and the etiology of each row, checked against mapping.json."""
    folder = Path(embeddings_dir)
    npy, mapping_path = folder / "embeddings.npy", folder / "mapping.json"
    for p in (npy, mapping_path):
        if not p.is_file():
            raise ClusteringError(f"{p} is missing; run the embeddings stage first.")
    emb = np.load(npy, allow_pickle=False).astype(np.float32)
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
