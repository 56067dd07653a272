"""Transcribe audio with a trained mixture (a run's asr_best/): one JSON line, or TSV row, per file.

    python -m workflow_scripts.transcribe results/quick/asr_best recording.wav more/ [--tsv]

Each result holds the text, the expert the gate chose and its probability. Files are read as eval
reads them (any rate or channel count, converted to 16 kHz mono, and said so) and decoded with the
model's encoder windows and the same precision rule as eval. Audio over 30 s is cut into 30 s chunks
that go to one expert, routed as eval routes such a clip (workflow_scripts/decoding.py), and the result
says so.

Files are decoded one at a time and each result is printed (and flushed) as soon as it is ready, so a
long list shows progress and holds one file's audio in memory at a time. A file gets an error line of
its own, and the others are still transcribed (exit status 1), when it cannot be read, is not a regular
file (a folder or a named pipe called x.wav is never opened: reading a pipe would wait forever), lasts
longer than --max-duration-s by its header (checked before any audio is decoded), or its result cannot
be written as strict JSON (a non-finite gate probability, say). Every output line parses as JSON; NaN
and Infinity, which JSON does not have, never appear. In Python:

    from workflow_scripts.transcribe import load_model, transcribe, transcribe_iter
    model = load_model("results/quick/asr_best")
    for result in transcribe_iter(model, ["recording.wav"]):  # or transcribe(...): the same, as a list
        print(result["text"])
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workflow_scripts.decoding import chunk_clips, clip_gate_rows, decode_clips
from workflow_scripts.device import pick_device, prepare_precision, resolve_precision
from workflow_scripts.model_files import ModelFolderError, read_training_record
from workflow_scripts.moe import MoEWhisper
from workflow_scripts.safe_files import open_regular
from workflow_scripts.sap_data import load_audio
from workflow_scripts.training import load_base
from workflow_scripts.wav_header import read_header
from workflow_scripts.whisper_audio import NATIVE_WINDOW_S, SAMPLE_RATE

AUDIO_SUFFIXES = (".wav", ".flac")
FIELDS = ("file", "text", "expert", "gate_probability", "duration_s", "notes", "error")
# Ten minutes: far above any SAP recording (most last 2-5 s), while a file's decoded audio (float32, plus
# its resampling) stays a few hundred MB however it was recorded.
DEFAULT_MAX_DURATION_S = 600.0


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
    """Paths as given, folders expanded to the entries under them named .wav/.flac (sorted). An entry is not
    checked here: one that is not a regular file becomes that file's error (read_audio)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES) if p.is_dir() else [p]
    return out


