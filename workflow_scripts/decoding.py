"""Who goes to which expert, and routed greedy decoding: shared by validation, eval and the comparison.

A route is decided once per utterance, before decoding, by one of:
- `gate`: the gate on the utterance's pooled base-encoder embedding (dropout off, as in training);
- `gate_speaker`: the gate's probabilities averaged over all utterances of a speaker, so every
  utterance of a speaker goes to the same expert (etiology and severity belong to the speaker);
- `random_speaker`: each speaker to a fixed, seeded random expert (the control for learned routing);
- `etiology`: the true etiology label (the oracle for routing by etiology).
The same function serves training and eval, so an utterance takes the same route in both.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from workflow_scripts.moe import MoEWhisper
from workflow_scripts.sap_data import Utterance
from workflow_scripts.training import make_loader, utterance_plan
from workflow_scripts.whisper_io import (
    autocast,
    encoder_windows,
    generate,
    generate_kwargs,
    input_features,
    pooled_embeddings,
)
from workflow_scripts.windows import batch_plan

log = logging.getLogger("decoding")
FIXED_ROUTINGS = ("random_speaker", "etiology")
ROUTINGS = ("gate", "gate_speaker", *FIXED_ROUTINGS)


def fixed_experts(utts: Sequence[Utterance], routing: str, num_experts: int, etiologies: Sequence[str],
                  seed: int) -> list[int]:
    """Expert of each utterance under a routing that ignores the audio.

    random_speaker: the sorted speakers are shuffled with `seed` and dealt round-robin, so every
    expert gets speakers (a hash could leave one empty) and a speaker's utterances stay together.
    etiology: expert i serves etiologies[i].
    """
    if num_experts == 1:
        return [0] * len(utts)
    if routing == "etiology":
        if len(etiologies) != num_experts:
            raise ValueError(f"etiology routing needs one expert per etiology: {len(etiologies)} etiologies "
                             f"({list(etiologies)}) but {num_experts} experts; set num_experts to {len(etiologies)}")
        index = {e: i for i, e in enumerate(etiologies)}
        unknown = sorted({u.etiology for u in utts} - set(index))
        if unknown:
            raise ValueError(f"etiology routing: utterances of {unknown} have no expert; list them in `etiologies`")
        return [index[u.etiology] for u in utts]
    if routing == "random_speaker":
        speakers = sorted({u.speaker for u in utts})
        random.Random(seed).shuffle(speakers)
        expert_of = {s: i % num_experts for i, s in enumerate(speakers)}
        return [expert_of[u.speaker] for u in utts]
    raise ValueError(f"routing {routing!r} is not a fixed routing; use one of {FIXED_ROUTINGS}")


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """The module in eval mode inside the block, its own mode afterwards: a gate input must not depend
    on a dropout draw, or training would route an utterance differently from eval."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def audio_batches(processor, audios: Sequence[np.ndarray], windows: Sequence[float], batch_size: int) -> Iterator[dict]:
    """In-memory clips as the loader batches utterances: one encoder window per batch, "index" into `audios`."""
    for batch in batch_plan([len(a) for a in audios], windows, batch_size, shuffle=False):
        clips = [audios[i] for i in batch]
        yield {"index": batch, "input_features": input_features(processor, clips, windows),
               "num_samples": [len(a) for a in clips]}


