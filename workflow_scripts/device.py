"""Where a stage runs and in what arithmetic: its device (a GPU of its own, see gpu_pool) and precision.

Shared by every stage that runs the model, training or not; imports nothing that reads audio, so the GPU
check (bench/gpu_check.py) runs where only torch and transformers are installed.
"""

from __future__ import annotations

import logging
import os

import torch

from workflow_scripts.whisper_io import HALF_DTYPES, PRECISIONS

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    """This process's accelerator. A job sees only its own GPUs (CUDA_VISIBLE_DEVICES, set by gpu_pool or
    SLURM), so it is the first of them, or with torchrun the one of the process's local rank."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if rank >= visible:  # e.g. SLURM granted fewer GPUs than torchrun processes (slurm plugin issue #459)
        raise RuntimeError(f"process of local rank {rank} but only {visible} GPU(s) visible "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    # Calls that take no device (NCCL's barrier, bf16 support checks) then use this one, not GPU 0.
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def resolve_precision(setting: str, device: torch.device) -> str:
    """fp32, fp16 or bf16 on this device. auto: bf16 on a CUDA device that has it, else fp16 on CUDA,
    fp32 on the CPU. An explicit fp16/bf16 on the CPU runs (CPU autocast does both), slowly."""
    if setting == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting not in PRECISIONS:
        raise ValueError(f"training.precision={setting!r}: use auto or one of {PRECISIONS}")
    if setting != "fp32" and device.type != "cuda":
        log.warning("%s on the CPU: autocast runs it, but several times slower than fp32", setting)
    return setting


def prepare_precision(model: torch.nn.Module, precision: str, device: torch.device) -> None:
    """On CUDA: TF32 matmuls, and the frozen weights held in the half dtype (half the memory and
    bandwidth); trainable weights (adapters, gate) stay float32, as the optimizer needs. On the CPU
    nothing is cast: autocast alone runs the half-precision path."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if precision in HALF_DTYPES:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(HALF_DTYPES[precision])
