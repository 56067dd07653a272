"""Stage 0: read the SAP tree once and write the utterance lists every later stage uses.

Train is split by speaker into a training pool and a validation set (speaker-disjoint, stratified by
etiology). From the pool, the embedding, expert and ASR samples are drawn nested: the smaller
sample is a subset of the larger, so expert assignment reuses the cached embeddings.
Outputs (in --out-dir): embedding.json, expert.json, asr_train.json, asr_val.json, eval.json, and
the data report (kept per etiology, skipped per reason with example paths). eval.json is the whole
eval split as the challenge kit selects it when the run's `split_as_kit` holds (eval.split_as_kit).

    python -m workflow_scripts.data --dataset-root DIR --out-dir results/quick/data \
        --report results/quick/data_report.json --settings '{"data": {...}, ...}'
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from workflow_scripts.atomic import write_text
from workflow_scripts.sampling import (
    nested_samples,
    resolve_size,
    sample_utterances,
    speaker_disjoint_split,
)
from workflow_scripts.sap_data import DataReport, read_split, write_utterances
from workflow_scripts.sap_download import read_unpack_report
from workflow_scripts.settings import parse_settings_arg

log = logging.getLogger("data")


def stage_sizes(pool_size: int, data: dict) -> dict[str, int]:
    """Utterances per stage: the percentage of the pool, capped by the exact count when one is set."""
    return {
        stage: resolve_size(pool_size, n=data[f"{stage}_samples"], percent=data[f"{stage}_percent"])
        for stage in ("embedding", "expert", "asr")
    }


def write_data_report(path: Path, report: DataReport, download: dict | None) -> None:
    """data_report.json: per split, plus the unpack counts under "download" when the run read a download."""
    if download is None:
        report.write(path)
    else:
        write_text(path, json.dumps({**report.to_dict(), "download": download}, indent=2, ensure_ascii=False) + "\n")


def prepare(dataset_root: Path, out_dir: Path, report_path: Path, settings: dict,
            download: dict | None = None) -> dict[str, int]:
    data = settings["data"]
    seed = settings["seed"]
    etiologies = tuple(settings["etiologies"])
    report = DataReport()
    try:
        # Every clip up to Whisper's 30 s goes into an encoder window that holds it (windows.py);
        # only longer ones are skipped, and counted as too_long.
        train = read_split(dataset_root, settings["train_split"], report, etiologies=etiologies)
        # As the challenge kit scores it (every readable wav, any length or etiology), or as the other stages read.
        dev = read_split(dataset_root, settings["eval_split"], report, etiologies=etiologies,
                         as_kit=settings["split_as_kit"])
    finally:
        # Written even when reading fails, so the user can see what was skipped and why.
        write_data_report(report_path, report, download)

    pool, val = speaker_disjoint_split(train, val_fraction=data["val_fraction"], seed=seed,
                                       max_val=data["max_val_samples"])
    samples = nested_samples(pool, stage_sizes(len(pool), data), method=data["sampling"], seed=seed)
    evaluated = dev
    if not settings["split_as_kit"] and data["eval_samples"] is not None and data["eval_samples"] < len(dev):
        evaluated = sample_utterances(dev, n=data["eval_samples"], method=data["sampling"], seed=seed)

    lists = {
        "embedding": samples["embedding"],
        "expert": samples["expert"],
        "asr_train": samples["asr"],
        "asr_val": val,
        "eval": evaluated,
    }
    for name, utts in lists.items():
        write_utterances(out_dir / f"{name}.json", utts)
    counts = {name: len(utts) for name, utts in lists.items()}
    log.info("train pool %d utterances, sample sizes %s", len(pool), counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-root", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    parser.add_argument("--unpack-report", type=Path, help="sap_download's report, kept under \"download\"")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    download = read_unpack_report(args.unpack_report) if args.unpack_report else None
    prepare(args.dataset_root, args.out_dir, args.report, parse_settings_arg(args.settings), download)


if __name__ == "__main__":
    main()
