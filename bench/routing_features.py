"""Which routing features follow etiology? Encoder layer × pooling × clustering algorithm × level.

Embeds a stratified sample of Train utterances once (one encoder pass gives every layer), then runs
the clustering stage's own code for each feature choice and reports how well the clusters follow
etiology (NMI, ARI) and how balanced they are. The gate learns to reproduce these clusters, so a
choice that does not follow etiology here will not route by etiology either.

    .venv/bin/python bench/routing_features.py --corpus results/_corpora/medium \
        --out docs/results/routing_features.md

A missing corpus or model is built first, with the commands the workflow uses.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from workflow_scripts.atomic import write_text
from workflow_scripts.cluster_algorithms import build_summary, cluster_embeddings
from workflow_scripts.clustering import resolve_settings
from workflow_scripts.sampling import sample_utterances
from workflow_scripts.sap_data import DataReport, load_audio, read_split
from workflow_scripts.training import load_base
from workflow_scripts.whisper_io import input_features, pooled_layers

ALGORITHMS = ("spectral", "kmeans")
LEVELS = ("utterance", "speaker")


def ensure_inputs(corpus: Path, size: str, model_dir: Path) -> None:
    """Generate the synthetic corpus and convert the bundled model when missing, as the workflow does."""
    if not (corpus / "Train").is_dir():
        subprocess.run([sys.executable, "-m", "workflow_scripts.demo_corpus", "--out", str(corpus), "--size", size,
                        "--seed", "0", "--jobs", "2"], check=True)
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "workflow_scripts.base_model", "--spec", "bundled:tiny.en",
                        "--out", str(model_dir)], check=True)


@torch.no_grad()
def embed_all_layers(model, processor, utts, batch_size: int) -> dict[str, np.ndarray]:
    """mean_std rows per layer name ("0".."L-1", "last"), from one encoder pass per batch."""
    num_layers = len(model.get_encoder().layers)
    layers: list[str | int] = [*range(num_layers), "last"]
    rows: dict[str, list[np.ndarray]] = {str(layer): [] for layer in layers}
    for begin in range(0, len(utts), batch_size):
        audios = [load_audio(u.wav) for u in utts[begin:begin + batch_size]]
        pooled = pooled_layers(model, input_features(processor, audios), [len(a) for a in audios], "mean_std", layers)
        for layer, p in zip(layers, pooled, strict=True):
            rows[str(layer)].append(p.float().numpy())
    # Stored as float16 by the embeddings stage: cluster the same rounded values.
    return {name: np.concatenate(r).astype(np.float16).astype(np.float32) for name, r in rows.items()}


def cluster_choice(emb: np.ndarray, etiologies: list[str], speakers: list[str], clustering: dict,
                   num_experts: int, seed: int) -> dict:
    """The clustering stage's labels for one feature matrix and clustering section, scored against etiology."""
    cfg, k, s = resolve_settings({"num_experts": num_experts, "seed": seed, "clustering": clustering})
    labels, info, reduced = cluster_embeddings(emb, cfg, k, s, speakers)
    summary = build_summary(labels, info, etiologies, reduced)
    return {"nmi": summary["nmi_etiology"], "ari": summary["ari_etiology"],
            "nmi_speaker": float(normalized_mutual_info_score(speakers, labels)),
            "sizes": summary["sizes"], "unit_sizes": summary["unit_sizes"]}


def run_choices(features: dict[tuple[str, str], np.ndarray], etiologies: list[str], speakers: list[str],
                args: argparse.Namespace, levels: tuple[str, ...], share: float) -> list[dict]:
    results = []
    for (layer, pooling), emb in features.items():
        for algorithm in ALGORITHMS:
            for level in levels:
                clustering = {"algorithm": algorithm, "level": level, "reduce": "pca", "reduce_dim": args.reduce_dim,
                              "max_cluster_share": share}
                r = cluster_choice(emb, etiologies, speakers, clustering, args.num_experts, args.seed)
                results.append({"layer": layer, "pooling": pooling, "algorithm": algorithm, "level": level, **r})
                print(f"layer {layer:>4} {pooling:8} {algorithm:8} {level:9} share {share:g}: NMI {r['nmi']:.3f} "
                      f"ARI {r['ari']:.3f} sizes {r['sizes']}", flush=True)
    return results


