"""Stage 4: one PEFT LoRA adapter per cluster, fine-tuned on the utterances of that cluster.

`assign` decides each expert-sample (and validation) utterance's expert once: the cluster label for
utterances that were embedded (the samples are nested, so most are), the pretrained gate for the
rest. `train --expert i` fine-tunes expert i (one Snakemake job per expert) and resumes from its
own checkpoint under --work-dir after a crash. `manifest` lists the finished experts.

    python -m workflow_scripts.experts assign --utterances data/expert.json --val data/asr_val.json \
        --embeddings-dir embeddings --labels cluster_labels.npy --gating gating.pt --base-model M --out A
    python -m workflow_scripts.experts train --expert 0 --assignment A --base-model M --out experts/expert_0 \
        --work-dir _work/experts/expert_0 --settings '{...}'
    python -m workflow_scripts.experts manifest --out experts/manifest.json experts/expert_0 experts/expert_1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import get_linear_schedule_with_warmup

from workflow_scripts.embeddings import embed_utterances
from workflow_scripts.gating import check_gate_record
from workflow_scripts.moe import read_gate_file
from workflow_scripts.sap_data import Utterance, read_utterances
from workflow_scripts.settings import parse_settings_arg, write_json_atomic
from workflow_scripts.training import (
    autocast,
    load_base,
    load_resume,
    make_loader,
    pick_device,
    publish_best,
    resume_identity,
    save_resume,
    seed_everything,
    use_fp16,
)

log = logging.getLogger("experts")


def assign(utterances: Path, val: Path, embeddings_dir: Path, labels_path: Path, gating: Path, base_model: str,
           out: Path, settings: dict) -> dict:
    """Expert of every expert-sample and validation utterance: cached cluster label, else the gate."""
    mapping = json.loads((embeddings_dir / "mapping.json").read_text())
    labels = np.load(labels_path)
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
        model.to(device).eval()
        matrix = embed_utterances(model, processor, missing, pooling=extra["pooling"],
                                  layer=extra.get("layer", "last"), batch_size=settings["embeddings"]["batch_size"],
                                  device=device)
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
    write_json_atomic(out, result)
    log.info("assigned %d utterances (%s); per expert %s", len(expert_of), source, result["counts"])
    return result


def _utterances_of(assignment: dict, split: str, expert: int) -> list[Utterance]:
    return [Utterance.from_dict(d) for d in assignment[split] if d["expert"] == expert]


@torch.no_grad()
def validation_loss(model, loader, device, fp16: bool) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        with autocast(fp16, device):
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
    fp16 = use_fp16(tcfg["fp16"], device)
    metrics: dict = {"expert": expert, "n_train": len(train_utts), "n_val": len(val_utts), "val_note": val_note,
                     "history": [], "utterance_passes": 0, "train_seconds": 0.0}
    best_dir = work_dir / "best_adapter"
    if not train_utts:
        # An empty cluster still gets an adapter (LoRA init = the base model) so routing stays valid;
        # the manifest says it was never trained.
        log.warning("expert %d has no training utterances; saving its untrained adapter", expert)
        model.save_pretrained(best_dir)
    else:
        metrics = _fit(model, processor, train_utts, val_utts, settings, work_dir, device, fp16, metrics)
    publish_best(best_dir, out, metrics)
    return metrics


def _fit(model, processor, train_utts, val_utts, settings, work_dir: Path, device, fp16: bool, metrics: dict) -> dict:
    cfg, tcfg = settings["experts"], settings["training"]
    accum = tcfg["gradient_accumulation_steps"]
    ids = [u.id for u in train_utts] + [u.id for u in val_utts]
    identity = resume_identity(settings, utterances=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"])
    batches_per_epoch = math.ceil(len(train_utts) / cfg["batch_size"])
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps_per_epoch * cfg["epochs"])
    scaler = torch.amp.GradScaler(enabled=fp16)
    val_loader = make_loader(val_utts, processor, batch_size=cfg["batch_size"], num_workers=tcfg["num_workers"],
                             shuffle=False)
    resume_path, best_dir = work_dir / "resume.pt", work_dir / "best_adapter"
    state = load_resume(resume_path, identity)
    epoch, skip, global_step, best, since_best = 1, 0, 0, float("inf"), 0
    passes, seconds = 0, 0.0
    if state:
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, skip, global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        best, since_best, metrics["history"] = state["best"], state["since_best"], state["history"]
        passes, seconds = state["utterance_passes"], state["train_seconds"]
    started = time.perf_counter()

    def checkpoint(batch_in_epoch: int, ep: int) -> None:
        save_resume(resume_path, {"identity": identity, "adapter": get_peft_model_state_dict(model),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "epoch": ep, "batch_in_epoch": batch_in_epoch, "global_step": global_step,
                                  "best": best, "since_best": since_best, "history": metrics["history"],
                                  "utterance_passes": passes, "train_seconds": seconds + time.perf_counter() - started})

    while epoch <= cfg["epochs"] and since_best < tcfg["patience"]:
        loader = make_loader(train_utts, processor, batch_size=cfg["batch_size"], num_workers=tcfg["num_workers"],
                             shuffle=True, seed=settings["seed"] * 1000 + epoch, skip_batches=skip)
        running, seen = 0.0, 0
        for i, batch in enumerate(loader, start=skip):
            with autocast(fp16, device):
                out = model(input_features=batch["input_features"].to(device), labels=batch["labels"].to(device))
            scaler.scale(out.loss / accum).backward()
            running, seen, passes = running + out.loss.item(), seen + 1, passes + len(batch["index"])
            if (i + 1) % accum == 0 or i + 1 == batches_per_epoch:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
                if global_step % tcfg["checkpoint_every_steps"] == 0 and i + 1 < batches_per_epoch:
                    checkpoint(i + 1, epoch)
        skip = 0
        entry = {"epoch": epoch, "train_loss": running / max(seen, 1), "step": global_step}
        if epoch % tcfg["eval_every_n_epochs"] == 0 or epoch == cfg["epochs"]:
            entry["val_loss"] = validation_loss(model, val_loader, device, fp16)
            if entry["val_loss"] < best:
                best, since_best = entry["val_loss"], 0
                model.save_pretrained(best_dir)
            else:
                since_best += 1
        if epoch % tcfg["save_every_n_epochs"] == 0:
            model.save_pretrained(work_dir / f"epoch_{epoch}")
        metrics["history"].append(entry)
        log.info("epoch %s", entry)
        epoch += 1
        checkpoint(0, epoch)
    if not best_dir.exists():
        # Validation never improved on +inf (a non-finite loss): keep the last weights, flagged.
        metrics["val_note"] = "validation loss was never finite; the last weights were kept"
        model.save_pretrained(best_dir)
    metrics["best_val_loss"] = best if math.isfinite(best) else None
    metrics["utterance_passes"] = passes
    metrics["train_seconds"] = round(seconds + time.perf_counter() - started, 2)
    return metrics


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
    write_json_atomic(out, result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assign", help="decide each utterance's expert")
    for flag in ("--utterances", "--val", "--embeddings-dir", "--labels", "--gating", "--out"):
        p.add_argument(flag, type=Path, required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument("--threads", type=int, default=2)
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
               settings)
    else:
        train_expert(args.expert, args.assignment, args.base_model, args.out, args.work_dir, settings)


if __name__ == "__main__":
    main()
