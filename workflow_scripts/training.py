"""Pieces shared by the stages that train or run Whisper on utterances: batches, precision, resume.

How an utterance becomes a batch, how precision is set up, and how a resume checkpoint is written and
read. The training loop itself, shared by expert pretraining and joint training, is train_loop.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from workflow_scripts.atomic import atomic_dir, atomic_file, write_json
from workflow_scripts.base_model import load_whisper
from workflow_scripts.sap_data import DataError, Utterance, load_audio
from workflow_scripts.sap_text import training_text
from workflow_scripts.whisper_io import input_features, label_ids, use_encoder_windows
from workflow_scripts.windows import batch_plan, clip_samples, window_ladder

log = logging.getLogger("training")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_base(base_model: str, encoder_window_s):
    """Model + processor running the run's ladder of encoder windows (`encoder_window_s`, see windows.py)."""
    model, processor = load_whisper(base_model)
    use_encoder_windows(model, window_ladder(encoder_window_s))
    return model, processor


# What an inference loader decodes in place of a clip it could not read: a tenth of a second of silence,
# so the batch still runs; the clip's result is discarded and the failure reported (Collate's "failed").
PLACEHOLDER_SAMPLES = 1600


class AudioDataset(Dataset):
    """(audio, training text, index, error) per utterance; audio decoding runs in DataLoader workers.

    With `tolerate_unreadable` (inference only), a clip that cannot be decoded becomes a placeholder and
    its error travels with the batch; in training it raises, naming the file."""

    def __init__(self, utts: Sequence[Utterance], tolerate_unreadable: bool = False):
        self.utts = list(utts)
        self.tolerate_unreadable = tolerate_unreadable

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, i: int):
        u = self.utts[i]
        try:
            audio = load_audio(u.wav)
        except DataError as err:
            if not self.tolerate_unreadable:
                raise
            return np.zeros(PLACEHOLDER_SAMPLES, np.float32), "", i, str(err)
        return audio, training_text(u.transcript), i, None


class Collate:
    """Turns (audio, text, index) items into model inputs; a class so DataLoader workers can pickle it."""

    def __init__(self, processor, windows: Sequence[float]):
        self.processor, self.windows = processor, list(windows)

    def __call__(self, items) -> dict:
        if not items:  # a rank's empty share of a small global batch (several processes)
            return {"index": []}
        audios, texts, idx, errors = zip(*items, strict=True)
        return {
            "input_features": input_features(self.processor, audios, self.windows),
            "labels": label_ids(self.processor, texts),
            "num_samples": [len(a) for a in audios],
            "index": list(idx),
            "failed": {i: err for i, err in zip(idx, errors, strict=True) if err is not None},
        }


def utterance_plan(utts: Sequence[Utterance], windows: Sequence[float], batch_size: int, *, shuffle: bool,
                   seed: int = 0, limit: int | None = None) -> list[list[int]]:
    """Batches of `utts` indices, one encoder window per batch (windows.batch_plan), from header durations:
    no audio is decoded to plan an epoch."""
    return batch_plan([clip_samples(u.duration_s) for u in utts], windows, batch_size, shuffle=shuffle, seed=seed,
                      limit=limit)


