"""Stage 5: joint mixture-of-LoRA-experts training.

The gate routes each utterance (top-1) from its pooled base-encoder embedding; only the routed
samples pass through each expert, and every routed expert gets gradients in the same backward pass
(no PEFT `set_adapter`, which freezes the others). The gate learns through its routing probability,
a load-balancing loss that keeps routing from collapsing onto one expert, and (after pretraining) a
cross-entropy towards each utterance's pretraining cluster; the route is chosen with dropout off,
exactly as eval chooses it (workflow_scripts/decoding.py). `asr.routing` swaps the gate for a
fixed control routing, and one expert makes it a plain LoRA (the comparison's controls).
Gradient accumulation, periodic and resume checkpoints under --work-dir (locked while the job runs,
removed once --out is published unless training.keep_work), early stopping; the best validation WER
(or loss, training.select_best_by) goes to --out.

    python -m workflow_scripts.asr --train data/asr_train.json --val data/asr_val.json --base-model M \
        [--gating gating.safetensors --experts experts/manifest.json --assignment experts/assignment.json] \
        --out results/quick/asr_best --work-dir results/quick/_work/asr --settings '{...}'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from workflow_scripts.atomic import write_text
from workflow_scripts.decoding import (
    FIXED_ROUTINGS,
    decode_routed,
    fixed_experts,
    route_utterances,
)
from workflow_scripts.device import pick_device, prepare_precision, resolve_precision
from workflow_scripts.gate_features import gate_features
from workflow_scripts.gate_mlp import GateMLP, read_gate_file
from workflow_scripts.gating import check_gate_record
from workflow_scripts.moe import MoEWhisper, load_balance_loss
from workflow_scripts.sampling import sample_utterances
from workflow_scripts.sap_data import Utterance, read_utterances
from workflow_scripts.scoring import score_corpus
from workflow_scripts.settings import parse_settings_arg, precision_setting
from workflow_scripts.train_loop import fit, world
from workflow_scripts.training import (
    load_base,
    make_loader,
    publish_best,
    resume_identity,
    seed_everything,
    utterance_plan,
)
from workflow_scripts.transcribe import model_card
from workflow_scripts.whisper_io import autocast, encoder_windows
from workflow_scripts.windows import window_ladder
from workflow_scripts.work_lock import remove_work_dir, work_dir_lock

log = logging.getLogger("asr")


class Context(NamedTuple):
    """What a batch needs besides the model: route sources, loss weights, device and precision."""

    cfg: dict
    targets: list[int]  # pretraining cluster per utterance (-100 = none): gate supervision
    fixed: list[int] | None  # fixed expert per utterance (control routings), else None
    gate_rows: torch.Tensor | None  # the gate's input per utterance (gate_features), on the device
    device: torch.device
    precision: str  # fp32, fp16 or bf16


def build_moe(base_model: str, settings: dict, gating: Path | None, experts: Path | None):
    """MoE on the frozen base: pretrained gate + experts, or random init (skip_pretraining).

    Straight-through weighting: a routed expert's output has weight 1 (as the expert was pretrained),
    while the gate still gets the gradient of its routing probability. A single expert, or a routing
    that ignores the audio (asr.routing), needs no gate.
    """
    lora = settings["lora"]
    model, processor = load_base(base_model, settings["encoder_window_s"])
    pooling, layer = settings["embeddings"]["pooling"], settings["embeddings"].get("layer", "last")
    gate = None
    if gating is not None:
        gate, extra = read_gate_file(gating)
        check_gate_record(extra, base_model=base_model, encoder_window_s=settings["encoder_window_s"], path=gating)
        pooling, layer = extra["pooling"], extra.get("layer", "last")
        num_experts = gate.config["num_experts"]
    else:
        num_experts = settings["num_experts"]
        width = model.config.d_model * (2 if pooling == "mean_std" else 1)
        gate = GateMLP(width, num_experts)
    if settings["asr"]["routing"] in FIXED_ROUTINGS or num_experts == 1:
        gate = None
    moe = MoEWhisper(model, num_experts, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                     target_modules=lora["target_modules"], gate=gate, weighting="straight_through",
                     shared=lora["shared"] and num_experts > 1)
    if experts is not None:
        manifest = json.loads(experts.read_text())
        if manifest["num_experts"] != moe.num_experts:
            raise ValueError(f"{experts} lists {manifest['num_experts']} experts but {gating} routes to "
                             f"{moe.num_experts}; rerun the experts stage")
        for record in manifest["experts"]:
            moe.load_expert_adapter(record["expert"], record["path"])
    return moe, processor, pooling, layer


def trainable_state(moe: MoEWhisper) -> dict:
    return {n: p.detach().cpu().clone() for n, p in moe.named_parameters() if p.requires_grad}


def count_trainable(moe: MoEWhisper) -> dict:
    gate = sum(p.numel() for p in moe.gate.parameters()) if moe.gate is not None else 0
    lora = sum(p.numel() for p in moe.parameters() if p.requires_grad) - gate
    return {"lora": lora, "gate": gate, "total": lora + gate}


def run_batch(moe: MoEWhisper, batch: dict, ctx: Context) -> dict:
    """Losses of one micro-batch. The load-balancing loss is left out here: train() computes it over the
    whole accumulation window, where a handful of utterances per micro-batch would make it noise."""
    feats = batch["input_features"].to(ctx.device)
    labels = batch["labels"].to(ctx.device)
    if ctx.fixed is not None or moe.gate is None:
        idx = torch.tensor([ctx.fixed[i] if ctx.fixed else 0 for i in batch["index"]])
        with autocast(ctx.precision, ctx.device):
            out = moe(feats, labels, expert_idx=idx)
        return {**out, "gate_inputs": None}
    # The gate's input was computed once for the job (gate_features): the encoder runs once per step.
    emb = ctx.gate_rows[torch.tensor(batch["index"], device=ctx.device)]
    targets = [ctx.targets[i] for i in batch["index"]]
    clusters = torch.tensor(targets, device=ctx.device)
    use_clusters = ctx.cfg["gate_supervision_weight"] > 0 and max(targets) >= 0  # decided on the host: no wait
    with autocast(ctx.precision, ctx.device):
        out = moe(feats, labels, emb, cluster_labels=clusters if use_clusters else None, balance_coef=0.0,
                  gate_loss_coef=ctx.cfg["gate_supervision_weight"])
    return {**out, "gate_inputs": emb}


def window_balance_loss(moe: MoEWhisper, embeddings: list[torch.Tensor],
                        routes: list[torch.Tensor]) -> torch.Tensor | None:
    """Switch load-balancing loss over every utterance of an accumulation window. The gate has not
    changed within the window, so recomputing its (dropout-free) probabilities gives the routes taken.

    With several processes the window spans every rank: the routed fractions and the utterance count
    are summed over ranks, and this rank's term carries its share of the mean probability, so the
    gradients summed by the training loop are those of the loss over the global window.
    """
    if world()[0] == 1:
        if not embeddings:
            return None
        probs = moe.gate.route_logits(torch.cat(embeddings)).softmax(-1)
        return load_balance_loss(probs, torch.cat(routes).to(probs.device))
    k = moe.num_experts
    device = next(moe.gate.parameters()).device
    counts = torch.zeros(k, device=device)
    if embeddings:
        probs = moe.gate.route_logits(torch.cat(embeddings)).softmax(-1)
        counts += torch.bincount(torch.cat(routes).to(device), minlength=k)
    torch.distributed.all_reduce(counts)
    total = counts.sum()
    if not embeddings or total == 0:
        return None  # this rank had no utterance in the window: its share of the loss is zero
    return k * torch.sum(counts / total * probs.sum(0) / total)


class JointRecipe:
    """Joint training's part of the shared loop: routed losses per micro-batch, the load-balancing loss
    per accumulation window, validation, MoE checkpoints."""

    def __init__(self, moe: MoEWhisper, ctx: Context, balance_weight: float, validate_fn):
        self.moe, self.ctx, self.balance_weight, self.validate = moe, ctx, balance_weight, validate_fn
        self.window_emb: list[torch.Tensor] = []
        self.window_idx: list[torch.Tensor] = []

    def batch_losses(self, batch: dict) -> dict:
        result = run_batch(self.moe, batch, self.ctx)
        if result["gate_inputs"] is not None:
            self.window_emb.append(result["gate_inputs"])
            self.window_idx.append(result["expert_idx"])
        counts = torch.bincount(result["expert_idx"].reshape(-1).to(self.ctx.device), minlength=self.moe.num_experts)
        return {"loss": result["loss"], "task_loss": result["task_loss"], "gate_loss": result["gate_loss"],
                "expert_counts": counts}

    def window_losses(self) -> dict:
        emb, idx = self.window_emb, self.window_idx
        self.window_emb, self.window_idx = [], []
        if self.balance_weight <= 0 or self.moe.gate is None:
            return {}
        # Every rank calls it, routed utterances or not: it holds a collective with several processes.
        balance = window_balance_loss(self.moe, emb, idx)
        if balance is None:
            return {}
        return {"loss": self.balance_weight * balance, "balance_loss": balance}

    def save(self, out_dir: Path) -> None:
        self.moe.save(out_dir)

    def trainable_state(self) -> dict:
        return trainable_state(self.moe)

    def load_trainable_state(self, state: dict) -> None:
        self.moe.load_state_dict(state, strict=False)


@torch.no_grad()
def validate(moe: MoEWhisper, loader, ctx: Context, wer_utts: list[Utterance], processor, routing: dict,
             num_workers: int = 0) -> dict:
    """Teacher-forced loss and routing on the validation split; greedy WER on `wer_utts` when given."""
    moe.eval()
    total, n, usage = 0.0, 0, [0] * moe.num_experts
    for batch in loader:
        out = run_batch(moe, batch, ctx)
        total += out["task_loss"].item() * len(batch["index"])
        n += len(batch["index"])
        for k in out["expert_idx"].tolist():
            usage[k] += 1
    result = {"val_loss": total / max(n, 1), "val_expert_usage": usage}
    if wer_utts:
        experts, weights = route_utterances(moe, processor, wer_utts, device=ctx.device, precision=ctx.precision,
                                            batch_size=ctx.cfg["batch_size"], num_workers=num_workers, **routing)
        hyps, _ = decode_routed(moe, processor, wer_utts, experts, weights, batch_size=ctx.cfg["batch_size"],
                                precision=ctx.precision, device=ctx.device, num_workers=num_workers)
        scores = score_corpus((u.transcript, h, u.etiology) for u, h in zip(wer_utts, hyps, strict=True))
        result["val_wer"] = scores["overall"]["wer"]
    moe.train()
    return result


def _epoch_sizes(n: int, epochs: int, max_passes: int | None) -> list[int]:
    """Utterances trained per epoch: all of them for `epochs` epochs, or until `max_passes` are done."""
    if max_passes is None:
        return [n] * epochs
    return [min(n, max_passes - e * n) for e in range(math.ceil(max_passes / n))]


def train(train_path: Path, val_path: Path, base_model: str, out: Path, work_dir: Path, settings: dict,
          gating: Path | None = None, experts: Path | None = None, assignment: Path | None = None,
          max_passes: int | None = None, embeddings: Path | None = None) -> dict:
    """Joint training; `max_passes` replaces the epoch count by a budget of utterance passes; `embeddings`
    (the embeddings stage's folder) lends the gate inputs it already has."""
    cfg, tcfg = settings["asr"], settings["training"]
    seed_everything(settings["seed"])
    train_utts, val_utts = read_utterances(train_path), read_utterances(val_path)
    if not val_utts:
        raise ValueError(f"{val_path} is empty: joint training needs held-out speakers; raise data.val_fraction")
    device = pick_device()
    processes, rank = world()
    moe, processor, pooling, layer = build_moe(base_model, settings, gating, experts)
    moe.to(device).train()
    precision = resolve_precision(precision_setting(tcfg), device)
    prepare_precision(moe, precision, device)
    routing = {"routing": cfg["routing"], "pooling": pooling, "layer": layer, "etiologies": settings["etiologies"],
               "seed": settings["seed"]}
    rows = {"train": None, "val": None}
    if moe.gate is not None:
        if rank > 0:  # rank 0 computes and caches the gate inputs; the others read its cache
            torch.distributed.barrier()
        spec = {"base_model": base_model, "encoder_window_s": window_ladder(settings["encoder_window_s"]),
                "pooling": pooling, "layer": layer, "precision": precision}
        for name, utts in (("train", train_utts), ("val", val_utts)):
            rows[name] = gate_features(moe, processor, utts, spec=spec, batch_size=cfg["batch_size"], device=device,
                                       num_workers=tcfg["num_workers"],
                                       cache_dir=work_dir, embeddings_dir=embeddings).to(device)
        if rank == 0 and processes > 1:
            torch.distributed.barrier()
        if gating is None:
            # A random gate still needs standardised inputs, as a pretrained one has (gating.py).
            moe.gate.fit_standardization(rows["train"])
    cluster_of = {}
    if assignment is not None:
        a = json.loads(assignment.read_text())
        cluster_of = {d["id"]: d["expert"] for split in ("train", "val") for d in a[split]}

    def context(utts: list[Utterance], gate_rows: torch.Tensor | None) -> Context:
        fixed = None
        if cfg["routing"] in FIXED_ROUTINGS:
            fixed = fixed_experts(utts, cfg["routing"], moe.num_experts, settings["etiologies"], settings["seed"])
        return Context(cfg, [cluster_of.get(u.id, -100) for u in utts], fixed, gate_rows, device, precision)

    train_ctx, val_ctx = context(train_utts, rows["train"]), context(val_utts, rows["val"])
    select_by = tcfg["select_best_by"]
    wer_utts = []
    if select_by == "wer":
        wer_utts = sample_utterances(val_utts, n=min(tcfg["val_wer_samples"], len(val_utts)), seed=settings["seed"])

    expert_params = [p for n, p in moe.named_parameters() if p.requires_grad and not n.startswith("gate.")]
    groups = [{"params": expert_params, "lr": cfg["lr"]}]
    if moe.gate is not None:
        groups.append({"params": list(moe.gate.parameters()), "lr": cfg["gate_lr"]})
    windows = encoder_windows(moe.base)
    val_loader = make_loader(val_utts, processor, utterance_plan(val_utts, windows, cfg["batch_size"], shuffle=False),
                             windows=windows, num_workers=tcfg["num_workers"])
    # asr.batch_size is per process: the global batches hold batch_size x processes utterances, and each
    # rank takes every processes-th of them, so N processes train on what one process would with N x.
    plans = [[batch[rank::processes] for batch in utterance_plan(
                train_utts, windows, cfg["batch_size"] * processes, shuffle=True, seed=settings["seed"] * 1000 + epoch,
                limit=size)]
             for epoch, size in enumerate(_epoch_sizes(len(train_utts), cfg["epochs"], max_passes), start=1)]

    identity = resume_identity(settings, base_model=base_model, max_passes=max_passes,
                               train=[u.id for u in train_utts], val=[u.id for u in val_utts])
    recipe = JointRecipe(moe, train_ctx, cfg["load_balance_weight"],
                         lambda: validate(moe, val_loader, val_ctx, wer_utts, processor, routing, tcfg["num_workers"]))
    loop = fit(recipe, optimizer=torch.optim.AdamW(groups), plans=plans, batch_size=cfg["batch_size"], tcfg=tcfg,
               loader=lambda plan: make_loader(train_utts, processor, plan, windows=windows,
                                               num_workers=tcfg["num_workers"], seed=settings["seed"]),
               work_dir=work_dir, identity=identity, select_by=select_by, precision=precision,
               batch_size_key="asr.batch_size", name="joint training")
    history, best_epoch = loop["history"], loop["best_epoch"]
    best_entry = next((h for h in history if h["epoch"] == best_epoch), None)
    record = {"base_model": base_model, "encoder_window_s": window_ladder(settings["encoder_window_s"]),
              "pooling": pooling, "layer": layer, "routing": cfg["routing"], "etiologies": settings["etiologies"],
              "seed": settings["seed"], "pretrained": gating is not None, "num_experts": moe.num_experts,
              "precision": precision, "selected_by": select_by, "best_epoch": best_epoch,
              "skipped_steps": loop["skipped_steps"],
              "best_val_loss": best_entry["val_loss"] if best_entry else None,
              "best_val_wer": best_entry.get("val_wer") if best_entry else None,
              "n_train": len(train_utts), "n_val": len(val_utts), "n_val_wer": len(wer_utts),
              "utterance_passes": loop["utterance_passes"], **_pretraining_cost(experts),
              "train_seconds": loop["train_seconds"], "trainable_params": count_trainable(moe), "history": history,
              "settings": settings}
    if rank > 0:
        return record
    card = work_dir / "README.md"
    write_text(card, model_card(record))
    publish_best(loop["best_dir"], out, record, processor, extra_files=[loop["metrics_path"], card])
    remove_work_dir(work_dir, keep=tcfg["keep_work"])
    return record


def _pretraining_cost(experts: Path | None) -> dict:
    """Utterance passes and seconds of the expert pretraining (0 without it), so a control can get as much."""
    records = json.loads(experts.read_text())["experts"] if experts is not None else []
    return {"pretraining_utterance_passes": sum(e["utterance_passes"] for e in records),
            "pretraining_seconds": round(sum(e["train_seconds"] for e in records), 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--gating", type=Path, help="pretrained gate (omit for random init)")
    parser.add_argument("--experts", type=Path, help="experts/manifest.json (omit for random init)")
    parser.add_argument("--assignment", type=Path, help="experts/assignment.json: gate supervision targets")
    parser.add_argument("--embeddings", type=Path,
                        help="embeddings/mapping.json: gate inputs already computed by the embeddings stage")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True, help="resume and periodic checkpoints")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    parser.add_argument("--max-passes", type=int, help="train for this many utterance passes instead of epochs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    # Under torchrun every process gets the same --work-dir; rank 0 alone writes there, so it alone locks it.
    lock = work_dir_lock(args.work_dir, "asr") if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext()
    with lock:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # started by torchrun (training.gpus > 1)
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        train(args.train, args.val, args.base_model, args.out, args.work_dir, parse_settings_arg(args.settings),
              gating=args.gating, experts=args.experts, assignment=args.assignment, max_passes=args.max_passes,
              embeddings=args.embeddings.parent if args.embeddings else None)


if __name__ == "__main__":
    main()
