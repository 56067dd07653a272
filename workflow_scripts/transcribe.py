"""Transcribe audio with a trained mixture (a run's asr_best/): one JSON line, or TSV row, per file.

    python -m workflow_scripts.transcribe results/quick/asr_best recording.wav more/ [--tsv]

Each result holds the text, the expert the gate chose and its probability. Files are read as eval
reads them (any rate or channel count, converted to 16 kHz mono, and said so) and decoded with the
model's encoder windows and the same precision rule as eval. Audio over 30 s is cut into 30 s chunks
that go to one expert, routed as eval routes such a clip (workflow_scripts/decoding.py), and the result
says so. A file
that cannot be read gets an error line of its own; the others are still transcribed, and the exit
status is 1. In Python:

    from workflow_scripts.transcribe import load_model, transcribe
    model = load_model("results/quick/asr_best")
    for result in transcribe(model, ["recording.wav"]):
        print(result["text"])
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from workflow_scripts.decoding import chunk_clips, clip_gate_rows, decode_clips
from workflow_scripts.device import pick_device, prepare_precision, resolve_precision
from workflow_scripts.model_files import ModelFolderError, read_training_record
from workflow_scripts.moe import MoEWhisper
from workflow_scripts.sap_data import load_audio
from workflow_scripts.training import load_base
from workflow_scripts.whisper_audio import NATIVE_WINDOW_S, SAMPLE_RATE

AUDIO_SUFFIXES = (".wav", ".flac")
FIELDS = ("file", "text", "expert", "gate_probability", "duration_s", "notes", "error")


@dataclass
class Model:
    moe: MoEWhisper
    processor: object
    record: dict  # asr_best/training.json
    device: torch.device
    precision: str


def load_model(model_dir: str | Path, base_model: str | None = None, precision: str = "auto") -> Model:
    """A run's asr_best/ on its base model (recorded in training.json unless given), ready to decode."""
    model_dir = Path(model_dir)
    record = read_training_record(model_dir)
    if record.get("routing", "gate") not in ("gate", "gate_speaker") and record["num_experts"] > 1:
        raise ValueError(f"{model_dir} routes by {record['routing']!r} (a comparison control), which needs "
                         "speaker or etiology labels; transcribe needs a model routed by its gate")
    device = pick_device()
    base, processor = load_base(base_model or record["base_model"], record["encoder_window_s"])
    moe = MoEWhisper.from_pretrained(model_dir, base).to(device).eval().requires_grad_(False)
    precision = resolve_precision(precision, device)
    prepare_precision(moe, precision, device)
    return Model(moe, processor, record, device, precision)


def audio_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the .wav/.flac files under them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES) if p.is_dir() else [p]
    return out


def read_audio(path: Path) -> tuple[np.ndarray, list[str]]:
    """16 kHz mono float32 and what was converted; a clear error for a file that cannot be decoded."""
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    notes = []
    if info.samplerate != SAMPLE_RATE:
        notes.append(f"resampled from {info.samplerate} Hz")
    if info.channels > 1:
        notes.append(f"downmixed from {info.channels} channels")
    audio = load_audio(path)
    if len(audio) == 0:
        raise ValueError(f"{path} holds no audio")
    return audio, notes


def transcribe(model: Model, paths: Sequence[str | Path], batch_size: int = 8) -> list[dict]:
    """One result per audio file (folders expanded): file, text, expert, gate_probability, duration_s, notes;
    or file and error for a file that could not be read."""
    results: list[dict] = []
    audios: list[np.ndarray] = []
    owner: list[int] = []  # result index of each readable file
    for path in audio_files(paths):
        try:
            audio, notes = read_audio(path)
        except Exception as err:  # noqa: BLE001 - any failure is this file's alone; it is reported, not raised
            results.append({"file": str(path), "error": str(err)})
            continue
        pieces = len(chunk_clips([audio])[0])
        if pieces > 1:
            notes.append(f"longer than {NATIVE_WINDOW_S:g} s: decoded in {pieces} chunks of up to "
                         f"{NATIVE_WINDOW_S:g} s, joined")
        results.append({"file": str(path), "duration_s": round(len(audio) / SAMPLE_RATE, 2), "notes": notes})
        audios.append(audio)
        owner.append(len(results) - 1)
    if not audios:
        return results
    moe = model.moe
    experts, weights = [0] * len(audios), None
    if moe.gate is not None and moe.num_experts > 1:
        rows = clip_gate_rows(moe, model.processor, audios, pooling=model.record["pooling"],
                              layer=model.record.get("layer", "last"), batch_size=batch_size, device=model.device,
                              precision=model.precision)
        probs = moe.route(rows.to(model.device)).probs.cpu()
        experts = probs.argmax(1).tolist()
        chosen = [float(probs[i, k]) for i, k in enumerate(experts)]
        if moe.config["weighting"] != "straight_through":
            weights = chosen
        for r, k, p in zip(owner, experts, chosen, strict=True):
            results[r].update(expert=k, gate_probability=round(p, 4))
    else:
        for r in owner:
            results[r].update(expert=0, gate_probability=None)
    texts, _ = decode_clips(moe, model.processor, audios, experts, weights, batch_size=batch_size,
                            device=model.device, precision=model.precision)
    for r, text in zip(owner, texts, strict=True):
        results[r]["text"] = text
    return results


