"""Stage 1: pooled Whisper encoder embeddings of the embedding sample.

One float16 row per utterance (d_model values for mean pooling: 2.5 KiB for large-v2, instead of the
7.3 MiB per-frame float32 arrays the research code stored), taken at the encoder layer
`embeddings.layer`. Pooling covers only the encoder frames that hold real audio, not the padded
window. Partial results are saved every `checkpoint_every` utterances under --work-dir, so a crashed
job resumes where it stopped; they are removed once the embeddings are written, and the CLI locks
--work-dir while it runs (workflow_scripts/work_lock.py).

    python -m workflow_scripts.embeddings --utterances results/quick/data/embedding.json \
        --base-model results/_models/tiny.en --out-dir results/quick/embeddings \
        --work-dir results/quick/_work/embeddings --settings '{...}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from workflow_scripts.atomic import atomic_file, write_json
from workflow_scripts.device import pick_device, prepare_precision, resolve_precision
from workflow_scripts.sap_data import Utterance, read_utterances
from workflow_scripts.settings import parse_settings_arg
from workflow_scripts.training import (
    load_base,
    make_loader,
    utterance_plan,
)
from workflow_scripts.whisper_io import (
    autocast,
    encoder_layer_index,
    encoder_windows,
    pooled_embeddings,
)
from workflow_scripts.windows import window_ladder
from workflow_scripts.work_lock import remove_work_dir, work_dir_lock

log = logging.getLogger("embeddings")


def window_order(utts: list[Utterance], windows: list[float]) -> list[int]:
    """The order utterances are embedded in: grouped by encoder window, as given within a window (the
    same for every batch size, so a resumed run can change embeddings.batch_size)."""
    return [i for batch in utterance_plan(utts, windows, 1, shuffle=False) for i in batch]


@torch.no_grad()
def embed_utterances(model, processor, utts: list[Utterance], *, pooling: str, batch_size: int,
                     device: torch.device, on_batch=None, done: np.ndarray | None = None, layer: str | int = "last",
                     precision: str = "fp32", num_workers: int = 0) -> np.ndarray:
    """Pooled encoder embeddings (float32, one row per utterance, in `utts` order) taken at `layer`.

    Utterances run in window_order, each batch at one encoder window. `on_batch(rows)` is called after
    each batch with the rows so far in that order (for checkpoints); `done` holds the first rows of an
    interrupted run, which are not computed again.
    """
    windows = encoder_windows(model)
    order = window_order(utts, windows)
    rows: list[np.ndarray] = [done.astype(np.float32)] if done is not None and len(done) else []
    left = [utts[i] for i in order[len(done) if done is not None else 0:]]
    loader = make_loader(left, processor, utterance_plan(left, windows, batch_size, shuffle=False), windows=windows,
                         num_workers=num_workers)
    for batch in tqdm(loader, desc="embeddings", mininterval=10):
        feats = batch["input_features"].to(device, model.dtype)
        with autocast(precision, device):
            pooled = pooled_embeddings(model, feats, batch["num_samples"], pooling=pooling, layer=layer)
        rows.append(pooled.float().cpu().numpy())
        if on_batch is not None:
            on_batch(rows)
    if not rows:
        return np.zeros((0, 0), np.float32)
    matrix = np.concatenate(rows)
    out = np.empty_like(matrix)
    out[order] = matrix
    return out


def _fingerprint(utts: list[Utterance], base_model: str, pooling: str, layer: str | int, window: list[float]) -> str:
    """Identifies the job, so a partial result is reused only for the very same work."""
    h = hashlib.sha256(json.dumps([base_model, pooling, layer, window, [u.id for u in utts]]).encode())
    return h.hexdigest()[:16]


class PartialStore:
    """Float16 rows of the utterances done so far, saved under the work dir every few hundred."""

    def __init__(self, work_dir: Path, fingerprint: str, every: int):
        self.dir = work_dir
        self.fingerprint = fingerprint
        self.every = every
        self.last_saved = 0

    def load(self) -> np.ndarray | None:
        meta_path = self.dir / "progress.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != self.fingerprint:
            log.info("partial embeddings in %s belong to other settings; starting over", self.dir)
            return None
        try:
            rows = np.load(self.dir / "partial.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:  # cut short or damaged on disk: never use half of it
            log.warning("partial embeddings in %s are damaged (%s); starting over", self.dir, err)
            return None
        self.last_saved = len(rows)
        log.info("resuming after %d utterances from %s", len(rows), self.dir)
        return rows

    def save(self, rows: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.dir / "partial.npy") as f:
            np.save(f, rows.astype(np.float16))
        write_json(self.dir / "progress.json", {"fingerprint": self.fingerprint, "done": len(rows)})
        self.last_saved = len(rows)


def extract(utterances_path: Path, base_model: str, out_dir: Path, work_dir: Path, settings: dict,
            num_workers: int = 0) -> int:
    utts = read_utterances(utterances_path)
    cfg = settings["embeddings"]
    device = pick_device()
    model, processor = load_base(base_model, settings["encoder_window_s"])
    model.to(device).eval().requires_grad_(False)
    encoder_layer_index(cfg["layer"], len(model.get_encoder().layers))  # a bad layer fails before any work
    precision = resolve_precision(settings.get("precision", "auto"), device)
    prepare_precision(model, precision, device)

    ladder = window_ladder(settings["encoder_window_s"])
    fingerprint = _fingerprint(utts, base_model, cfg["pooling"], cfg["layer"], ladder)
    store = PartialStore(work_dir, fingerprint, cfg["checkpoint_every"])

    def checkpoint(rows: list[np.ndarray]) -> None:
        end = sum(len(r) for r in rows)
        if end - store.last_saved >= store.every and end < len(utts):
            store.save(np.concatenate(rows))

    matrix = embed_utterances(model, processor, utts, pooling=cfg["pooling"], batch_size=cfg["batch_size"],
                              device=device, on_batch=checkpoint, done=store.load(), layer=cfg["layer"],
                              precision=precision, num_workers=num_workers).astype(np.float16)
    if not np.isfinite(matrix).all():
        raise FloatingPointError("non-finite embedding values (float16 overflow?); check the base model")

    with atomic_file(out_dir / "embeddings.npy") as f:
        np.save(f, matrix)
    mapping = {
        "base_model": base_model,
        "pooling": cfg["pooling"],
        "layer": cfg["layer"],
        "encoder_window_s": ladder,
        "precision": precision,
        "dim": int(matrix.shape[1]),
        "dtype": "float16",
        "utterances": {u.id: {"row": i, "etiology": u.etiology, "speaker": u.speaker}
                       for i, u in enumerate(utts)},
    }
    write_json(out_dir / "mapping.json", mapping)
    remove_work_dir(work_dir, keep=False)  # the partial rows are of no use once embeddings.npy is written
    log.info("embedded %d utterances: %s float16 (%.1f KiB per utterance)", len(utts), matrix.shape,
             matrix.shape[1] * 2 / 1024)
    return len(utts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=Path, required=True, help="JSON list written by the data stage")
    parser.add_argument("--base-model", required=True, help="HF folder or hub id")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True, help="partial results for resume")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=0, help="audio decoding processes (training.num_workers)")
    parser.add_argument("--settings", required=True, help="JSON string or file (see config/schema.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    with work_dir_lock(args.work_dir, "embeddings"):
        extract(args.utterances, args.base_model, args.out_dir, args.work_dir, parse_settings_arg(args.settings),
                num_workers=args.num_workers)


if __name__ == "__main__":
    main()