@torch.no_grad()
def pooled_gate_rows(moe: MoEWhisper, batches: Iterable[dict], n: int, *, pooling: str, layer: str | int,
                     device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """(n, d) pooled base-encoder embeddings (routing is off outside moe.routing(), so no LoRA) of the
    batches' clips, placed by their "index"."""
    rows: list[torch.Tensor | None] = [None] * n
    for batch in batches:
        feats = batch["input_features"].to(device)
        with eval_mode(moe.base), autocast(precision, device):
            pooled = pooled_embeddings(moe.base, feats, batch["num_samples"], pooling=pooling, layer=layer)
        # Rounded to float16 as the embeddings stage and the training cache store them, so a route is
        # the same whichever of them computed the gate's input.
        for i, row in zip(batch["index"], pooled.half().float().cpu(), strict=True):
            rows[i] = row
    return torch.stack(rows) if rows else torch.zeros(0, 1)


def gate_inputs(moe: MoEWhisper, processor, utts: Sequence[Utterance], *, pooling: str, layer: str | int,
                batch_size: int, device: torch.device, precision: str = "fp32", num_workers: int = 0) -> torch.Tensor:
    """The gate's input per utterance, each at its own encoder window (as the embeddings stage computes it)."""
    windows = encoder_windows(moe.base)
    loader = make_loader(utts, processor, utterance_plan(utts, windows, batch_size, shuffle=False), windows=windows,
                         num_workers=num_workers)
    return pooled_gate_rows(moe, loader, len(utts), pooling=pooling, layer=layer, device=device, precision=precision)


@torch.no_grad()
def gate_routes(moe: MoEWhisper, embeddings: torch.Tensor,
                speakers: Sequence[str] | None = None) -> tuple[list[int], list[float]]:
    """(expert, weight) per utterance from the gate; with `speakers`, each speaker's utterances all go to
    the expert of the gate's mean probabilities over them (weight: the utterance's own probability)."""
    routed = moe.route(embeddings.to(next(moe.gate.parameters()).device))
    idx, weights = routed.expert_idx.cpu(), routed.weights.cpu()
    if speakers is not None:
        probs = routed.probs.cpu().numpy()
        names = np.array(speakers)
        idx = idx.clone()
        for s in np.unique(names):
            rows = names == s
            idx[torch.from_numpy(rows)] = int(probs[rows].mean(0).argmax())
        weights = routed.probs.cpu().gather(1, idx[:, None]).squeeze(1)
        if moe.config["weighting"] == "straight_through":
            weights = torch.ones_like(weights)
    return idx.tolist(), weights.tolist()


@torch.no_grad()
def route_utterances(moe: MoEWhisper, processor, utts: Sequence[Utterance], routing: str, *, pooling: str = "mean",
                     layer: str | int = "last", etiologies: Sequence[str] = (), seed: int = 0, batch_size: int = 8,
                     device: torch.device | None = None, precision: str = "fp32",
                     num_workers: int = 0) -> tuple[list[int], list[float] | None]:
    """(expert, routing weight or None) per utterance; weights are None for full-strength experts."""
    if routing in FIXED_ROUTINGS or moe.num_experts == 1:
        return fixed_experts(utts, routing, moe.num_experts, etiologies, seed), None
    if routing not in ("gate", "gate_speaker"):
        raise ValueError(f"unknown routing {routing!r}; use one of {ROUTINGS}")
    emb = gate_inputs(moe, processor, utts, pooling=pooling, layer=layer, batch_size=batch_size,
                      device=device or torch.device("cpu"), precision=precision, num_workers=num_workers)
    return gate_routes(moe, emb, [u.speaker for u in utts] if routing == "gate_speaker" else None)


@torch.no_grad()
def decode_batches(moe: MoEWhisper, processor, batches: Iterable[dict], n: int, experts: Sequence[int],
                   weights: Sequence[float] | None, *, device: torch.device, baseline: bool = False,
                   precision: str = "fp32") -> tuple[list[str], list[str] | None]:
    """Greedy transcripts of the batches' n clips, each through its expert (and, with baseline, the base
    model alone), placed by their "index"."""
    hyps: list[str] = [""] * n
    base_hyps: list[str] | None = [""] * n if baseline else None
    done = 0
    for loaded in batches:
        batch = loaded["index"]
        feats = loaded["input_features"].to(device)
        kwargs = generate_kwargs(moe.base, loaded["num_samples"])
        w = None if weights is None else torch.tensor([weights[i] for i in batch])
        with moe.routing([experts[i] for i in batch], w), autocast(precision, device):
            ids = generate(moe.base, feats, **kwargs)
        for i, text in zip(batch, processor.batch_decode(ids, skip_special_tokens=True), strict=True):
            hyps[i] = text.strip()
        if base_hyps is not None:
            with autocast(precision, device):
                ids = generate(moe.base, feats, **kwargs)  # routing is off again: the frozen base model
            for i, text in zip(batch, processor.batch_decode(ids, skip_special_tokens=True), strict=True):
                base_hyps[i] = text.strip()
        done += len(batch)
        log.info("decoded %d / %d", done, n)
    return hyps, base_hyps


def decode_routed(moe: MoEWhisper, processor, utts: Sequence[Utterance], experts: Sequence[int],
                  weights: Sequence[float] | None, *, batch_size: int, device: torch.device,
                  baseline: bool = False, precision: str = "fp32",
                  num_workers: int = 0) -> tuple[list[str], list[str] | None]:
    """Greedy transcripts of utterances (audio decoded by the loader), each through its expert."""
    windows = encoder_windows(moe.base)
    loader = make_loader(utts, processor, utterance_plan(utts, windows, batch_size, shuffle=False), windows=windows,
                         num_workers=num_workers)
    return decode_batches(moe, processor, loader, len(utts), experts, weights, device=device, baseline=baseline,
                          precision=precision)
