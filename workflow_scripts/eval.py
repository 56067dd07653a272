"""Stage 6: decoding of the eval split with each utterance's routed expert, scored by the SAP rule.

Writes eval/metrics.json (overall, per-etiology and per-prompt-category WER/CER, expert usage per
etiology, `coverage`: how many utterances were scored and which could not be decoded; for a learned
gate also `speaker_routing`: the scores with each speaker's utterances routed together by the gate's
mean probabilities), eval/per_utterance.tsv (id, speaker, etiology, expert, reference, hypothesis, wer)
and eval/predict.csv (`id,raw_hypos`, the SAP challenge kit's format: its evaluate.sh scores it).
When the data stage selected the split as the kit does (eval.split_as_kit), every Dev wav the kit's
manifest holds is here: clips over 30 s decoded in 30 s chunks, a clip that cannot be decoded scored as
an empty hypothesis (as the kit scores a missing prediction) and listed under coverage.not_decoded.

    python -m workflow_scripts.eval --model results/quick/asr_best --utterances results/quick/data/eval.json \
        --base-model results/_models/tiny.en --out-dir results/quick/eval --settings '{...}'
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from workflow_scripts.atomic import atomic_file, write_json, write_text
from workflow_scripts.decoding import ROUTINGS, decode_routed, gate_inputs, gate_routes, is_long, route_utterances
from workflow_scripts.device import pick_device, prepare_precision, resolve_precision
from workflow_scripts.model_files import read_training_record
from workflow_scripts.moe import MoEWhisper
from workflow_scripts.sap_data import Utterance, read_utterances
from workflow_scripts.scoring import score_corpus, score_utterance
from workflow_scripts.settings import parse_settings_arg
from workflow_scripts.training import load_base
from workflow_scripts.transcribe import model_card
from workflow_scripts.windows import window_ladder

log = logging.getLogger("eval")
TSV_COLUMNS = ("id", "speaker", "etiology", "expert", "reference", "hypothesis", "wer")
# The SAP challenge kit's prediction file: its evaluate.sh reads these columns (a missing id scores as empty).
PREDICT_COLUMNS = ("id", "raw_hypos")


def write_results(utts: list[Utterance], experts: list[int | None], hyps: list[str], out_dir: Path,
                  extra: dict) -> dict:
    """per_utterance.tsv, predict.csv and metrics.json (scores per etiology and per prompt category, expert
    usage per etiology, `extra`), each written atomically.

    The metrics are computed from exactly the rows written, so rescoring the TSV, or the kit scoring
    predict.csv, gives the same numbers.
    """
    usage: dict[str, Counter] = defaultdict(Counter)
    rows = []
    for u, expert, hyp in zip(utts, experts, hyps, strict=True):
        if expert is not None:
            usage[u.etiology][str(expert)] += 1
        rows.append({"id": u.id, "speaker": u.speaker, "etiology": u.etiology,
                     "expert": "" if expert is None else expert, "reference": u.transcript, "hypothesis": hyp,
                     "wer": round(score_utterance(u.transcript, hyp)["wer"], 4)})
    metrics = {
        **score_corpus((u.transcript, hyp, u.etiology) for u, hyp in zip(utts, hyps, strict=True)),
        # SAP's prompt categories (commands, novel sentences, spontaneous speech, ...): where the errors are.
        "per_category": score_corpus((u.transcript, hyp, u.category or "unlabelled")
                                     for u, hyp in zip(utts, hyps, strict=True))["per_etiology"],
        "expert_usage": {eti: dict(sorted(c.items())) for eti, c in sorted(usage.items())},
        "experts_used": len({e for e in experts if e is not None}),
        **extra,
    }
    with atomic_file(out_dir / "per_utterance.tsv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=TSV_COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_file(out_dir / "predict.csv", "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(PREDICT_COLUMNS)
        writer.writerows((u.id, hyp) for u, hyp in zip(utts, hyps, strict=True))
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _speaker_routing(moe: MoEWhisper, processor, utts: list[Utterance], experts: list[int], hyps: list[str],
                     routes: tuple[list[int], list[float]], cfg: dict, device, precision: str,
                     num_workers: int = 0) -> dict:
    """Scores with each speaker's utterances all sent to the expert of the gate's mean probabilities.

    Greedy decoding through the same expert gives the same text, so only the utterances whose expert
    changes are decoded again.
    """
    spk_experts, spk_weights = routes
    changed = [i for i, (a, b) in enumerate(zip(experts, spk_experts, strict=True)) if a != b]
    redone, _ = decode_routed(moe, processor, [utts[i] for i in changed], [spk_experts[i] for i in changed],
                              [spk_weights[i] for i in changed], batch_size=cfg["batch_size"], device=device,
                              precision=precision, num_workers=num_workers, num_beams=cfg["num_beams"], failed={})
    spk_hyps = list(hyps)
    for i, hyp in zip(changed, redone, strict=True):
        spk_hyps[i] = hyp
    usage: dict[str, Counter] = defaultdict(Counter)
    for u, k in zip(utts, spk_experts, strict=True):
        usage[u.etiology][str(k)] += 1
    return {**score_corpus((u.transcript, h, u.etiology) for u, h in zip(utts, spk_hyps, strict=True)),
            "utterances_rerouted": len(changed),
            "expert_usage": {eti: dict(sorted(c.items())) for eti, c in sorted(usage.items())}}


def coverage(utts: list[Utterance], failed: dict[int, str], split_as_kit: bool | None) -> dict:
    """What the scores cover: the utterances scored (all of eval.json), whether that is the challenge kit's
    selection, how many were decoded in 30 s chunks, and the ones whose audio could not be decoded (scored
    as empty hypotheses, as the kit scores a missing prediction)."""
    if failed:
        log.warning("%d utterance(s) could not be decoded and score as empty hypotheses, e.g. %s",
                    len(failed), utts[min(failed)].wav)
    return {"utterances": len(utts), "split_as_kit": split_as_kit,
            "over_30s": sum(map(is_long, utts)),
            "not_decoded": [{"id": utts[i].id, "wav": utts[i].wav, "error": err} for i, err in sorted(failed.items())]}


def evaluate(model_dir: Path, utterances: Path, base_model: str, out_dir: Path, settings: dict,
             routing: str | None = None, num_workers: int = 0, update_model_card: bool = False,
             more_metrics: dict | None = None, encoder_window_s: float | list[float] | None = None) -> dict:
    """Decode with each utterance's expert, routed as in training (or by `routing`, e.g. gate_speaker);
    audio decoded in `num_workers` DataLoader workers. `more_metrics` go into metrics.json as they are.
    With `update_model_card`, the model folder's README.md gets the Dev scores (the run's own eval; the
    comparison's variants leave it alone). `encoder_window_s` decodes (and routes) at other windows than
    the model was trained with: does a model's WER come from its training windows or its decoding ones?"""
    record = read_training_record(model_dir)
    if Path(record["base_model"]) != Path(base_model):
        raise ValueError(f"{model_dir} was trained on {record['base_model']} but eval was given {base_model}; "
                         "evaluate with the run's own base model")
    if encoder_window_s is not None and update_model_card:
        raise ValueError("the model card records the model's own eval, at its training windows: drop "
                         "--encoder-window-s or --update-model-card")
    windows = record["encoder_window_s"] if encoder_window_s is None else window_ladder(encoder_window_s)
    device = pick_device()
    base, processor = load_base(base_model, windows)
    moe = MoEWhisper.from_pretrained(model_dir, base).to(device).eval().requires_grad_(False)
    precision = resolve_precision(settings.get("precision", "auto"), device)
    prepare_precision(moe, precision, device)
    utts = read_utterances(utterances)
    cfg = settings["eval"]
    routing = routing or record["routing"]
    start = time.perf_counter()
    speaker_routes = None
    failed: dict[int, str] = {}  # utterance index -> why its audio could not be decoded
    if routing == "gate" and moe.num_experts > 1:
        emb = gate_inputs(moe, processor, utts, pooling=record["pooling"], layer=record["layer"],
                          batch_size=cfg["batch_size"], device=device, precision=precision, num_workers=num_workers,
                          failed=failed)
        experts, weights = gate_routes(moe, emb)
        speaker_routes = gate_routes(moe, emb, [u.speaker for u in utts])
    else:
        experts, weights = route_utterances(moe, processor, utts, routing, pooling=record["pooling"],
                                            layer=record["layer"], etiologies=record["etiologies"],
                                            seed=record["seed"], batch_size=cfg["batch_size"], device=device,
                                            precision=precision, num_workers=num_workers, failed=failed)
    hyps, base_hyps = decode_routed(moe, processor, utts, experts, weights, batch_size=cfg["batch_size"],
                                    device=device, baseline=cfg["baseline"], precision=precision,
                                    num_workers=num_workers, num_beams=cfg["num_beams"], failed=failed)
    extra = {"num_experts": moe.num_experts, "routing": routing, "base_model": base_model,
             "encoder_window_s": windows, "precision": precision, "num_beams": cfg["num_beams"],
             "coverage": coverage(utts, failed, settings.get("split_as_kit"))}
    if encoder_window_s is not None:
        extra["trained_encoder_window_s"] = record["encoder_window_s"]
    if speaker_routes is not None:
        extra["speaker_routing"] = _speaker_routing(moe, processor, utts, experts, hyps, speaker_routes, cfg, device,
                                                    precision, num_workers)
    extra["decode_seconds"] = round(time.perf_counter() - start, 2)
    extra.update(more_metrics or {})
    if base_hyps is not None:
        # The frozen base model on the same utterances and window: what the experts gained per etiology.
        # The stock model at its native window is the comparison's zero_shot variant.
        extra["baseline"] = score_corpus((u.transcript, b, u.etiology) for u, b in zip(utts, base_hyps, strict=True))
    metrics = write_results(utts, experts, hyps, out_dir, extra)
    if update_model_card:
        # Snakemake dates a directory output by its .snakemake_timestamp, so this does not make
        # asr_best look newer than its dependents.
        write_text(model_dir / "README.md", model_card(record, metrics))
    print(json.dumps({k: metrics[k] for k in ("overall", "per_etiology", "expert_usage", "baseline", "speaker_routing")
                      if k in metrics},
                     indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="asr_best folder")
    parser.add_argument("--utterances", type=Path, required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=0, help="audio decoding processes (training.num_workers)")
    parser.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    parser.add_argument("--routing", choices=ROUTINGS, help="route differently from training (default: as trained)")
    parser.add_argument("--encoder-window-s", type=float, nargs="+",
                        help="decode at these windows (e.g. 30, or 5 10 20 30) instead of the training ones")
    parser.add_argument("--update-model-card", action="store_true",
                        help="add the Dev scores to the model folder's README.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    evaluate(args.model, args.utterances, args.base_model, args.out_dir, parse_settings_arg(args.settings),
             routing=args.routing, num_workers=args.num_workers, update_model_card=args.update_model_card,
             encoder_window_s=args.encoder_window_s)


if __name__ == "__main__":
    main()