def _check_regular_file(path: Path) -> None:
    """Only a regular file is opened: a named pipe would block the reader until something writes to it."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from err
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path} is a folder, not an audio file; give audio files, or the folder that holds them")
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{path} is {kind}, not an audio file; it was not opened. Save the audio to a file first")


def read_audio(path: Path, max_duration_s: float = DEFAULT_MAX_DURATION_S) -> tuple[np.ndarray, list[str]]:
    """16 kHz mono float32 and what was converted; a clear error for a file that is not a regular file, lasts
    over `max_duration_s` (by its header, before anything is decoded) or cannot be decoded."""
    _check_regular_file(path)
    try:
        with open_regular(path) as f:
            header = read_header(f)
    except (RuntimeError, OSError) as err:  # libsndfile's errors are RuntimeErrors
        raise ValueError(f"cannot read {path}: {err}") from err
    frames, rate, channels = header.frames, header.rate, header.channels
    if frames <= 0 or rate <= 0:
        raise ValueError(f"{path} holds no audio")
    duration = frames / rate
    if duration > max_duration_s:
        raise ValueError(f"{path} lasts {duration:.1f} s, over the limit of {max_duration_s:g} s: cut it into "
                         "shorter files, or raise --max-duration-s")
    notes = []
    if rate != SAMPLE_RATE:
        notes.append(f"resampled from {rate} Hz")
    if channels > 1:
        notes.append(f"downmixed from {channels} channels")
    audio = load_audio(path)
    if len(audio) == 0:
        raise ValueError(f"{path} holds no audio")
    return audio, notes


def _route(model: Model, audio: np.ndarray, batch_size: int) -> tuple[int, float | None]:
    """The clip's expert and the gate's probability for it (None without a gate)."""
    moe = model.moe
    if moe.gate is None or moe.num_experts == 1:
        return 0, None
    rows = clip_gate_rows(moe, model.processor, [audio], pooling=model.record["pooling"],
                          layer=model.record.get("layer", "last"), batch_size=batch_size, device=model.device,
                          precision=model.precision)
    probs = moe.route(rows.to(model.device)).probs[0].cpu()
    expert = int(probs.argmax())
    probability = float(probs[expert])
    if not math.isfinite(probability):
        raise ValueError(f"the gate gave a non-finite probability ({probability}) for this audio, so it has no "
                         "route; check the file's samples, or the model's gate.safetensors")
    return expert, probability


def transcribe_one(model: Model, path: Path, batch_size: int = 8,
                   max_duration_s: float = DEFAULT_MAX_DURATION_S) -> dict:
    """file, duration_s, notes, expert, gate_probability and text of one audio file; a failure of the file's
    own (unreadable, not a regular file, too long, no route) raises ValueError or sap_data.DataError."""
    audio, notes = read_audio(path, max_duration_s)
    pieces = len(chunk_clips([audio])[0])
    if pieces > 1:
        notes.append(f"longer than {NATIVE_WINDOW_S:g} s: decoded in {pieces} chunks of up to "
                     f"{NATIVE_WINDOW_S:g} s, joined")
    expert, probability = _route(model, audio, batch_size)
    # Straight-through weighting runs the routed expert at full strength, as training did.
    weights = None if probability is None or model.moe.config["weighting"] == "straight_through" else [probability]
    texts, _ = decode_clips(model.moe, model.processor, [audio], [expert], weights, batch_size=batch_size,
                            device=model.device, precision=model.precision)
    return {"file": str(path), "duration_s": round(len(audio) / SAMPLE_RATE, 2), "notes": notes, "expert": expert,
            "gate_probability": None if probability is None else round(probability, 4), "text": texts[0]}


def _strict_json(result: dict) -> dict:
    """The result if it can be written as strict JSON in UTF-8, else an error result for its file: JSON has no
    NaN or Infinity, and a lone surrogate (a file name that is not UTF-8, say) passes json.dumps but breaks
    the output stream."""
    try:
        json.dumps(result, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError) as err:  # UnicodeEncodeError is a ValueError
        file = result["file"].encode("utf-8", "backslashreplace").decode("utf-8")
        return {"file": file, "error": f"the result for {file} could not be written as JSON: {err}"}
    return result


def transcribe_iter(model: Model, paths: Sequence[str | Path], batch_size: int = 8,
                    max_duration_s: float = DEFAULT_MAX_DURATION_S) -> Iterator[dict]:
    """One result per audio file (folders expanded), each yielded as soon as it is decoded: file, text, expert,
    gate_probability, duration_s, notes; or file and error for a file that could not be transcribed. A file is
    read only when its turn comes; every result can be written as strict JSON."""
    for path in audio_files(paths):
        try:
            result = transcribe_one(model, path, batch_size, max_duration_s)
        except Exception as err:  # noqa: BLE001 - any failure is this file's alone; it is reported, not raised
            result = {"file": str(path), "error": str(err)}
        yield _strict_json(result)


def transcribe(model: Model, paths: Sequence[str | Path], batch_size: int = 8,
               max_duration_s: float = DEFAULT_MAX_DURATION_S) -> list[dict]:
    """transcribe_iter's results as a list."""
    return list(transcribe_iter(model, paths, batch_size, max_duration_s))


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
    parser.add_argument("--batch-size", type=int, default=8, help="30 s chunks of one file decoded together")
    parser.add_argument("--max-duration-s", type=float, default=DEFAULT_MAX_DURATION_S,
                        help="longer files (by their header) are refused with an error line (default: %(default)g)")
    parser.add_argument("--precision", default="auto", help="auto, fp32, fp16 or bf16 (as training.precision)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")  # JSON text is UTF-8 (RFC 8259), whatever the locale says
    try:
        model = load_model(args.model, args.base_model, args.precision)
    except (FileNotFoundError, ModelFolderError) as err:
        sys.exit(f"transcribe: {err}")  # a folder it will not load, not a bug: one line, no traceback
    writer = None
    if args.tsv:
        writer = csv.DictWriter(sys.stdout, fieldnames=FIELDS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
    failed = False
    for r in transcribe_iter(model, args.audio, args.batch_size, args.max_duration_s):
        failed |= "error" in r
        if writer is not None:
            writer.writerow({**r, "notes": "; ".join(r.get("notes", []))})
        else:
            print(json.dumps(r, ensure_ascii=False, allow_nan=False))
        sys.stdout.flush()  # a reader of the pipe gets each result now, not when the buffer fills
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