def make_loader(utts: Sequence[Utterance], processor, plan: Sequence[Sequence[int]], *, windows: Sequence[float],
                num_workers: int, seed: int = 0, tolerate_unreadable: bool = False) -> DataLoader:
    """The batches of `plan` (utterance_plan), audio decoded in `num_workers` workers into pinned memory
    (workers kept between passes over a loader that is reused, such as validation's).

    A resumed epoch passes the plan without the batches already trained: the plan depends only on its
    seed, so the run sees exactly the batches the interrupted one had left, without decoding the
    audio of the skipped ones. `tolerate_unreadable`: see AudioDataset (inference).
    """
    # Its own generator: DataLoader otherwise draws worker seeds from the global RNG, which would
    # shift dropout after a resume.
    return DataLoader(AudioDataset(utts, tolerate_unreadable), batch_sampler=[list(b) for b in plan],
                      num_workers=num_workers, collate_fn=Collate(processor, windows),
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


# A resume checkpoint ends with the SHA-256 of everything before it and this tag. A file cut short or
# damaged on disk (a crash during a write on a filesystem without atomic rename, a bad sector) is then
# recognised before any of it is loaded, never loaded half.
CHECKPOINT_TAG = b"moe-resume-v1"
_TRAILER = 32 + len(CHECKPOINT_TAG)


def previous_checkpoint(path: Path) -> Path:
    """Where save_resume keeps the checkpoint it replaces: the fallback when the newest one is damaged."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_resume(path: Path, state: dict) -> None:
    """Resume checkpoint (weights, optimizer, scheduler, position, RNG), written atomically with a
    checksum; the one it replaces is kept as previous_checkpoint(path).

    The RNG state makes dropout after a resume draw what it would have drawn without the crash, so a
    resumed run ends with the same weights as an uninterrupted one.
    """
    state = {**state, "fingerprint": fingerprint_of(state["identity"]), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    with atomic_file(path, keep_previous=previous_checkpoint(path)) as f:
        f.write(payload)
        f.write(hashlib.sha256(payload).digest())
        f.write(CHECKPOINT_TAG)


def read_checkpoint(path: Path) -> dict | None:
    """The state saved by save_resume at `path`, or None (with a warning in the log) when the file is
    cut short or its checksum does not match.

    It is unpickled with weights_only=True: tensors and plain values only, so a planted file cannot run
    code (save_resume stores nothing else). One that holds anything else is refused with an error, not
    skipped: it was not written by save_resume, and a fresh start would hide that."""
    blob = path.read_bytes()
    if len(blob) < _TRAILER or not blob.endswith(CHECKPOINT_TAG):
        log.warning("resume checkpoint %s is damaged (cut short, or not written by this version); skipping it", path)
        return None
    payload, digest = blob[:-_TRAILER], blob[-_TRAILER:-len(CHECKPOINT_TAG)]
    if hashlib.sha256(payload).digest() != digest:
        log.warning("resume checkpoint %s is damaged (checksum mismatch); skipping it", path)
        return None
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for what it will not load
        raise ValueError(f"{path} holds more than tensors and plain values, so save_resume did not write it and it "
                         f"is not loaded (unpickling it could run code): delete it and "
                         f"{previous_checkpoint(path).name} beside it to start this stage afresh") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a resume checkpoint written by save_resume: delete it and "
                         f"{previous_checkpoint(path).name} beside it to start this stage afresh")
    return state


# Settings that do not change what training computes: where it checkpoints, how often it validates,
# when it gives up, how fast it loads data. Changing one of them after a crash resumes the run.
# Everything else (data, model, LoRA shape, learning rates, schedule, batch size, accumulation,
# precision, seed) restarts it. Early stopping and best-checkpoint choice only pick among the
# same weights, so their settings are here too.
RESUME_NEUTRAL = {
    "training": {"num_workers", "eval_every_n_epochs", "save_every_n_epochs", "checkpoint_every_steps", "patience",
                 "patience_unit", "select_best_by", "val_wer_samples", "log_every_steps", "max_nonfinite_steps",
                 "tensorboard", "keep_epoch_saves", "keep_work"},
    "embeddings": {"batch_size", "checkpoint_every"},
}


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def resume_identity(settings: dict, **data) -> dict:
    """What a resume checkpoint must share with the job that loads it: the settings that shape the training
    mathematics (RESUME_NEUTRAL left out) and the job's data (`data`, e.g. utterance ids), flattened."""
    kept = {section: ({k: v for k, v in value.items() if k not in RESUME_NEUTRAL[section]}
                      if section in RESUME_NEUTRAL else value) for section, value in settings.items()}
    return _flatten({**kept, "data": data})


def fingerprint_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _changes(old: dict, new: dict) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))

    def short(v) -> str:
        text = json.dumps(v)
        return text if len(text) <= 60 else f"<{len(v) if isinstance(v, list) else 'changed'} items>"

    return "; ".join(f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in keys)


def load_resume(path: Path, identity: dict) -> dict | None:
    """The newest undamaged checkpoint (`path`, else previous_checkpoint(path)) if it belongs to the same
    training (see resume_identity), else None, saying in the log which settings changed."""
    for candidate in (path, previous_checkpoint(path)):
        state = read_checkpoint(candidate) if candidate.exists() else None
        if state is not None:
            break
    else:
        if path.exists() or previous_checkpoint(path).exists():
            log.warning("no undamaged resume checkpoint in %s; starting fresh", path.parent)
        return None
    if state.get("fingerprint") != fingerprint_of(identity):
        changed = _changes(state.get("identity", {}), identity) if "identity" in state else "unknown (older checkpoint)"
        log.warning("resume checkpoint %s belongs to other settings or data (%s); starting fresh", candidate, changed)
        return None
    log.info("resuming from %s (epoch %d, step %d)", candidate, state["loop"]["epoch"], state["loop"]["global_step"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def publish_best(best_dir: Path, out: Path, record: dict, processor=None, extra_files: Sequence[Path] = ()) -> None:
    """Copy the best checkpoint to the declared output with its training record (and processor, and
    extra files such as metrics.jsonl), in one rename, so a crash never leaves a half-written output
    that looks complete."""
    with atomic_dir(out) as tmp:
        shutil.copytree(best_dir, tmp, dirs_exist_ok=True)
        for path in extra_files:
            if path.exists():
                shutil.copy2(path, tmp / path.name)
        if processor is not None:
            processor.save_pretrained(tmp)
        write_json(tmp / "training.json", record)
