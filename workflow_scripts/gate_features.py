"""The gate's input of every training and validation utterance, computed once per job, not once per step.

The gate routes on the pooled base-encoder embedding (no LoRA), which depends only on the audio. Joint
training used to run the encoder a second time in every step, epoch after epoch, to get it. Here the
rows come from the embeddings stage where it already embedded the utterance the same way (same base
model, window, pooling, layer, precision), and from one extra encoder pass for the rest; they are kept
under the job's work folder as float16 with a fingerprint, so a resumed job reads them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from workflow_scripts.atomic import atomic_file
from workflow_scripts.decoding import gate_inputs
from workflow_scripts.moe import MoEWhisper
from workflow_scripts.sap_data import Utterance

log = logging.getLogger("gate_features")


def _reusable_rows(embeddings_dir: Path | None, spec: dict) -> tuple[dict, np.ndarray | None]:
    """mapping utterances and the embeddings stage's rows, if they were embedded as `spec` says."""
    if embeddings_dir is None or not (embeddings_dir / "mapping.json").is_file():
        return {}, None
    mapping = json.loads((embeddings_dir / "mapping.json").read_text())
    made = {"base_model": mapping.get("base_model"), "encoder_window_s": mapping.get("encoder_window_s"),
            "pooling": mapping.get("pooling"), "layer": mapping.get("layer", "last"),
            "precision": mapping.get("precision")}
    if made != spec:
        log.info("embeddings in %s were made with %s, the gate needs %s: computing every row", embeddings_dir,
                 made, spec)
        return {}, None
    return mapping["utterances"], np.load(embeddings_dir / "embeddings.npy", allow_pickle=False)


def gate_features(moe: MoEWhisper, processor, utts: Sequence[Utterance], *, spec: dict, batch_size: int,
                  device: torch.device, cache_dir: Path, embeddings_dir: Path | None = None,
                  num_workers: int = 0) -> torch.Tensor:
    """(N, d) float32 gate inputs in `utts` order (float16 values, as every other route source has).

    spec: base_model, encoder_window_s, pooling, layer, precision (resolved), which fix the rows.
    """
    key = hashlib.sha256(json.dumps([spec, [u.id for u in utts]], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"gate_inputs_{key}.npy"
    if path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:  # damaged on disk: compute the rows again
            log.warning("gate input cache %s is damaged (%s); computing it again", path, err)
        else:
            log.info("gate inputs of %d utterances read from %s", len(utts), path)
            return torch.from_numpy(cached.astype(np.float32))
    known, rows = _reusable_rows(embeddings_dir, spec)
    reused = {i: rows[known[u.id]["row"]] for i, u in enumerate(utts) if rows is not None and u.id in known}
    missing = [i for i in range(len(utts)) if i not in reused]
    fresh = gate_inputs(moe, processor, [utts[i] for i in missing], pooling=spec["pooling"], layer=spec["layer"],
                        batch_size=batch_size, device=device, precision=spec["precision"],
                        num_workers=num_workers).numpy()
    width = fresh.shape[1] if missing else len(next(iter(reused.values())))
    matrix = np.zeros((len(utts), width), np.float16)
    for i, row in reused.items():
        matrix[i] = row
    for i, row in zip(missing, fresh, strict=True):
        matrix[i] = row
    with atomic_file(path) as f:
        np.save(f, matrix)
    log.info("gate inputs of %d utterances: %d from the embeddings stage, %d computed; cached in %s", len(utts),
             len(reused), len(missing), path)
    return torch.from_numpy(matrix.astype(np.float32))
