"""Stage 4: one PEFT LoRA adapter per cluster, fine-tuned on the utterances of that cluster.

`assign` decides each expert-sample (and validation) utterance's expert once: the cluster label for
utterances that were embedded (the samples are nested, so most are), the pretrained gate for the
rest. `train --expert i` fine-tunes expert i (one Snakemake job per expert) and resumes from its
own checkpoint under --work-dir after a crash; it locks --work-dir while it runs and removes it once
the expert is published (workflow_scripts/work_lock.py). `manifest` lists the finished experts.

    python -m workflow_scripts.experts assign --utterances data/expert.json --val data/asr_val.json \
        --embeddings-dir embeddings --labels cluster_labels.npy --gating gating.safetensors --base-model M --out A
    python -m workflow_scripts.experts train --expert 0 --assignment A --base-model M --out experts/expert_0 \
        --work-dir _work/experts/expert_0 --settings '{...}'
    python -m workflow_scripts.experts manifest --out experts/manifest.json experts/expert_0 experts/expert_1
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from workflow_scripts.atomic import atomic_dir, write_json
from workflow_scripts.device import pick_device, prepare_precision, resolve_precision
from workflow_scripts.embeddings import embed_utterances
from workflow_scripts.gate_mlp import read_gate_file
from workflow_scripts.gating import check_gate_record
from workflow_scripts.sap_data import Utterance, read_utterances
from workflow_scripts.settings import parse_settings_arg, precision_setting
from workflow_scripts.train_loop import fit
from workflow_scripts.training import (
    load_base,
    make_loader,
    publish_best,
    resume_identity,
    seed_everything,
    utterance_plan,
)
from workflow_scripts.whisper_io import autocast, encoder_windows
from workflow_scripts.work_lock import remove_work_dir, work_dir_lock

log = logging.getLogger("experts")


def assign(utterances: Path, val: Path, embeddings_dir: Path, labels_path: Path, gating: Path, base_model: str,
           out: Path, settings: dict, num_workers: int = 0) -> dict:
    """Expert of every expert-sample and validation utterance: cached cluster label, else the gate."""
    mapping = json.loads((embeddings_dir / "mapping.json").read_text())
    labels = np.load(labels_path, allow_pickle=False)
    gate, extra = read_gate_file(gating)
    gate.eval()
    # Cluster labels come from the cached embeddings and the gate routes the rest: both must describe
    # utterances the same way, and the same way this stage embeds them.
    check_gate_record(extra, base_model=base_model, encoder_window_s=settings["encoder_window_s"],
                      pooling=mapping["pooling"], layer=mapping.get("layer", "last"), path=gating)
    sets = {"train": read_utterances(utterances), "val": read_utterances(val)}
    expert_of: dict[str, int] = {}
    source = {"cluster_label": 0, "gate": 0}
    missing = [u for utts in sets.values() for u in utts if u.id not in mapping["utterances"]]
    for utts in sets.values():
        for u in utts:
            if u.id in mapping["utterances"]:
                expert_of[u.id] = int(labels[mapping["utterances"][u.id]["row"]])
                source["cluster_label"] += 1
    if missing:
        device = pick_device()
        model, processor = load_base(base_model, settings["encoder_window_s"])
        model.to(device).eval().requires_grad_(False)
        # The same arithmetic as the embeddings stage, whose rows the other utterances' labels came from.
        precision = resolve_precision(settings.get("precision", "auto"), device)
        prepare_precision(model, precision, device)
        matrix = embed_utterances(model, processor, missing, pooling=extra["pooling"],
                                  layer=extra.get("layer", "last"), batch_size=settings["embeddings"]["batch_size"],
                                  device=device, precision=precision, num_workers=num_workers)
        with torch.no_grad():
            routed = gate(torch.from_numpy(matrix)).argmax(1).tolist()
        for u, k in zip(missing, routed, strict=True):
            expert_of[u.id] = k
        source["gate"] = len(missing)
    num_experts = gate.config["num_experts"]
    result = {
        "num_experts": num_experts,
        "source": source,
        "counts": {name: np.bincount([expert_of[u.id] for u in utts], minlength=num_experts).tolist()
                   for name, utts in sets.items()},
        **{name: [{**u.to_dict(), "expert": expert_of[u.id]} for u in utts] for name, utts in sets.items()},
    }
    write_json(out, result)
    log.info("assigned %d utterances (%s); per expert %s", len(expert_of), source, result["counts"])
    return result


def _utterances_of(assignment: dict, split: str, expert: int) -> list[Utterance]:
    return [Utterance.from_dict(d) for d in assignment[split] if d["expert"] == expert]


@torch.no_grad()
def validation_loss(model, loader, device, precision: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        with autocast(precision, device):
            out = model(input_features=batch["input_features"].to(device), labels=batch["labels"].to(device))
        n = len(batch["index"])
        total += out.loss.item() * n
        count += n
    model.train()
    return total / max(count, 1)


def train_expert(expert: int, assignment_path: Path, base_model: str, out: Path, work_dir: Path,
                 settings: dict) -> dict:
    assignment = json.loads(assignment_path.read_text())
    if not 0 <= expert < assignment["num_experts"]:
        raise ValueError(f"expert {expert} does not exist: {assignment_path} has {assignment['num_experts']}")
    lora, tcfg = settings["lora"], settings["training"]
    train_utts = _utterances_of(assignment, "train", expert)
    val_utts = _utterances_of(assignment, "val", expert)
    val_note = None
    if not val_utts:
        val_note = "no validation utterance routed to this expert; validating on the whole validation set"
        val_utts = [Utterance.from_dict(d) for d in assignment["val"]]
    seed_everything(settings["seed"] + expert)
    device = pick_device()
    model, processor = load_base(base_model, settings["encoder_window_s"])
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=list(lora["target_modules"])))
    model.to(device).train()
    precision = resolve_precision(precision_setting(tcfg), device)
    prepare_precision(model, precision, device)
    metrics: dict = {"expert": expert, "n_train": len(train_utts), "n_val": len(val_utts), "val_note": val_note,
                     "history": [], "utterance_passes": 0, "train_seconds": 0.0}
    if not train_utts:
        # An empty cluster still gets an adapter (LoRA init = the base model) so routing stays valid;
        # the manifest says it was never trained.
        log.warning("expert %d has no training utterances; saving its untrained adapter", expert)
        with atomic_dir(work_dir / "best") as tmp:
            model.save_pretrained(tmp)
        publish_best(work_dir / "best", out, metrics)
        remove_work_dir(work_dir, keep=tcfg["keep_work"])
        return metrics
    cfg = settings["experts"]
    windows = encoder_windows(model)
    val_loader = make_loader(val_utts, processor, utterance_plan(val_utts, windows, cfg["batch_size"], shuffle=False),
                             windows=windows, num_workers=tcfg["num_workers"])
    plans = [utterance_plan(train_utts, windows, cfg["batch_size"], shuffle=True, seed=settings["seed"] * 1000 + epoch)
             for epoch in range(1, cfg["epochs"] + 1)]

    identity = resume_identity(settings, utterances=[u.id for u in train_utts] + [u.id for u in val_utts])
    recipe = ExpertRecipe(model, val_loader, device, precision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    loop = fit(recipe, optimizer=optimizer, plans=plans, batch_size=cfg["batch_size"],
               loader=lambda plan: make_loader(train_utts, processor, plan, windows=windows,
                                               num_workers=tcfg["num_workers"], seed=settings["seed"]),
               tcfg=tcfg, work_dir=work_dir, identity=identity, select_by="loss", precision=precision,
               batch_size_key="experts.batch_size", name=f"expert {expert}")
    best = next((h for h in loop["history"] if h["epoch"] == loop["best_epoch"]), None)
    metrics.update(history=loop["history"], best_val_loss=best["val_loss"] if best else None,
                   utterance_passes=loop["utterance_passes"], train_seconds=loop["train_seconds"],
                   skipped_steps=loop["skipped_steps"])
    if best is None:
        metrics["val_note"] = "validation loss was never finite; the last weights were kept"
    publish_best(loop["best_dir"], out, metrics, extra_files=[loop["metrics_path"]])
    remove_work_dir(work_dir, keep=tcfg["keep_work"])
    return metrics


class ExpertRecipe:
    """Expert pretraining's part of the shared loop: one PEFT LoRA on its cluster's utterances."""

    def __init__(self, model, val_loader, device: torch.device, precision: str):
        self.model, self.val_loader, self.device, self.precision = model, val_loader, device, precision

    def batch_losses(self, batch: dict) -> dict:
        with autocast(self.precision, self.device):
            out = self.model(input_features=batch["input_features"].to(self.device),
                             labels=batch["labels"].to(self.device))
        return {"loss": out.loss}

    def window_losses(self) -> dict:
        return {}

    def validate(self) -> dict:
        return {"val_loss": validation_loss(self.model, self.val_loader, self.device, self.precision)}

    def save(self, out_dir: Path) -> None:
        with atomic_dir(out_dir) as tmp:
            self.model.save_pretrained(tmp)

    def trainable_state(self) -> dict:
        return get_peft_model_state_dict(self.model)

    def load_trainable_state(self, state: dict) -> None:
        set_peft_model_state_dict(self.model, state)


def manifest(expert_dirs: list[Path], out: Path) -> dict:
    experts = []
    for i, d in enumerate(sorted(expert_dirs, key=lambda p: int(p.name.rsplit("_", 1)[1]))):
        record = json.loads((d / "training.json").read_text())
        if record["expert"] != i:
            raise ValueError(f"{d}: expected expert {i}, found {record['expert']}; experts must be numbered 0..K-1")
        experts.append({"expert": i, "path": str(d), "n_train": record["n_train"],
                        "best_val_loss": record.get("best_val_loss"), "utterance_passes": record["utterance_passes"],
                        "train_seconds": record["train_seconds"]})
    result = {"num_experts": len(experts), "experts": experts}
    write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assign", help="decide each utterance's expert")
    for flag in ("--utterances", "--val", "--embeddings-dir", "--labels", "--gating", "--out"):
        p.add_argument(flag, type=Path, required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0, help="audio decoding processes (training.num_workers)")
    p.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    t = sub.add_parser("train", help="fine-tune one expert")
    t.add_argument("--expert", type=int, required=True)
    t.add_argument("--assignment", type=Path, required=True)
    t.add_argument("--base-model", required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--work-dir", type=Path, required=True, help="resume checkpoints, best adapter")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    m = sub.add_parser("manifest", help="list the finished experts")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("expert_dirs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "manifest":
        manifest(args.expert_dirs, args.out)
        return
    torch.set_num_threads(args.threads)
    settings = parse_settings_arg(args.settings)
    if args.command == "assign":
        assign(args.utterances, args.val, args.embeddings_dir, args.labels, args.gating, args.base_model, args.out,
               settings, num_workers=args.num_workers)
    else:
        with work_dir_lock(args.work_dir, "experts train"):
            train_expert(args.expert, args.assignment, args.base_model, args.out, args.work_dir, settings)


if __name__ == "__main__":
    main()
