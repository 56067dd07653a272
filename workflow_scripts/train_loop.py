"""The one training loop of expert pretraining and joint training.

Each stage brings a Recipe (its losses, validation and checkpoint format); the loop owns what must
not drift between them: gradient accumulation (each optimizer step's gradient is the mean over the
label tokens of its whole group, however the length-bucketed batches divide them), several processes
(gradients summed over ranks, so N processes on N shards equal one process on the global batch),
clipping and linear warm-up from `training`, the scheduler, mixed-precision scaling, skipped
non-finite steps, resume checkpoints (weights, optimizer, scheduler, scaler, RNG, position),
periodic checkpoints (the newest `training.keep_epoch_saves`) and the best one, early stopping, a
progress line and per-step metrics.

Per-step metrics go to <work_dir>/metrics.jsonl, one JSON object per `training.log_every_steps`
optimizer steps: step, epoch, learning rate, gradient norm, the recipe's loss parts, expert usage
and utterances per second. Statistics stay on the device between those read-outs. With
`training.tensorboard` the same points and each validation also go to TensorBoard event files in
<work_dir>/tensorboard (train_watch), copied into the best checkpoint folder at the end so that they are
published with metrics.jsonl. The progress line shows the loss, utterances per second and an upper
bound of the time left in the stage.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from workflow_scripts.atomic import write_text
from workflow_scripts.train_watch import TENSORBOARD_DIR, StageClock, TensorBoardLog
from workflow_scripts.training import load_resume, save_resume

log = logging.getLogger("train_loop")


class Recipe(Protocol):
    """What a training stage brings to the loop."""

    def batch_losses(self, batch: dict) -> dict[str, Tensor]:
        """Losses of one micro-batch: "loss" is backpropagated, every other scalar is logged; an optional
        "expert_counts" (K,) tensor counts the utterances per expert."""

    def window_losses(self) -> dict[str, Tensor]:
        """Losses over the whole accumulation window, added before each optimizer step ("loss" is
        backpropagated); {} when the stage has none."""

    def validate(self) -> dict:
        """At least "val_loss"; "val_wer" too when the best checkpoint is chosen by WER."""

    def save(self, out_dir: Path) -> None: ...

    def trainable_state(self) -> dict: ...

    def load_trainable_state(self, state: dict) -> None: ...


def improved(entry: dict, best: tuple, select_by: str) -> tuple | None:
    """The new best key if this validation beats `best`: lower WER (ties: lower loss), or lower loss."""
    key = (entry["val_wer"], entry["val_loss"]) if select_by == "wer" else (entry["val_loss"],)
    return key if key < best else None


def world() -> tuple[int, int]:
    """(processes, this process's rank): (1, 0) unless torchrun started several."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def loss_units(batch: dict) -> int:
    """What a batch's mean loss averages over: its label tokens (else its utterances)."""
    if "labels" in batch:
        return int((batch["labels"] != -100).sum())
    return len(batch["index"])


def _all_sum(value: Tensor) -> Tensor:
    if world()[0] > 1:
        torch.distributed.all_reduce(value)
    return value


def sync_gradients(params: list[torch.nn.Parameter], total_units: float) -> None:
    """Turn the summed, unit-weighted gradients into the mean over the step's units on every rank.

    With several processes the gradients are summed over ranks in one flat buffer. Routing may send a
    rank no utterance for some expert: its gradient counts as zero there, so every rank takes part in
    the same all-reduce (no hang, no unused-parameter error); a parameter no rank touched keeps no
    gradient, so the optimizer leaves it alone exactly as a single process would.
    """
    if world()[0] == 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(total_units)
        return
    touched = _all_sum(torch.tensor([float(p.grad is not None) for p in params], device=params[0].device))
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _all_sum(torch._utils._flatten_dense_tensors(grads)).div_(total_units)
    for p, grad, used in zip(params, torch._utils._unflatten_dense_tensors(flat, grads), touched.tolist(),
                             strict=True):
        p.grad = grad if used else None


def fit(recipe: Recipe, *, optimizer: torch.optim.Optimizer, plans: list[list[list[int]]],
        loader: Callable[[list[list[int]]], Iterable[dict]], batch_size: int, tcfg: dict, work_dir: Path,
        identity: dict, select_by: str, precision: str, batch_size_key: str, name: str) -> dict:
    """Train until the epochs (or utterance passes) are done or patience runs out.

    plans: each epoch's batches for this process (training.utterance_plan, seeded; with several
    processes, each rank's share of every global batch, possibly empty); loader(plan) yields them as
    model inputs, so a resumed epoch loads only the batches it has left. Only rank 0 writes files.
    Returns the loop's record: history (one entry per epoch), best_epoch, utterance_passes,
    train_seconds, skipped_steps.
    """
    accum = tcfg["gradient_accumulation_steps"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total_steps = sum(math.ceil(len(plan) / accum) for plan in plans)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tcfg["warmup_ratio"] * total_steps), total_steps)
    device = params[0].device
    # fp16 gradients underflow without loss scaling; bf16 has the range of fp32 and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    resume_path, best_dir, metrics_path = work_dir / "resume.pt", work_dir / "best", work_dir / "metrics.jsonl"
    work_dir.mkdir(parents=True, exist_ok=True)
    st = {"epoch": 1, "batch_in_epoch": 0, "global_step": 0, "best": (float("inf"),), "since_best": 0,
          "best_epoch": 0, "stopped": False, "history": [], "utterance_passes": 0, "train_seconds": 0.0,
          "skipped_steps": 0, "nonfinite_in_a_row": 0}
    state = load_resume(resume_path, identity)
    if state:
        recipe.load_trainable_state(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        st = state["loop"]
    rank0 = world()[1] == 0
    if rank0:
        _truncate_metrics(metrics_path, st["global_step"])
    board = (TensorBoardLog(work_dir / TENSORBOARD_DIR, st["global_step"] if state else None)
             if rank0 and tcfg["tensorboard"] else None)
    started = time.perf_counter()
    clock = StageClock([len(plan) for plan in plans], st["epoch"], st["batch_in_epoch"])

    def checkpoint() -> None:
        if not rank0:
            return
        loop = {**st, "train_seconds": st["train_seconds"] + time.perf_counter() - started}
        save_resume(resume_path, {"identity": identity, "trainable": recipe.trainable_state(),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "scaler": scaler.state_dict(), "loop": loop})

    log_every = tcfg["log_every_steps"]
    interval: dict[str, Tensor] = {}
    bar = None
    interval_start, interval_utts, micro, interval_steps, lr = time.perf_counter(), 0, 0, 0, []

    def flush(epoch: int) -> None:
        nonlocal interval, interval_start, interval_utts, micro, interval_steps
        entry = _read_out(interval, micro, st, epoch, lr, interval_utts, interval_start, max(interval_steps, 1))
        bar.set_postfix(loss=f"{entry.get('loss', float('nan')):.4f}", utt_s=entry["utterances_per_s"],
                        stage_eta=clock.describe())
        if rank0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        if board:
            board.train(entry)
        interval, interval_start, interval_utts, micro, interval_steps = {}, time.perf_counter(), 0, 0, 0

    while st["epoch"] <= len(plans) and not st["stopped"]:
        epoch, skip, plan = st["epoch"], st["batch_in_epoch"], plans[st["epoch"] - 1]
        n_batches = len(plan)
        bar = tqdm(total=n_batches, initial=skip, desc=f"{name} epoch {epoch}/{len(plans)}", unit="batch",
                   mininterval=30, file=sys.stderr, disable=not rank0)
        sums: dict[str, Tensor] = {}
        seen, windows, units, step_utts, bad = 0, 0, 0, 0, torch.zeros((), dtype=torch.bool, device=device)
        partial = st.get("partial") if skip else None
        if partial:  # resumed mid-epoch: the epoch's and the log interval's sums so far, as if never stopped
            sums, interval = _on(partial["sums"], device), _on(partial["interval"], device)
            seen, windows, micro = partial["seen"], partial["windows"], partial["micro"]
            interval_utts, interval_steps = partial["interval_utts"], partial["interval_steps"]
        for i, batch in enumerate(loader(plan[skip:]), start=skip):
            n = len(batch["index"])
            if n == 0:  # this rank's share of a small global batch: it still joins the step's all-reduce
                out = {}
            else:
                try:
                    out = recipe.batch_losses(batch)
                    loss = out["loss"]
                    bad |= ~torch.isfinite(loss.detach())
                    # Weighted by its units; sync_gradients divides by the whole step's units.
                    batch_units = loss_units(batch)
                    units += batch_units
                    scaler.scale(loss * batch_units).backward()
                except torch.OutOfMemoryError as err:
                    raise RuntimeError(
                        f"{name}: out of accelerator memory at {batch_size_key}={batch_size} with "
                        f"training.gradient_accumulation_steps={accum}; lower {batch_size_key} and raise "
                        "gradient_accumulation_steps by the same factor (same effective batch) in the profile's "
                        "hardware.yaml or the run's settings") from err
            if n:
                seen, micro, interval_utts = seen + 1, micro + 1, interval_utts + n
            step_utts += n
            for key, value in out.items():
                value = value.detach().float()
                sums[key] = sums.get(key, 0) + value
                interval[key] = interval.get(key, 0) + value
            bar.update(1)
            clock.tick()
            if (i + 1) % accum and i + 1 != n_batches:
                continue
            # One all-reduce per step for what the processes did together (nothing to reduce with one).
            total_units, global_utts = _all_sum(torch.tensor([float(units), float(step_utts)], device=device)).tolist()
            st["utterance_passes"] += int(global_utts)
            units, step_utts = 0, 0
            window = recipe.window_losses()
            if window:
                windows += 1
                scaler.scale(window["loss"] * total_units).backward()
                for key, value in window.items():
                    sums[f"window_{key}"] = sums.get(f"window_{key}", 0) + value.detach().float()
                    interval[f"window_{key}"] = interval.get(f"window_{key}", 0) + value.detach().float()
            bad = _all_sum(bad.float()) > 0  # every rank skips the same steps
            if bad:  # one device sync per optimizer step, not per micro-batch
                optimizer.zero_grad(set_to_none=True)
                st["skipped_steps"] += 1
                st["nonfinite_in_a_row"] += 1
                log.warning("%s: non-finite loss at epoch %d batch %d; optimizer step skipped (%d in a row)",
                            name, epoch, i, st["nonfinite_in_a_row"])
                if st["nonfinite_in_a_row"] >= tcfg["max_nonfinite_steps"]:
                    raise FloatingPointError(
                        f"{name}: {st['nonfinite_in_a_row']} optimizer steps in a row had a non-finite loss "
                        f"(training.max_nonfinite_steps); lower the learning rate or check the data and precision")
                bad = torch.zeros((), dtype=torch.bool, device=device)
                continue
            st["nonfinite_in_a_row"] = 0
            sync_gradients(params, max(total_units, 1.0))
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg["max_grad_norm"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()  # the rate this step used
            scheduler.step()
            st["global_step"] += 1
            interval_steps += 1
            interval["grad_norm"] = interval.get("grad_norm", 0) + grad_norm.detach().float()
            if st["global_step"] % log_every == 0:
                flush(epoch)
            if st["global_step"] % tcfg["checkpoint_every_steps"] == 0 and i + 1 < n_batches:
                st["batch_in_epoch"] = i + 1
                st["partial"] = {"sums": _on(sums, "cpu"), "interval": _on(interval, "cpu"), "seen": seen,
                                 "windows": windows, "micro": micro, "interval_utts": interval_utts,
                                 "interval_steps": interval_steps}
                checkpoint()
        if interval_steps:  # the epoch's last, shorter interval
            flush(epoch)
        bar.close()
        entry = {"epoch": epoch, "step": st["global_step"]}
        for key, value in sums.items():
            if key == "expert_counts":
                entry["train_expert_usage"] = value.long().tolist()
            else:
                entry[f"train_{key}"] = value.item() / max(windows if key.startswith("window_") else seen, 1)
        if epoch % tcfg["eval_every_n_epochs"] == 0 or epoch == len(plans):
            entry.update(recipe.validate())
            if board:
                board.validation(entry, st["global_step"])
            key = improved(entry, st["best"], select_by)
            if key is not None:
                st["best"], st["since_best"], st["best_epoch"] = key, 0, epoch
                if rank0:
                    recipe.save(best_dir)
            else:
                st["since_best"] += 1
            # Early stopping is decided at validations only; patience counts validations or epochs.
            waited = epoch - st["best_epoch"] if tcfg["patience_unit"] == "epochs" else st["since_best"]
            st["stopped"] = waited >= tcfg["patience"]
        if epoch % tcfg["save_every_n_epochs"] == 0 and rank0:
            recipe.save(work_dir / f"epoch_{epoch}")
            _prune_epoch_saves(work_dir, epoch, tcfg["keep_epoch_saves"])
        st["history"].append(entry)
        log.info("%s epoch %s", name, entry)
        st["epoch"], st["batch_in_epoch"], st["partial"] = epoch + 1, 0, None
        checkpoint()
    if rank0 and not best_dir.exists():
        # Validation never improved on +inf (a non-finite loss): keep the last weights, flagged.
        log.warning("%s: validation never gave a finite result; keeping the last weights", name)
        recipe.save(best_dir)
    if board:
        board.publish(best_dir)
    return {"history": st["history"], "best_epoch": st["best_epoch"] or None,
            "utterance_passes": st["utterance_passes"], "skipped_steps": st["skipped_steps"],
            "train_seconds": round(st["train_seconds"] + time.perf_counter() - started, 2), "best_dir": best_dir,
            "metrics_path": metrics_path}


def _on(values: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in values.items()}


def _read_out(interval: dict, micro: int, st: dict, epoch: int, lr: list[float], utts: int, since: float,
              steps: int) -> dict:
    """One metrics.jsonl entry: means over the interval's micro-batches (window losses and gradient
    norm over its optimizer steps)."""
    entry = {"step": st["global_step"], "epoch": epoch, "lr": lr}
    for key, value in interval.items():
        if key == "expert_counts":
            entry["expert_usage"] = value.long().tolist()
        else:
            per = steps if key.startswith("window_") or key == "grad_norm" else max(micro, 1)
            entry[key] = round(value.item() / per, 6)
    entry["utterances_per_s"] = round(utts / max(time.perf_counter() - since, 1e-9), 2)
    return entry


def _prune_epoch_saves(work_dir: Path, epoch: int, keep: int) -> None:
    """Keep the newest `keep` epoch_N saves up to `epoch`: each is a whole copy of the trainable weights (an
    8-expert large-v2 mixture's are hundreds of MB). A save numbered after `epoch` is left by an abandoned
    run whose resume checkpoint no longer matched; it goes too."""
    saves = {int(p.name.removeprefix("epoch_")): p for p in work_dir.glob("epoch_*")
             if p.name.removeprefix("epoch_").isdigit()}
    kept = sorted(n for n in saves if n <= epoch)[-keep:]
    for n, path in saves.items():
        if n not in kept:
            shutil.rmtree(path, ignore_errors=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop entries written after the resume checkpoint, which the resumed run writes again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text(path, "".join(f"{line}\n" for line in kept))
