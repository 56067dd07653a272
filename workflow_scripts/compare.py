"""Matched controls for the mixture: does it beat one LoRA adapter on the run's own data?

Every variant trains on exactly the run's samples (asr_train / asr_val) with the run's epochs, seed
and schedule, and is decoded on the run's eval sample:
- zero_shot: the base model at its native window, plain `generate`, no adapter;
- lora_same_params: one LoRA of rank r x K (alpha x K, so alpha/r is unchanged) = the experts' parameters;
- lora_same_rank: one LoRA of the experts' rank r = the mixture's compute per utterance;
- lora_same_steps: lora_same_params trained for as many utterance passes as the mixture's expert
  pretraining and joint training together;
- moe: the run's own asr_best, routed as trained;
- moe_speaker_routing: the same model, each Dev speaker routed by the gate's mean probabilities;
- moe_random_routing: the mixture (pretrained experts when the run has them) with each speaker sent
  to a fixed, seeded random expert, in training and eval;
- moe_oracle_etiology: one expert per etiology, routed by the true label (only with K = #etiologies).

    python -m workflow_scripts.compare train --variant lora_same_params --train T --val V --base-model M \
        --out compare/lora_same_params/model --work-dir _work/compare/lora_same_params --settings '{...}' \
        [--clusters clusters.json] [--gating gating.safetensors --experts experts/manifest.json] [--mixture asr_best]
    python -m workflow_scripts.compare eval --variant zero_shot --utterances data/eval.json --base-model M \
        --out-dir compare/zero_shot --settings '{...}' [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from workflow_scripts import asr
from workflow_scripts import eval as evaluation
from workflow_scripts.base_model import load_whisper
from workflow_scripts.decoding import chunk_clips, join_chunks, read_clips
from workflow_scripts.device import pick_device, prepare_precision, resolve_precision
from workflow_scripts.model_files import read_training_record
from workflow_scripts.sap_data import read_utterances
from workflow_scripts.settings import parse_settings_arg
from workflow_scripts.variants import TRAINED, VARIANTS, variant_settings
from workflow_scripts.whisper_io import transcribe, window_seconds
from workflow_scripts.work_lock import work_dir_lock

log = logging.getLogger("compare")

def train_variant(variant: str, train_path: Path, val_path: Path, base_model: str, out: Path, work_dir: Path,
                  settings: dict, clusters: Path | None = None, gating: Path | None = None,
                  experts: Path | None = None, mixture: Path | None = None) -> dict:
    """Train one control. `clusters` gives the mixture's K after pretraining (else num_experts);
    `gating`/`experts` start moe_random_routing from the pretrained experts; `mixture` (asr_best)
    gives lora_same_steps its budget of utterance passes."""
    num_experts = json.loads(clusters.read_text())["num_clusters"] if clusters else settings["num_experts"]
    s = variant_settings(settings, variant, num_experts)
    max_passes = None
    if variant == "lora_same_steps":
        if mixture is None:
            raise ValueError("lora_same_steps needs --mixture (the run's asr_best) to know the mixture's passes")
        record = read_training_record(mixture)
        max_passes = record["utterance_passes"] + record["pretraining_utterance_passes"]
        log.info("training for %d utterance passes (%d joint + %d pretraining)", max_passes,
                 record["utterance_passes"], record["pretraining_utterance_passes"])
    if variant != "moe_random_routing":
        gating = experts = None
    record = asr.train(train_path, val_path, base_model, out, work_dir, s, gating=gating, experts=experts,
                       max_passes=max_passes)
    log.info("%s: %s trainable parameters, %d utterance passes", variant, record["trainable_params"],
             record["utterance_passes"])
    return record


def _cost(model_dir: Path) -> dict:
    """Trainable parameters, training seconds and utterance passes of a trained model (pretraining included),
    and its validation WER: design choices are made on held-out Train speakers, not on the eval set."""
    r = read_training_record(model_dir)
    return {"trainable_params": r["trainable_params"], "val_wer": r["best_val_wer"],
            "train_seconds": round(r["train_seconds"] + r["pretraining_seconds"], 2),
            "utterance_passes": r["utterance_passes"] + r["pretraining_utterance_passes"]}


@torch.no_grad()
def zero_shot(utterances: Path, base_model: str, out_dir: Path, batch_size: int, precision: str = "auto",
              split_as_kit: bool | None = None) -> dict:
    """The stock base model at its native window (not the run's shortened one), plain greedy generate; clips
    over 30 s in 30 s chunks and unreadable ones as empty hypotheses, as eval decodes them."""
    device = pick_device()
    model, processor = load_whisper(base_model)
    model.to(device).eval().requires_grad_(False)
    precision = resolve_precision(precision, device)
    prepare_precision(model, precision, device)
    utts = read_utterances(utterances)
    start = time.perf_counter()
    hyps: list[str] = []
    failed: dict[int, str] = {}
    for begin in range(0, len(utts), batch_size):
        batch = range(begin, min(begin + batch_size, len(utts)))
        chunks, owner = chunk_clips(read_clips(utts, failed, batch))
        texts = join_chunks(transcribe(model, processor, chunks, batch_size=batch_size, precision=precision),
                            owner, len(batch))
        hyps += ["" if i in failed else text for i, text in zip(batch, texts, strict=True)]
    extra = {"num_experts": 0, "routing": None, "base_model": base_model, "encoder_window_s": [window_seconds(model)],
             "coverage": evaluation.coverage(utts, failed, split_as_kit),
             "decode_seconds": round(time.perf_counter() - start, 2),
             "trainable_params": {"lora": 0, "gate": 0, "total": 0}, "train_seconds": 0.0, "utterance_passes": 0,
             "val_wer": None}
    return evaluation.write_results(utts, [None] * len(utts), hyps, out_dir, extra)


def eval_variant(variant: str, utterances: Path, base_model: str, out_dir: Path, settings: dict,
                 model: Path | None = None, num_workers: int = 0) -> dict:
    if variant == "zero_shot":
        metrics = zero_shot(utterances, base_model, out_dir, settings["eval"]["batch_size"],
                            settings.get("precision", "auto"), settings.get("split_as_kit"))
    else:
        if model is None:
            raise ValueError(f"variant {variant} needs --model (its trained folder)")
        eval_settings = {**settings, "eval": {**settings["eval"], "baseline": False}}
        routing = "gate_speaker" if variant == "moe_speaker_routing" else None
        metrics = evaluation.evaluate(model, utterances, base_model, out_dir, eval_settings, routing=routing,
                                      num_workers=num_workers, more_metrics=_cost(model))
    log.info("%s: WER %.4f on %d utterances", variant, metrics["overall"]["wer"], metrics["overall"]["n"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one control variant")
    t.add_argument("--variant", choices=TRAINED, required=True)
    for flag in ("--train", "--val", "--out", "--work-dir"):
        t.add_argument(flag, type=Path, required=True)
    for flag in ("--clusters", "--gating", "--experts", "--mixture"):
        t.add_argument(flag, type=Path)
    e = sub.add_parser("eval", help="decode the eval sample with one variant")
    e.add_argument("--variant", choices=VARIANTS, required=True)
    e.add_argument("--utterances", type=Path, required=True)
    e.add_argument("--out-dir", type=Path, required=True)
    e.add_argument("--model", type=Path, help="the variant's trained folder (all but zero_shot)")
    e.add_argument("--num-workers", type=int, default=0, help="audio decoding processes (training.num_workers)")
    for p in (t, e):
        p.add_argument("--base-model", required=True)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    settings = parse_settings_arg(args.settings)
    if args.command == "train":
        with work_dir_lock(args.work_dir, "compare train"):
            train_variant(args.variant, args.train, args.val, args.base_model, args.out, args.work_dir, settings,
                          clusters=args.clusters, gating=args.gating, experts=args.experts, mixture=args.mixture)
    else:
        eval_variant(args.variant, args.utterances, args.base_model, args.out_dir, settings, model=args.model,
                     num_workers=args.num_workers)


if __name__ == "__main__":
    main()
