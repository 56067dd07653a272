"""Joint-training throughput on a CUDA machine with no network: a large-v2-shaped Whisper, 8 LoRA experts.

No hub is reachable there, so the model is built from large-v2's configuration with random weights
(speed does not depend on the values). For bf16 and fp16, each with bucketed (5/10/20/30 s) and fixed
30 s windows, it runs warm-up steps then timed joint-training steps (routed forward, backward,
optimizer step, fp16 with its GradScaler) on an SAP-like length mix, and prints utterances/s, peak
memory and an MFU estimate against the GPU's dense bf16 peak.

    bash bench/gpu_check.sh              # on the GPU machine, at most ~8 minutes
    bash bench/gpu_check.sh --dry-run    # tiny config on the CPU: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from workflow_scripts.device import prepare_precision
from workflow_scripts.gate_mlp import GateMLP
from workflow_scripts.moe import MoEWhisper
from workflow_scripts.whisper_audio import SAMPLE_RATE
from workflow_scripts.whisper_io import autocast, use_encoder_windows
from workflow_scripts.windows import (
    MEL_FRAMES_PER_POSITION,
    POSITIONS_PER_SECOND,
    batch_plan,
    sap_like_durations,
    window_ladder,
)

LARGE_V2 = dict(vocab_size=51865, num_mel_bins=80, d_model=1280, encoder_layers=32, decoder_layers=32,
                encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
                max_source_positions=1500, max_target_positions=448)
TINY = dict(LARGE_V2, vocab_size=1000, pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=2,
            d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256)
# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' data sheets; MFU is left out for other GPUs.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
TOKENS_PER_SECOND = 3  # label tokens per second of speech, roughly, for SAP-style prompts


def step_batches(seconds: np.ndarray, ladder: list[float], batch_size: int, config: WhisperConfig, device) -> list:
    """(features, labels, seconds of speech) per batch: random log-mels at each batch's window."""
    plan = batch_plan([round(s * SAMPLE_RATE) for s in seconds], ladder, batch_size, shuffle=True, seed=0)
    out = []
    for batch in plan:
        longest = max(seconds[i] for i in batch)
        window = next(w for w in ladder if longest <= w)
        mel_frames = round(window * POSITIONS_PER_SECOND) * MEL_FRAMES_PER_POSITION
        feats = torch.randn(len(batch), config.num_mel_bins, mel_frames, device=device)
        tokens = max(4, round(TOKENS_PER_SECOND * longest))
        labels = torch.randint(0, config.vocab_size, (len(batch), tokens), device=device)
        out.append((feats, labels, float(sum(seconds[i] for i in batch)), window))
    return out


def step_flops(config: WhisperConfig, batch_size: int, window: float, tokens: int) -> float:
    """Forward + backward FLOPs of one step with a frozen base: the backward pass computes activation
    gradients (about one more forward) but no weight gradients for frozen weights, so ~2x forward."""
    d, frames = config.d_model, round(window * POSITIONS_PER_SECOND)
    enc_params = config.encoder_layers * (4 * d * d + 2 * d * config.encoder_ffn_dim)
    dec_params = config.decoder_layers * (8 * d * d + 2 * d * config.decoder_ffn_dim) + d * config.vocab_size
    forward = (2 * enc_params * frames + 4 * config.encoder_layers * frames * frames * d
               + 2 * dec_params * tokens + 4 * config.decoder_layers * tokens * (tokens + frames) * d)
    return 2.0 * forward * batch_size


def run(config: WhisperConfig, precision: str, ladder: list[float], steps: int, warmup: int, batch_size: int,
        device: torch.device) -> dict:
    torch.manual_seed(0)
    with device:
        model = WhisperForConditionalGeneration(config)
    use_encoder_windows(model, ladder)
    moe = MoEWhisper(model, 8, r=32, alpha=64, gate=GateMLP(config.d_model, 8), weighting="straight_through")
    moe.to(device).train()
    prepare_precision(moe, precision, device)
    optimizer = torch.optim.AdamW([p for p in moe.parameters() if p.requires_grad], lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    data = step_batches(sap_like_durations((steps + warmup) * batch_size), ladder, batch_size, config, device)
    gate_rows = torch.randn(batch_size, config.d_model, device=device)

    def step(feats, labels) -> None:
        with autocast(precision, device):
            out = moe(feats, labels, gate_rows[:len(feats)])
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for feats, labels, _, _ in data[:warmup]:
        step(feats, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    utts, flops, speech = 0, 0.0, 0.0
    for feats, labels, seconds, window in data[warmup:warmup + steps]:
        step(feats, labels)
        utts += len(feats)
        speech += seconds
        flops += step_flops(config, len(feats), window, labels.shape[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"precision": precision, "windows": ladder, "steps": min(steps, len(data) - warmup),
            "utterances_per_s": round(utts / elapsed, 2), "speech_seconds_per_s": round(speech / elapsed, 1),
            "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                if device.type == "cuda" else None),
            "mfu": round(flops / elapsed / peak, 4) if peak else None, "device": name}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny config on the CPU, a few steps")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.dry_run:
        config, device, steps, warmup = WhisperConfig(**TINY), torch.device("cpu"), 1, 1
        args.batch_size = 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU machine, or use --dry-run here")
        config, device, steps, warmup = WhisperConfig(**LARGE_V2), torch.device("cuda"), args.steps, 3
    results = []
    for precision in ("bf16", "fp16"):
        for ladder in (window_ladder([5, 10, 20, 30]), window_ladder(30)):
            result = run(config, precision, ladder, steps, warmup, args.batch_size, device)
            results.append(result)
            print(json.dumps(result), flush=True)
    bucketed = {r["precision"]: r["utterances_per_s"] for r in results if len(r["windows"]) > 1}
    fixed = {r["precision"]: r["utterances_per_s"] for r in results if len(r["windows"]) == 1}
    print(json.dumps({"bucketed_over_30s": {p: round(bucketed[p] / fixed[p], 2) for p in bucketed}}))


if __name__ == "__main__":
    main()
