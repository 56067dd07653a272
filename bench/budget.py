"""Budget of a full SAP run on Whisper large-v2, per GPU profile: GPU hours per stage, disk, memory.

An estimate, not a measurement: no GPU has run the pipeline yet. It stands on stated assumptions (below)
and on what was measured here: the window ladder's share of 30 s encoder work comes from the clip-length
mix the benchmarks use (`windows.sap_like_durations`), checked against `make bench`'s measured step
speed-up (bench/results.json, window_speedup). Replace the throughput assumption with the GPU check's
utterances/s (`bash bench/gpu_check.sh`, docs/results/gpu_check.md) once a GPU has run it.

    .venv/bin/python bench/budget.py          # prints the Markdown tables of docs/budget.md
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from workflow_scripts.windows import POSITIONS_PER_SECOND, sap_like_durations, window_ladder

REPO = Path(__file__).resolve().parent.parent

# --- The corpus (DESIGN.md §2) and the run (config/schema.yaml defaults, the `full` run) -------------------
TRAIN_UTTS, DEV_UTTS = 320_000, 48_000
EMBEDDING_SHARE, EXPERT_SHARE = 0.05, 0.15
EXPERT_EPOCHS, ASR_EPOCHS = 3, 5  # maxima: early stopping may end joint training sooner
NUM_EXPERTS, LORA_R = 8, 16

# --- Whisper large-v2 -----------------------------------------------------------------------------------
ENCODER_PARAMS, DECODER_PARAMS = 0.635e9, 0.907e9
LAYERS, D_MODEL = 32, 1280
LABEL_TOKENS_PER_S = 3  # label tokens per second of SAP speech, as bench/gpu_check.py assumes
WEIGHTS_GB = {"fp32 safetensors": 6.2}

# --- Assumptions about the GPUs -------------------------------------------------------------------------
# Dense bf16 peaks (vendor data sheets) and the share of it reached (MFU); 30 % is typical of Whisper
# fine-tuning with short sequences; 20-40 % moves every GPU hour below by x1.5 / x0.75.
PEAK_BF16 = {"A100": 312e12, "H100": 989e12}
MFU = 0.30
# Frozen base with LoRA: the backward pass computes activation gradients (as many FLOPs as the forward)
# but no weight gradients for the frozen weights, so a training pass is about 2 forward passes.
TRAIN_OVER_FORWARD = 2.0
# Greedy decoding is bound by reading the decoder's weights once per generated token per batch; on top,
# transformers' generate() with 128 routed LoRA layers adds Python overhead. Seconds per decoding step of
# a batch, including both: an assumption to replace with a measurement.
DECODE_STEP_S = {"A100": 0.040, "H100": 0.025}
# The profiles' micro-batches are small (2-12 utterances of mostly 5 s windows), too small to keep a GPU
# busy: a micro-batch takes at least this long (kernel launches of 64 layers forward and backward, the
# Python of 128 routed LoRA layers), whatever its FLOPs. Encoder-only passes: a third of it.
MICRO_BATCH_FLOOR_S = 0.10
PROFILES = {"a100_40gb": "A100", "a100_80gb": "A100", "h100_80gb": "H100"}


def encoder_flops(window_s: float) -> float:
    """Forward FLOPs of large-v2's encoder at one window: 2 x params x positions plus self-attention."""
    positions = window_s * POSITIONS_PER_SECOND
    return 2 * ENCODER_PARAMS * positions + 4 * LAYERS * positions ** 2 * D_MODEL


def forward_flops(seconds: np.ndarray, ladder: list[float]) -> float:
    """Mean forward FLOPs per utterance (encoder at the clip's window, decoder over its label tokens)."""
    windows = np.array([next(w for w in ladder if s <= w) for s in seconds])
    encoder = np.mean([encoder_flops(w) for w in windows])
    decoder = 2 * DECODER_PARAMS * LABEL_TOKENS_PER_S * seconds.mean()
    return float(encoder + decoder)