def model_card(record: dict, metrics: dict | None = None) -> str:
    """asr_best/README.md: what the model is, what it was trained on, how well it does on Dev (eval's
    `metrics`, once the eval stage has run) and how to use it."""
    lora = record["settings"]["lora"]
    best = record.get("best_val_wer")
    shared = " plus one shared adapter that every utterance passes through" if lora.get("shared") else ""
    return "\n".join([
        "# Whisper with a mixture of LoRA experts",
        "",
        f"- Base model: `{record['base_model']}`",
        f"- Experts: {record['num_experts']} LoRA adapters (rank {lora['r']}, alpha {lora['alpha']}, on "
        f"{', '.join(lora['target_modules'])}){shared}; routing: `{record['routing']}` (the gate reads encoder "
        f"layer {record['layer']}, {record['pooling']} pooling)",
        f"- Encoder windows (s): {record['encoder_window_s']}; precision in training: {record['precision']}",
        f"- Trainable parameters: {record['trainable_params']['total']:,}",
        f"- Data: {record['n_train']} training utterances, {record['n_val']} validation utterances from held-out "
        f"speakers; {record['utterance_passes']} utterance passes of joint training",
        f"- Kept: epoch {record['best_epoch']}, chosen by validation {record['selected_by']}"
        + (f" (validation WER {100 * best:.2f} %)" if best is not None else ""),
        *_dev_scores(metrics),
        "",
        "## Use",
        "",
        "```bash",
        "python -m workflow_scripts.transcribe results/<run>/asr_best recording.wav folder/ [--tsv]",
        "```",
        "",
        "```python",
        "from workflow_scripts.transcribe import load_model, transcribe",
        'model = load_model("results/<run>/asr_best")',
        'print(transcribe(model, ["recording.wav"])[0]["text"])',
        "```",
        "",
        "Lower level: `MoEWhisper.from_pretrained(folder, base_model)` (workflow_scripts/moe.py) restores the",
        "experts and the gate on a loaded Whisper; `training.json` holds every setting and the training curves.",
        "",
    ])


def _dev_scores(metrics: dict | None) -> list[str]:
    if metrics is None:
        return ["- Dev WER and CER per etiology: not yet measured; the eval stage "
                "(`snakemake results/<run>/eval/metrics.json`) writes them here and in `../eval/metrics.json`"]
    rows = [("all", metrics["overall"]), *metrics["per_etiology"].items()]
    return ["", "## Dev results (eval stage, SAP scoring rule)", "", "| etiology | WER % | CER % | utterances |",
            "|---|---|---|---|",
            *(f"| {name} | {100 * s['wer']:.2f} | {100 * s['cer']:.2f} | {s['n']} |" for name, s in rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a run's asr_best folder")
    parser.add_argument("audio", nargs="+", help="audio files or folders (.wav, .flac)")
    parser.add_argument("--base-model", help="base Whisper folder or hub id (default: the one in training.json)")
    parser.add_argument("--tsv", action="store_true", help="a table instead of JSON lines")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto", help="auto, fp32, fp16 or bf16 (as training.precision)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model, args.base_model, args.precision)
    except (FileNotFoundError, ModelFolderError) as err:
        sys.exit(f"transcribe: {err}")  # a folder it will not load, not a bug: one line, no traceback
    results = transcribe(model, args.audio, args.batch_size)
    if args.tsv:
        writer = csv.DictWriter(sys.stdout, fieldnames=FIELDS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for r in results:
            writer.writerow({**r, "notes": "; ".join(r.get("notes", []))})
    else:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
