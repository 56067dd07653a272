"""Watching a long training stage: TensorBoard event files beside metrics.jsonl, and the time left.

TensorBoard gets the points of metrics.jsonl (tag train/<name>; the learning rate of each parameter
group; expert usage as each expert's share of the interval's utterances) and of each validation
(val/<name>), at the global optimizer step. A resumed run hides what the interrupted one wrote after
its checkpoint (SummaryWriter's purge_step), because it writes those steps again.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Event files in `folder`; `resumed_step` is the checkpoint's global step, None for a fresh start."""

    def __init__(self, folder: Path, resumed_step: int | None):
        # Imported here: tensorboard costs a second or two to import and is only needed when switched on.
        from torch.utils.tensorboard import SummaryWriter

        if resumed_step is None:
            # A fresh start (no checkpoint, or one of other settings): curves of an abandoned run would mix in.
            shutil.rmtree(folder, ignore_errors=True)
        self.folder = folder
        self.writer = SummaryWriter(str(folder), purge_step=None if resumed_step is None else resumed_step + 1)

    def train(self, entry: dict) -> None:
        """One metrics.jsonl entry."""
        step = entry["step"]
        for key, value in entry.items():
            if key in ("step", "epoch"):
                continue
            if key == "lr":
                for group, rate in enumerate(value):
                    self.writer.add_scalar("train/lr" if len(value) == 1 else f"train/lr_group{group}", rate, step)
            elif key == "expert_usage":
                self._usage("train/expert_usage", value, step)
            else:
                self.writer.add_scalar(f"train/{key}", value, step)
        # Flushed at every point so that what metrics.jsonl holds is on disk here too (and before a checkpoint).
        self.writer.flush()

    def validation(self, entry: dict, step: int) -> None:
        """The val_* results of one validation (an epoch's history entry)."""
        for key, value in entry.items():
            if key == "val_expert_usage":
                self._usage("val/expert_usage", value, step)
            elif key.startswith("val_") and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"val/{key[4:]}", value, step)
        self.writer.flush()

    def _usage(self, tag: str, counts: Sequence[int], step: int) -> None:
        # Shares, not counts: intervals and validation sets differ in size, shares compare across them.
        total = max(sum(counts), 1)
        for expert, count in enumerate(counts):
            self.writer.add_scalar(f"{tag}/expert_{expert}", count / total, step)

    def publish(self, model_dir: Path) -> None:
        """Copy the event files into model_dir, which the stage publishes with metrics.jsonl."""
        self.writer.close()
        shutil.rmtree(model_dir / TENSORBOARD_DIR, ignore_errors=True)
        shutil.copytree(self.folder, model_dir / TENSORBOARD_DIR)


class StageClock:
    """Estimated time to the end of a stage: this process's seconds per batch since it started (or
    resumed), validations and checkpoints included, times the batches of all epochs left. Early
    stopping may end the stage sooner, so it is an upper bound."""

    def __init__(self, epoch_batches: Sequence[int], epoch: int, batch_in_epoch: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.left = sum(epoch_batches[epoch - 1:]) - batch_in_epoch
        self.ran = 0
        self.clock = clock
        self.start = clock()

    def tick(self) -> None:
        """One batch done."""
        self.left -= 1
        self.ran += 1

    def seconds_left(self) -> float | None:
        """None until a batch has been timed."""
        if not self.ran:
            return None
        return (self.clock() - self.start) / self.ran * self.left

    def describe(self) -> str:
        left = self.seconds_left()
        return "?" if left is None else f"at most {format_duration(left)}"


def format_duration(seconds: float) -> str:
    """Two units, coarse enough to read at a glance: 2d03h, 1h23m, 4m05s, 9s."""
    s = round(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"
