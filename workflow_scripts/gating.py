"""Stage 3: pretrain the gate, a small MLP from pooled embedding to cluster (= expert).

Validation holds out whole speakers (stratified by etiology), so the reported accuracy is that of
unseen speakers, as in deployment. Early stopping keeps the weights of the best validation loss.

    python -m workflow_scripts.gating train --embeddings-dir results/quick/embeddings \
        --labels results/quick/cluster_labels.npy --out results/quick/gating.safetensors \
        --metrics-out results/quick/gating_metrics.json --settings '{...}'
    python -m workflow_scripts.gating plot --metrics results/quick/gating_metrics.json --out gating_metrics.png
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from workflow_scripts.atomic import atomic_file, write_json
from workflow_scripts.gate_mlp import GateMLP, save_gate
from workflow_scripts.sampling import speaker_disjoint_split
from workflow_scripts.settings import parse_settings_arg
from workflow_scripts.windows import window_ladder

log = logging.getLogger("gating")


class EmbeddedUtterance(NamedTuple):
    id: str
    speaker: str
    etiology: str
    row: int


def load_embeddings(embeddings_dir: Path) -> tuple[np.ndarray, list[EmbeddedUtterance], dict]:
    """The float32 embedding matrix, its rows as utterances, and the mapping's metadata."""
    mapping = json.loads((embeddings_dir / "mapping.json").read_text())
    matrix = np.load(embeddings_dir / "embeddings.npy", allow_pickle=False).astype(np.float32)
    utts = [EmbeddedUtterance(uid, m["speaker"], m["etiology"], m["row"]) for uid, m in mapping["utterances"].items()]
    if len(utts) != len(matrix):
        raise ValueError(f"{embeddings_dir}: mapping.json lists {len(utts)} utterances but embeddings.npy has "
                         f"{len(matrix)} rows; rerun the embeddings stage")
    return matrix, sorted(utts, key=lambda u: u.row), mapping