def table(results: list[dict]) -> list[str]:
    lines = ["| layer | pooling | algorithm | level | NMI etiology | ARI etiology | NMI speaker | cluster sizes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        sizes = " / ".join(map(str, r["sizes"]))
        if r["level"] == "speaker":
            sizes += " [" + " / ".join(map(str, r["unit_sizes"])) + "]"
        lines.append(f"| {r['layer']} | {r['pooling']} | {r['algorithm']} | {r['level']} | {r['nmi']:.3f} | "
                     f"{r['ari']:.3f} | {r['nmi_speaker']:.3f} | {sizes} |")
    return lines


def write_report(out: Path, results: list[dict], capped: list[dict], meta: dict) -> None:
    lines = [
        "# Routing features vs etiology",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}",
        f"- Command: `{meta['command']}`",
        f"- Corpus: `{meta['corpus']}` (synthetic, espeak-ng; one degradation profile per etiology), Train split, "
        f"{meta['n']} utterances stratified by etiology (seed {meta['seed']}): {meta['per_etiology']}; "
        f"{meta['speakers']} speakers",
        f"- Model: `{meta['model']}` ({meta['num_layers']} encoder layers, d={meta['d_model']}), encoder window "
        f"{meta['window']:g} s; embedding took {meta['embed_seconds']:.0f} s, all clusterings "
        f"{meta['cluster_seconds']:.0f} s",
        f"- Clustering: the workflow's `cluster_embeddings`, {meta['num_experts']} clusters, reduce pca "
        f"{meta['reduce_dim']}, seed {meta['seed']}; labels scored against each utterance's etiology",
        "",
        "Layer `i` is the output of encoder layer i, `0` the input to the first layer (convs + positions); "
        f"`last` is the encoder's final output after its layer norm, the same as layer {meta['num_layers']}. "
        "`mean_std` appends the per-dimension standard deviation over frames to the mean. At speaker level "
        "the speakers' mean embeddings are clustered and each utterance takes its speaker's cluster. NMI/ARI: "
        "1 = the clusters are the etiologies, 0 = unrelated. NMI speaker: how far clusters follow speaker "
        "identity. Sizes in utterances (speaker level: speakers per cluster in brackets).",
        "",
        *table(results),
    ]
    demo = next(r for r in results if (r["layer"], r["pooling"], r["algorithm"], r["level"])
                == ("last", "mean", "spectral", "utterance"))
    lines += ["", f"The `demo` run's choice before these settings existed (last layer, mean, spectral, utterance): "
              f"NMI {demo['nmi']:.3f}, ARI {demo['ari']:.3f}, sizes {' / '.join(map(str, demo['sizes']))}.",
              "", "Best NMI per level:", ""]
    for level in LEVELS:
        best = max((r for r in results if r["level"] == level), key=lambda r: r["nmi"])
        lines.append(f"- {level}: layer {best['layer']}, {best['pooling']}, {best['algorithm']}: "
                     f"NMI {best['nmi']:.3f}, ARI {best['ari']:.3f}")
    lines += ["", f"## With `max_cluster_share: {meta['share']}` (utterance level)", "",
              f"At most ceil({meta['share']} × {meta['n']}) utterances per cluster; the rest move to the nearest "
              "cluster with room. Compare with the utterance rows above.", "", *table(capped)]
    write_text(out, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("results/_corpora/medium"))
    parser.add_argument("--size", default="medium", help="corpus size to generate when --corpus is missing")
    parser.add_argument("--model", type=Path, default=Path("results/_models/tiny.en"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/routing_features.md"))
    parser.add_argument("--utterances", type=int, default=800)
    parser.add_argument("--window", type=float, default=10.0, help="encoder window in seconds (demo run: 10)")
    parser.add_argument("--num-experts", type=int, default=5)
    parser.add_argument("--reduce-dim", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--share", type=float, default=0.3, help="max_cluster_share of the capped table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ensure_inputs(args.corpus, args.size, args.model)

    train = read_split(args.corpus, "Train", DataReport(), max_duration_s=args.window)
    utts = sample_utterances(train, n=args.utterances, method="stratified", seed=args.seed)
    model, processor = load_base(str(args.model), args.window)
    model.eval()
    start = time.perf_counter()
    by_layer = embed_all_layers(model, processor, utts, args.batch_size)
    embed_seconds = time.perf_counter() - start
    d_model = model.config.d_model
    features: dict[tuple[str, str], np.ndarray] = {}
    for layer, mean_std in by_layer.items():
        features[(layer, "mean")] = mean_std[:, :d_model]  # mean pooling is the first half of mean_std
        features[(layer, "mean_std")] = mean_std

    etiologies = [u.etiology for u in utts]
    speakers = [u.speaker for u in utts]
    start = time.perf_counter()
    results = run_choices(features, etiologies, speakers, args, LEVELS, share=1.0)
    capped = run_choices(features, etiologies, speakers, args, ("utterance",), share=args.share)
    per_etiology = {e: etiologies.count(e) for e in sorted(set(etiologies))}
    meta = {
        "date": subprocess.run(["date"], capture_output=True, text=True, check=True).stdout.strip(),
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, no GPU (cores shared "
                   "with other jobs, so timings are upper bounds)",
        "command": shlex.join([".venv/bin/python", "bench/routing_features.py", *(argv or sys.argv[1:])]),
        "corpus": str(args.corpus), "n": len(utts), "seed": args.seed,
        "per_etiology": ", ".join(f"{e} {n}" for e, n in per_etiology.items()),
        "speakers": len(set(speakers)), "model": str(args.model), "num_layers": len(model.get_encoder().layers),
        "d_model": d_model, "window": args.window, "embed_seconds": embed_seconds,
        "cluster_seconds": time.perf_counter() - start, "num_experts": args.num_experts,
        "reduce_dim": args.reduce_dim, "share": args.share,
    }
    write_report(args.out, results, capped, meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