def budget() -> dict:
    seconds = sap_like_durations(20_000, seed=0)
    ladder, fixed = window_ladder([5, 10, 20, 30]), window_ladder(30)
    fwd, fwd30 = forward_flops(seconds, ladder), forward_flops(seconds, fixed)
    mean_s = float(seconds.mean())
    encoder_only = fwd - 2 * DECODER_PARAMS * LABEL_TOKENS_PER_S * mean_s
    # stage: (utterance passes, FLOPs per utterance pass, the profile's batch-size key, floor share)
    passes = {
        "embeddings (encoder only)": (EMBEDDING_SHARE * TRAIN_UTTS, encoder_only, "embeddings", 1 / 3),
        "expert assignment (encoder only)": (EXPERT_SHARE * TRAIN_UTTS, encoder_only, "embeddings", 1 / 3),
        "expert pretraining": (EXPERT_SHARE * TRAIN_UTTS * EXPERT_EPOCHS, fwd * TRAIN_OVER_FORWARD, "experts", 1),
        "joint training (at most)": (TRAIN_UTTS * ASR_EPOCHS, fwd * TRAIN_OVER_FORWARD, "asr", 1),
    }
    decode_steps = LABEL_TOKENS_PER_S * mean_s + 4  # tokens of a mean clip plus the prompt
    table = {}
    for profile, gpu in PROFILES.items():
        hardware = yaml.safe_load((REPO / "profiles" / profile / "hardware.yaml").read_text())
        rate = PEAK_BF16[gpu] * MFU
        hours = {}
        for stage, (n, flops, key, floor) in passes.items():
            batch = hardware[key]["batch_size"]
            hours[stage] = n / batch * max(batch * flops / rate, floor * MICRO_BATCH_FLOOR_S) / 3600
        batches = DEV_UTTS / hardware["eval"]["batch_size"]
        hours["eval (Dev, greedy)"] = batches * decode_steps * DECODE_STEP_S[gpu] / 3600 + DEV_UTTS * fwd / rate / 3600
        hours["eval.baseline (zero-shot, same Dev)"] = hours["eval (Dev, greedy)"]
        hours["total"] = sum(hours.values())
        table[profile] = {k: round(v, 1) for k, v in hours.items()}
    audio_gb = (TRAIN_UTTS + DEV_UTTS) * mean_s * 16000 * 2 / 1e9
    adapter_mb = 3 * LAYERS * 2 * 2 * LORA_R * D_MODEL * 4 / 1e6  # q,v of 3 attentions per layer pair, fp32
    measured = json.loads((REPO / "bench" / "results.json").read_text()).get("window_speedup")
    return {
        "mean_clip_s": round(mean_s, 2),
        "ladder_flops_ratio": round(fwd30 / fwd, 2),
        "measured_window_speedup": measured if isinstance(measured, (int, float)) else (measured or {}).get("ratio"),
        "gpu_hours": table,
        "disk_gb": {
            "SAP download (tars)": round(audio_gb, 0),
            "unpacked copy (results/_datasets/; delete the tars after)": round(audio_gb, 0),
            "large-v2 snapshot (results/_models/hub/)": WEIGHTS_GB["fp32 safetensors"],
            "one run's results (experts, asr_best, resume checkpoints with optimiser state, epoch saves)":
                round((NUM_EXPERTS + 1) * adapter_mb * (2 + 3 + 2) / 1e3 + 0.1, 1),
        },
    }


def markdown(b: dict) -> str:
    profiles = list(b["gpu_hours"])
    lines = [f"| stage | {' | '.join(profiles)} |", "|---|" + "---|" * len(profiles)]
    for stage in b["gpu_hours"][profiles[0]]:
        lines.append(f"| {stage} | " + " | ".join(str(b["gpu_hours"][p][stage]) for p in profiles) + " |")
    lines += ["", "| disk | GB |", "|---|---|", *(f"| {k} | {v:g} |" for k, v in b["disk_gb"].items())]
    lines += ["", f"Mean clip {b['mean_clip_s']} s; the window ladder needs {b['ladder_flops_ratio']}x fewer "
              f"FLOPs than 30 s windows on this mix (measured step speed-up on the CPU: "
              f"{b['measured_window_speedup']}x)."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(budget()))