def train_gate(matrix: np.ndarray, labels: np.ndarray, utts: list[EmbeddedUtterance], settings: dict):
    """Returns (best gate, metrics dict)."""
    cfg = settings["gating"]
    torch.manual_seed(settings["seed"])
    num_experts = int(labels.max()) + 1
    train_utts, val_utts = speaker_disjoint_split(utts, val_fraction=cfg["val_fraction"], seed=settings["seed"])
    note = None
    if not val_utts:
        # Too few speakers to hold any out: validate on the training rows and say so in the metrics.
        note = "no speaker could be held out; validation uses the training utterances"
        log.warning(note)
        val_utts = train_utts
    tr = torch.tensor([u.row for u in train_utts])
    va = torch.tensor([u.row for u in val_utts])
    x = torch.from_numpy(matrix)
    y = torch.from_numpy(labels.astype(np.int64))

    gate = GateMLP(matrix.shape[1], num_experts, hidden_dim=cfg["hidden_dim"], dropout=cfg["dropout"])
    gate.fit_standardization(x[tr])
    optimizer = torch.optim.AdamW(gate.parameters(), lr=cfg["lr"])
    generator = torch.Generator().manual_seed(settings["seed"])
    history, best, best_loss, since_best = [], None, float("inf"), 0
    for epoch in range(1, cfg["epochs"] + 1):
        gate.train()
        order = tr[torch.randperm(len(tr), generator=generator)]
        total = 0.0
        for begin in range(0, len(order), cfg["batch_size"]):
            idx = order[begin:begin + cfg["batch_size"]]
            loss = F.cross_entropy(gate(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        gate.eval()
        with torch.no_grad():
            logits = gate(x[va])
            val_loss = F.cross_entropy(logits, y[va]).item()
            val_acc = (logits.argmax(1) == y[va]).float().mean().item()
        history.append({"epoch": epoch, "train_loss": total / len(tr), "val_loss": val_loss, "val_acc": val_acc})
        if val_loss < best_loss - 1e-6:
            best, best_loss, since_best = copy.deepcopy(gate.state_dict()), val_loss, 0
        else:
            since_best += 1
            if since_best >= cfg["patience"]:
                log.info("early stop at epoch %d (no improvement for %d epochs)", epoch, since_best)
                break
    gate.load_state_dict(best)
    best_epoch = min(history, key=lambda h: h["val_loss"])
    metrics = {
        "num_experts": num_experts,
        "n_train": len(tr), "n_val": len(va),
        "train_speakers": len({u.speaker for u in train_utts}),
        "val_speakers": len({u.speaker for u in val_utts}),
        "best_epoch": best_epoch["epoch"], "best_val_loss": best_epoch["val_loss"],
        "best_val_acc": best_epoch["val_acc"], "history": history, "note": note,
    }
    return gate, metrics


def train(embeddings_dir: Path, labels_path: Path, out: Path, metrics_out: Path, settings: dict) -> dict:
    matrix, utts, mapping = load_embeddings(embeddings_dir)
    labels = np.load(labels_path, allow_pickle=False)
    if len(labels) != len(matrix):
        raise ValueError(f"{labels_path} has {len(labels)} labels for {len(matrix)} embeddings; rerun clustering")
    gate, metrics = train_gate(matrix, labels, utts, settings)
    # What the gate's input was: every stage that embeds for this gate must embed the same way.
    save_gate(gate, out, extra={"pooling": mapping["pooling"], "layer": mapping.get("layer", "last"),
                                "base_model": mapping["base_model"],
                                "encoder_window_s": mapping.get("encoder_window_s")})
    write_json(metrics_out, metrics)
    log.info("gate: %d experts, best epoch %d, val acc %.3f on %d held-out utterances", metrics["num_experts"],
             metrics["best_epoch"], metrics["best_val_acc"], metrics["n_val"])
    return metrics


def check_gate_record(extra: dict, *, base_model: str, encoder_window_s, pooling: str | None = None,
                      layer: str | int | None = None, path: str | os.PathLike) -> None:
    """Raise ValueError unless the gate at `path` was trained on embeddings made the way the caller embeds.

    `extra` is what `train` saved with the gate. Expected values passed as None are not checked, nor
    are keys the gate file lacks, except `layer`: gates from before that key existed used "last".
    """
    recorded = {"base_model": extra.get("base_model"), "encoder_window_s": extra.get("encoder_window_s"),
                "embeddings.pooling": extra.get("pooling"), "embeddings.layer": extra.get("layer", "last")}
    expected = {"base_model": base_model, "encoder_window_s": encoder_window_s, "embeddings.pooling": pooling,
                "embeddings.layer": layer}
    for key, want in expected.items():
        have = recorded[key]
        if want is None or have is None:
            continue
        # Windows compare as ladders: 10 and 10.0 (YAML or JSON), or 10 and [10, 30], are the same setting.
        same = window_ladder(have) == window_ladder(want) if key == "encoder_window_s" else have == want
        if not same:
            raise ValueError(f"{path}: the gate was trained on embeddings with {key}={have!r}, but this stage "
                             f"uses {key}={want!r}; rerun the gating stage (and the stages before it) with the "
                             f"current settings, or set {key} back to {have!r}")


def plot(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = json.loads(metrics_path.read_text())
    epochs = [h["epoch"] for h in metrics["history"]]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in metrics["history"]], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in metrics["history"]], label="validation (held-out speakers)")
    ax_loss.axvline(metrics["best_epoch"], color="grey", linestyle=":", label="best")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Gate loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_acc"] for h in metrics["history"]])
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.05),
               title=f"Validation accuracy ({metrics['num_experts']} experts)")
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the gate on clustered embeddings")
    p_train.add_argument("--embeddings-dir", type=Path, required=True)
    p_train.add_argument("--labels", type=Path, required=True)
    p_train.add_argument("--out", type=Path, required=True)
    p_train.add_argument("--metrics-out", type=Path, required=True)
    p_train.add_argument("--threads", type=int, default=2)
    p_train.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    p_plot = sub.add_parser("plot", help="plot the training curves")
    p_plot.add_argument("--metrics", type=Path, required=True)
    p_plot.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "train":
        torch.set_num_threads(args.threads)
        train(args.embeddings_dir, args.labels, args.out, args.metrics_out, parse_settings_arg(args.settings))
    else:
        plot(args.metrics, args.out)


if __name__ == "__main__":
    main()
