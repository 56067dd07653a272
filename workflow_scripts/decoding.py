"""Who goes to which expert, and routed greedy decoding: shared by validation, eval and the comparison.

A route is decided once per utterance, before decoding, by one of:
- `gate`: the gate on the utterance's pooled base-encoder embedding (dropout off, as in training);
- `gate_speaker`: the gate's probabilities averaged over all utterances of a speaker, so every
  utterance of a speaker goes to the same expert (etiology and severity belong to the speaker);
- `random_speaker`: each speaker to a fixed, seeded random expert (the control for learned routing);
- `etiology`: the true etiology label (the oracle for routing by etiology).
The same function serves training and eval, so an utterance takes the same route in both.

Clips over Whisper's 30 s (which only eval's challenge-kit selection and transcribe meet) are cut into
30 s chunks: the gate reads the length-weighted mean of the chunks' pooled embeddings (the clip's
pooled embedding, had the encoder a window that held it), every chunk goes through the clip's expert,
and the chunks' texts are joined.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from workflow_scripts.moe import MoEWhisper
from workflow_scripts.sap_data import DataError, Utterance, load_audio
from workflow_scripts.training import PLACEHOLDER_SAMPLES, make_loader, utterance_plan
from workflow_scripts.whisper_audio import NATIVE_WINDOW_S, SAMPLE_RATE
from workflow_scripts.whisper_io import (
    autocast,
    encoder_windows,
    generate,
    generate_kwargs,
    input_features,
    pooled_embeddings,
)
from workflow_scripts.windows import batch_plan, clip_samples

log = logging.getLogger("decoding")
CHUNK_SAMPLES = round(NATIVE_WINDOW_S * SAMPLE_RATE)
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
        # An etiology without an expert (eval's `other`, in the challenge kit's selection) has no oracle:
        # its speakers go where random_speaker would send them.
        fallback = fixed_experts(utts, "random_speaker", num_experts, etiologies, seed)
        return [index.get(u.etiology, k) for u, k in zip(utts, fallback, strict=True)]
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


def chunk_clips(audios: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Every clip cut into 30 s chunks (a clip of 30 s or less is one), and the clip each chunk belongs to."""
    chunks: list[np.ndarray] = []
    owner: list[int] = []
    for i, audio in enumerate(audios):
        for start in range(0, max(len(audio), 1), CHUNK_SAMPLES):
            chunks.append(audio[start:start + CHUNK_SAMPLES])
            owner.append(i)
    return chunks, owner


