"""Stage 6: greedy decoding of the eval split with each utterance's routed expert, scored by the SAP rule.

Writes eval/metrics.json (overall and per-etiology WER/CER, expert usage per etiology) and
eval/per_utterance.tsv (id, speaker, etiology, expert, reference, hypothesis, wer).

    python -m workflow_scripts.eval --model results/quick/asr_best --utterances results/quick/data/eval.json \
        --base-model results/_models/tiny.en --out-dir results/quick/eval --settings '{...}'
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from workflow_scripts.moe import MoEWhisper
from workflow_scripts.sap_data import load_audio, read_utterances
from workflow_scripts.scoring import score_corpus, score_utterance
from workflow_scripts.settings import parse_settings_arg, write_json_atomic
from workflow_scripts.training import load_base, pick_device
from workflow_scripts.whisper_io import generate_kwargs, input_features, pooled_embeddings

log = logging.getLogger("eval")
TSV_COLUMNS = ("id", "speaker", "etiology", "expert", "reference", "hypothesis", "wer")


@torch.no_grad()
def decode(moe: MoEWhisper, processor, utts, pooling: str, batch_size: int, device,
           baseline: bool = False) -> list[tuple[int, str, str | None]]:
    """(expert, hypothesis, base-model hypothesis or None) per utterance.

    The gate's routing weight is applied as in training; the baseline is the frozen base model
    alone (routing off), decoded on the same features.
    """
    out = []
    for begin in range(0, len(utts), batch_size):
        batch = utts[begin:begin + batch_size]
        audios = [load_audio(u.wav) for u in batch]
        lengths = [len(a) for a in audios]
        feats = input_features(processor, audios).to(device)
        emb = pooled_embeddings(moe.base, feats, lengths, pooling=pooling).float()
        experts = moe.route(emb).expert_idx.tolist()
        kwargs = generate_kwargs(moe.base, lengths)
        texts = processor.batch_decode(moe.generate(feats, gate_inputs=emb, **kwargs), skip_special_tokens=True)
        base_texts = [None] * len(batch)
        if baseline:
            base_texts = processor.batch_decode(moe.base.generate(feats, **kwargs), skip_special_tokens=True)
        out.extend(zip(experts, (t.strip() for t in texts), (b and b.strip() for b in base_texts), strict=True))
        log.info("decoded %d / %d", begin + len(batch), len(utts))
    return out


def evaluate(model_dir: Path, utterances: Path, base_model: str, out_dir: Path, settings: dict) -> dict:
    record = json.loads((model_dir / "training.json").read_text())
    device = pick_device()
    base, processor = load_base(base_model, record["encoder_window_s"])
    moe = MoEWhisper.from_pretrained(model_dir, base).to(device).eval()
    utts = read_utterances(utterances)
    start = time.perf_counter()
    cfg = settings["eval"]
    decoded = decode(moe, processor, utts, record["pooling"], cfg["batch_size"], device, baseline=cfg["baseline"])
    seconds = time.perf_counter() - start

    usage: dict[str, Counter] = defaultdict(Counter)
    rows = []
    for u, (expert, hyp, _) in zip(utts, decoded, strict=True):
        usage[u.etiology][str(expert)] += 1
        rows.append({"id": u.id, "speaker": u.speaker, "etiology": u.etiology, "expert": expert,
                     "reference": u.transcript, "hypothesis": hyp,
                     "wer": round(score_utterance(u.transcript, hyp)["wer"], 4)})
    scores = score_corpus((u.transcript, hyp, u.etiology) for u, (_, hyp, _) in zip(utts, decoded, strict=True))
    metrics = {
        **scores,
        "expert_usage": {eti: dict(sorted(c.items())) for eti, c in sorted(usage.items())},
        "num_experts": moe.num_experts,
        "experts_used": len({r["expert"] for r in rows}),
        "base_model": base_model,
        "decode_seconds": round(seconds, 2),
    }
    if cfg["baseline"]:
        # Zero-shot base model on the same utterances: what the experts gained (or lost) per etiology.
        metrics["baseline"] = score_corpus((u.transcript, base, u.etiology)
                                           for u, (_, _, base) in zip(utts, decoded, strict=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".per_utterance.tsv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TSV_COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out_dir / "per_utterance.tsv")
    write_json_atomic(out_dir / "metrics.json", metrics)
    print(json.dumps({k: metrics[k] for k in ("overall", "per_etiology", "expert_usage", "baseline") if k in metrics},
                     indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="asr_best folder")
    parser.add_argument("--utterances", type=Path, required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    evaluate(args.model, args.utterances, args.base_model, args.out_dir, parse_settings_arg(args.settings))


if __name__ == "__main__":
    main()
