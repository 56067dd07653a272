"""Stage 5: joint mixture-of-LoRA-experts training.

The gate routes each utterance (top-1) from its pooled base-encoder embedding; only the routed
samples pass through each expert, and every routed expert gets gradients in the same backward pass
(no PEFT `set_adapter`, which freezes the others). The gate learns through its routing probability,
a load-balancing loss that keeps routing from collapsing onto one expert, and (after pretraining) a
cross-entropy towards each utterance's pretraining cluster. Gradient accumulation, periodic and
resume checkpoints under --work-dir, early stopping; the best validation loss goes to --out.

    python -m workflow_scripts.asr --train data/asr_train.json --val data/asr_val.json --base-model M \
        [--gating gating.pt --experts experts/manifest.json --assignment experts/assignment.json] \
        --out results/quick/asr_best --work-dir results/quick/_work/asr --settings '{...}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from workflow_scripts.moe import GateMLP, MoEWhisper, read_gate_file
from workflow_scripts.sap_data import read_utterances
from workflow_scripts.settings import parse_settings_arg
from workflow_scripts.training import (
    autocast,
    load_base,
    load_resume,
    make_loader,
    pick_device,
    publish_best,
    save_resume,
    seed_everything,
    use_fp16,
)
from workflow_scripts.whisper_io import pooled_embeddings

log = logging.getLogger("asr")


def build_moe(base_model: str, settings: dict, gating: Path | None, experts: Path | None):
    """MoE on the frozen base: pretrained gate + experts, or random init (skip_pretraining).

    Straight-through weighting: a routed expert's output has weight 1 (as the expert was pretrained),
    while the gate still gets the gradient of its routing probability.
    """
    lora = settings["lora"]
    model, processor = load_base(base_model, settings["encoder_window_s"])
    if gating is not None:
        gate, extra = read_gate_file(gating)
        pooling = extra["pooling"]
    else:
        pooling = "mean"
        gate = GateMLP(model.config.d_model, settings["num_experts"])
    moe = MoEWhisper(model, gate.config["num_experts"], r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                     target_modules=lora["target_modules"], gate=gate, weighting="straight_through")
    if experts is not None:
        manifest = json.loads(experts.read_text())
        if manifest["num_experts"] != moe.num_experts:
            raise ValueError(f"{experts} lists {manifest['num_experts']} experts but {gating} routes to "
                             f"{moe.num_experts}; rerun the experts stage")
        for record in manifest["experts"]:
            moe.load_expert_adapter(record["expert"], record["path"])
    return moe, processor, pooling


def trainable_state(moe: MoEWhisper) -> dict:
    return {n: p.detach().cpu().clone() for n, p in moe.named_parameters() if p.requires_grad}


def run_batch(moe: MoEWhisper, batch: dict, targets: list[int], pooling: str, cfg: dict, device, fp16: bool):
    feats = batch["input_features"].to(device)
    with torch.no_grad():
        # The gate sees the base encoder's embedding (no LoRA: routing is off outside moe.routing()).
        emb = pooled_embeddings(moe.base, feats, batch["num_samples"], pooling=pooling).float()
    clusters = torch.tensor([targets[i] for i in batch["index"]], device=device)
    use_clusters = cfg["gate_supervision_weight"] > 0 and bool((clusters >= 0).any())
    with autocast(fp16, device):
        return moe(feats, batch["labels"].to(device), emb, cluster_labels=clusters if use_clusters else None,
                   balance_coef=cfg["load_balance_weight"], gate_loss_coef=cfg["gate_supervision_weight"])


@torch.no_grad()
def validate(moe: MoEWhisper, loader, targets, pooling, cfg, device, fp16) -> dict:
    moe.eval()
    total, n, usage = 0.0, 0, [0] * moe.num_experts
    for batch in loader:
        out = run_batch(moe, batch, targets, pooling, cfg, device, fp16)
        total += out["task_loss"].item() * len(batch["index"])
        n += len(batch["index"])
        for k in out["expert_idx"].tolist():
            usage[k] += 1
    moe.train()
    return {"val_loss": total / max(n, 1), "val_expert_usage": usage}


def train(train_path: Path, val_path: Path, base_model: str, out: Path, work_dir: Path, settings: dict,
          gating: Path | None = None, experts: Path | None = None, assignment: Path | None = None) -> dict:
    cfg, tcfg = settings["asr"], settings["training"]
    seed_everything(settings["seed"])
    train_utts, val_utts = read_utterances(train_path), read_utterances(val_path)
    if not val_utts:
        raise ValueError(f"{val_path} is empty: joint training needs held-out speakers; raise data.val_fraction")
    device = pick_device()
    moe, processor, pooling = build_moe(base_model, settings, gating, experts)
    moe.to(device).train()
    fp16 = use_fp16(tcfg["fp16"], device)
    cluster_of = {}
    if assignment is not None:
        a = json.loads(assignment.read_text())
        cluster_of = {d["id"]: d["expert"] for split in ("train", "val") for d in a[split]}
    train_targets = [cluster_of.get(u.id, -100) for u in train_utts]
    val_targets = [cluster_of.get(u.id, -100) for u in val_utts]

    expert_params = [p for n, p in moe.named_parameters() if p.requires_grad and not n.startswith("gate.")]
    optimizer = torch.optim.AdamW([{"params": expert_params, "lr": cfg["lr"]},
                                   {"params": list(moe.gate.parameters()), "lr": cfg["gate_lr"]}])
    accum = tcfg["gradient_accumulation_steps"]
    batches_per_epoch = math.ceil(len(train_utts) / cfg["batch_size"])
    total_steps = math.ceil(batches_per_epoch / accum) * cfg["epochs"]
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg["warmup_ratio"] * total_steps), total_steps)
    scaler = torch.amp.GradScaler(enabled=fp16)
    val_loader = make_loader(val_utts, processor, batch_size=cfg["batch_size"], num_workers=tcfg["num_workers"],
                             shuffle=False)
    fingerprint = hashlib.sha256(json.dumps([settings, base_model, [u.id for u in train_utts],
                                             [u.id for u in val_utts]]).encode()).hexdigest()[:16]
    resume_path, best_dir = work_dir / "resume.pt", work_dir / "best"
    epoch, skip, step, best, since_best, history = 1, 0, 0, float("inf"), 0, []
    state = load_resume(resume_path, fingerprint)
    if state:
        moe.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, skip, step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        best, since_best, history = state["best"], state["since_best"], state["history"]

    def checkpoint(batch_in_epoch: int, ep: int) -> None:
        save_resume(resume_path, {"fingerprint": fingerprint, "trainable": trainable_state(moe),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "epoch": ep, "batch_in_epoch": batch_in_epoch, "global_step": step, "best": best,
                                  "since_best": since_best, "history": history})

    params = expert_params + list(moe.gate.parameters())
    while epoch <= cfg["epochs"] and since_best < tcfg["patience"]:
        loader = make_loader(train_utts, processor, batch_size=cfg["batch_size"], num_workers=tcfg["num_workers"],
                             shuffle=True, seed=settings["seed"] * 1000 + epoch, skip_batches=skip)
        sums = {"loss": 0.0, "task_loss": 0.0, "balance_loss": 0.0, "gate_loss": 0.0}
        usage, seen = [0] * moe.num_experts, 0
        for i, batch in enumerate(loader, start=skip):
            result = run_batch(moe, batch, train_targets, pooling, cfg, device, fp16)
            scaler.scale(result["loss"] / accum).backward()
            seen += 1
            for key in sums:
                sums[key] += result[key].item()
            for k in result["expert_idx"].tolist():
                usage[k] += 1
            if (i + 1) % accum == 0 or i + 1 == batches_per_epoch:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                if step % tcfg["checkpoint_every_steps"] == 0 and i + 1 < batches_per_epoch:
                    checkpoint(i + 1, epoch)
        skip = 0
        entry = {"epoch": epoch, "step": step, "train_expert_usage": usage,
                 **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()}}
        if epoch % tcfg["eval_every_n_epochs"] == 0 or epoch == cfg["epochs"]:
            entry.update(validate(moe, val_loader, val_targets, pooling, cfg, device, fp16))
            if entry["val_loss"] < best:
                best, since_best = entry["val_loss"], 0
                moe.save(best_dir)
            else:
                since_best += 1
        if epoch % tcfg["save_every_n_epochs"] == 0:
            moe.save(work_dir / f"epoch_{epoch}")
        history.append(entry)
        log.info("epoch %s", entry)
        epoch += 1
        checkpoint(0, epoch)
    if not best_dir.exists():
        moe.save(best_dir)
    record = {"base_model": base_model, "encoder_window_s": settings["encoder_window_s"], "pooling": pooling,
              "pretrained": gating is not None, "best_val_loss": best if math.isfinite(best) else None,
              "n_train": len(train_utts), "n_val": len(val_utts), "history": history, "settings": settings}
    publish_best(best_dir, out, record, processor)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--gating", type=Path, help="pretrained gate (omit for random init)")
    parser.add_argument("--experts", type=Path, help="experts/manifest.json (omit for random init)")
    parser.add_argument("--assignment", type=Path, help="experts/assignment.json: gate supervision targets")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True, help="resume and periodic checkpoints")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    train(args.train, args.val, args.base_model, args.out, args.work_dir, parse_settings_arg(args.settings),
          gating=args.gating, experts=args.experts, assignment=args.assignment)


if __name__ == "__main__":
    main()