def clip_gate_rows(moe: MoEWhisper, processor, audios: Sequence[np.ndarray], *, pooling: str, layer: str | int,
                   batch_size: int, device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """The gate's input per in-memory clip of any length: a clip's own pooled row, or for a clip over 30 s
    the mean of its chunks' rows weighted by their length (rounded to float16 like every gate input)."""
    chunks, owner = chunk_clips(audios)
    rows = pooled_gate_rows(moe, audio_batches(processor, chunks, encoder_windows(moe.base), batch_size), len(chunks),
                            pooling=pooling, layer=layer, device=device, precision=precision)
    by_clip: list[list[int]] = [[] for _ in audios]
    for j, o in enumerate(owner):
        by_clip[o].append(j)
    out = rows.new_zeros(len(audios), rows.shape[1])
    for i, mine in enumerate(by_clip):
        if len(mine) == 1:
            out[i] = rows[mine[0]]
            continue
        weight = torch.tensor([len(chunks[j]) for j in mine], dtype=rows.dtype)
        out[i] = ((rows[mine] * weight[:, None]).sum(0) / weight.sum()).half().float()
    return out


def join_chunks(texts: Sequence[str], owner: Sequence[int], n: int) -> list[str]:
    """The texts of n clips from their chunks' texts (chunk_clips' order and owners), empty chunks left out."""
    per_clip: list[list[str]] = [[] for _ in range(n)]
    for text, o in zip(texts, owner, strict=True):
        if text:
            per_clip[o].append(text)
    return [" ".join(p) for p in per_clip]


def is_long(u: Utterance) -> bool:
    """Over Whisper's 30 s window: no loader window holds it, so it is decoded in chunks."""
    return clip_samples(u.duration_s) > CHUNK_SAMPLES


def _short_and_long(utts: Sequence[Utterance], processor, windows: Sequence[float], batch_size: int,
                    num_workers: int, failed: dict[int, str] | None) -> tuple[list[int], list[int], Iterator[dict]]:
    """Indices of the clips up to 30 s and of the longer ones, and the loader's batches of the former (their
    unreadable clips recorded in `failed` under `utts` indices, or raising when it is None)."""
    short = [i for i, u in enumerate(utts) if not is_long(u)]
    long = [i for i, u in enumerate(utts) if is_long(u)]
    subset = [utts[i] for i in short]
    loader = make_loader(subset, processor, utterance_plan(subset, windows, batch_size, shuffle=False),
                         windows=windows, num_workers=num_workers, tolerate_unreadable=failed is not None)
    return short, long, _recording_failures(loader, short, failed)


def read_clips(utts: Sequence[Utterance], failed: dict[int, str] | None, index: Sequence[int]) -> list[np.ndarray]:
    """Audio of utts[i] for i in `index`, read here (clips over 30 s, which no loader window holds); one that
    cannot be decoded is a placeholder recorded in `failed`, or raises when `failed` is None."""
    audios = []
    for i in index:
        try:
            audios.append(load_audio(utts[i].wav))
        except DataError as err:
            if failed is None:
                raise
            failed[i] = str(err)
            audios.append(np.zeros(PLACEHOLDER_SAMPLES, np.float32))
    return audios


def gate_inputs(moe: MoEWhisper, processor, utts: Sequence[Utterance], *, pooling: str, layer: str | int,
                batch_size: int, device: torch.device, precision: str = "fp32", num_workers: int = 0,
                failed: dict[int, str] | None = None) -> torch.Tensor:
    """The gate's input per utterance, each at its own encoder window (as the embeddings stage computes it);
    clips over 30 s as clip_gate_rows makes it. With `failed`, an unreadable clip is recorded there
    ({index: error}) instead of raising."""
    short, long, batches = _short_and_long(utts, processor, encoder_windows(moe.base), batch_size, num_workers,
                                           failed)
    rows = pooled_gate_rows(moe, batches, len(short), pooling=pooling, layer=layer, device=device,
                            precision=precision)
    if not long:
        return rows
    long_rows = clip_gate_rows(moe, processor, read_clips(utts, failed, long), pooling=pooling, layer=layer,
                               batch_size=batch_size, device=device, precision=precision)
    out = long_rows.new_zeros(len(utts), long_rows.shape[1])
    out[short], out[long] = rows, long_rows
    return out


def _recording_failures(batches: Iterable[dict], index: Sequence[int], failed: dict[int, str] | None) -> Iterator[dict]:
    """The loader's batches, their unreadable clips recorded in `failed` under the caller's indices."""
    for batch in batches:
        if failed is not None:
            failed.update({index[i]: err for i, err in batch.get("failed", {}).items()})
        yield batch


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
                     device: torch.device | None = None, precision: str = "fp32", num_workers: int = 0,
                     failed: dict[int, str] | None = None) -> tuple[list[int], list[float] | None]:
    """(expert, routing weight or None) per utterance; weights are None for full-strength experts. `failed`:
    see gate_inputs."""
    if routing in FIXED_ROUTINGS or moe.num_experts == 1:
        return fixed_experts(utts, routing, moe.num_experts, etiologies, seed), None
    if routing not in ("gate", "gate_speaker"):
        raise ValueError(f"unknown routing {routing!r}; use one of {ROUTINGS}")
    emb = gate_inputs(moe, processor, utts, pooling=pooling, layer=layer, batch_size=batch_size,
                      device=device or torch.device("cpu"), precision=precision, num_workers=num_workers,
                      failed=failed)
    return gate_routes(moe, emb, [u.speaker for u in utts] if routing == "gate_speaker" else None)


@torch.no_grad()
def decode_batches(moe: MoEWhisper, processor, batches: Iterable[dict], n: int, experts: Sequence[int],
                   weights: Sequence[float] | None, *, device: torch.device, baseline: bool = False,
                   precision: str = "fp32", num_beams: int = 1) -> tuple[list[str], list[str] | None]:
    """Transcripts (greedy, or beam search with `num_beams`) of the batches' n clips, each through its expert
    (and, with baseline, the base model alone), placed by their "index"; a clip the loader could not read
    (its "failed") gets an empty one."""
    hyps: list[str] = [""] * n
    base_hyps: list[str] | None = [""] * n if baseline else None
    done = 0
    for loaded in batches:
        batch = loaded["index"]
        feats = loaded["input_features"].to(device)
        kwargs = {**generate_kwargs(moe.base, loaded["num_samples"]), "num_beams": num_beams}
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
        for i in loaded.get("failed", {}):
            hyps[i] = ""
            if base_hyps is not None:
                base_hyps[i] = ""
        done += len(batch)
        log.info("decoded %d / %d", done, n)
    return hyps, base_hyps


def decode_clips(moe: MoEWhisper, processor, audios: Sequence[np.ndarray], experts: Sequence[int],
                 weights: Sequence[float] | None, *, batch_size: int, device: torch.device, baseline: bool = False,
                 precision: str = "fp32", num_beams: int = 1) -> tuple[list[str], list[str] | None]:
    """Transcripts of in-memory clips of any length: each clip's 30 s chunks through its expert, texts joined."""
    chunks, owner = chunk_clips(audios)
    batches = audio_batches(processor, chunks, encoder_windows(moe.base), batch_size)
    texts, base = decode_batches(moe, processor, batches, len(chunks), [experts[o] for o in owner],
                                 None if weights is None else [weights[o] for o in owner], device=device,
                                 baseline=baseline, precision=precision, num_beams=num_beams)
    return (join_chunks(texts, owner, len(audios)),
            None if base is None else join_chunks(base, owner, len(audios)))


def decode_routed(moe: MoEWhisper, processor, utts: Sequence[Utterance], experts: Sequence[int],
                  weights: Sequence[float] | None, *, batch_size: int, device: torch.device,
                  baseline: bool = False, precision: str = "fp32", num_workers: int = 0, num_beams: int = 1,
                  failed: dict[int, str] | None = None) -> tuple[list[str], list[str] | None]:
    """Transcripts of utterances (audio decoded by the loader), each through its expert; clips over 30 s in
    chunks (decode_clips). With `failed`, an unreadable clip gets an empty transcript and is recorded there
    ({index: error}) instead of raising."""
    short, long, batches = _short_and_long(utts, processor, encoder_windows(moe.base), batch_size, num_workers,
                                           failed)
    short_weights = None if weights is None else [weights[i] for i in short]
    hyps, base_hyps = decode_batches(moe, processor, batches, len(short),
                                     [experts[i] for i in short], short_weights, device=device, baseline=baseline,
                                     precision=precision, num_beams=num_beams)
    if not long:
        return hyps, base_hyps
    out, base_out = [""] * len(utts), [""] * len(utts) if baseline else None
    for j, i in enumerate(short):
        out[i] = hyps[j]
        if base_out is not None:
            base_out[i] = base_hyps[j]
    audios = read_clips(utts, failed, long)
    long_hyps, long_base = decode_clips(moe, processor, audios, [experts[i] for i in long],
                                        None if weights is None else [weights[i] for i in long],
                                        batch_size=batch_size, device=device, baseline=baseline,
                                        precision=precision, num_beams=num_beams)
    for j, i in enumerate(long):
        out[i] = "" if failed and i in failed else long_hyps[j]
        if base_out is not None:
            base_out[i] = "" if failed and i in failed else long_base[j]
    return out, base_out
