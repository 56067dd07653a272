"""Whisper input/output helpers shared by every stage: features, pooled embeddings, labels, decoding.

Encoder windows (workflow_scripts/windows.py): `use_encoder_windows` lets the encoder take any window
of its ladder, its positional embeddings sliced to the input's length; `input_features` pads a batch
to the smallest window that holds its longest clip. Nothing here assumes 30 s / 3000 frames.
`base_model.load_whisper` loads a model at its own window; the stages load theirs through
`training.load_base`, which sets the run's ladder with `use_encoder_windows`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from workflow_scripts.whisper_audio import SAMPLE_RATE
from workflow_scripts.windows import (
    MEL_FRAMES_PER_POSITION,
    POSITIONS_PER_SECOND,
    batch_plan,
    fit_ladder,
    window_index,
)

SAMPLES_PER_ENCODER_FRAME = SAMPLE_RATE // POSITIONS_PER_SECOND  # 320
# Greedy decoding can loop ("blah blah ..."); bound new tokens by duration. English speech is
# ~3-4 BPE tokens/s even when fast; 6/s plus a margin never cuts a real transcript short.
TOKENS_PER_SECOND = 6
TOKEN_MARGIN = 10
# Multilingual vocabularies have 51865+ ids (language and task tokens); English-only (*.en) ones 51864.
MULTILINGUAL_MIN_VOCAB = 51865


class _DropMaxLengthNotice(logging.Filter):
    """Drops transformers' per-batch notice that `max_new_tokens` overrides the generation config's
    `max_length` (448 in every Whisper config): generate_kwargs always sets it on purpose, and the notice
    otherwise fills a Dev eval's log with one line per batch, burying the progress lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`max_new_tokens` will take precedence" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_DropMaxLengthNotice())


PRECISIONS = ("fp32", "fp16", "bf16")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device):
    """Mixed precision for a forward pass (no-op for fp32). fp16 training also needs a GradScaler; bf16 does not."""
    if precision not in HALF_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=HALF_DTYPES[precision])


def window_seconds(model: WhisperForConditionalGeneration) -> float:
    """The model's own (largest) window in seconds: 30 for stock Whisper."""
    return model.config.max_source_positions / POSITIONS_PER_SECOND


def use_encoder_windows(model: WhisperForConditionalGeneration, ladder: Sequence[float]) -> list[float]:
    """Let the encoder run on any window of `ladder` (seconds, capped at the model's own window).

    `transformers` insists on exactly the mel frames of max_source_positions positions and adds every row
    of the positional embedding. For the length of one forward pass, both are set to the input's window, so
    the encoder uses the first rows of its positions (as icefall and wenet do); afterwards the config
    is the model's own again. Decode with `generate` below, not `model.generate`, or the encoder runs at
    the model's own window. Returns the ladder in use, also kept as `model.config.encoder_windows_s`.
    """
    encoder = model.get_encoder()
    native = encoder.embed_positions.num_embeddings
    ladder = fit_ladder(ladder, native / POSITIONS_PER_SECOND)
    config = model.config
    config.encoder_windows_s = ladder
    if getattr(encoder, "_window_hooks", None) is None:
        def enter(module, args, kwargs):
            features = args[0] if args else kwargs["input_features"]
            positions = features.shape[-1] // MEL_FRAMES_PER_POSITION
            if positions > native:
                raise ValueError(f"encoder input of {positions / POSITIONS_PER_SECOND:g} s exceeds the model's "
                                 f"{native / POSITIONS_PER_SECOND:g} s window")
            module.config.max_source_positions = module.embed_positions.num_embeddings = positions

        def leave(module, args, kwargs, output):
            module.config.max_source_positions = module.embed_positions.num_embeddings = native

        encoder._window_hooks = (encoder.register_forward_pre_hook(enter, with_kwargs=True),
                                 encoder.register_forward_hook(leave, with_kwargs=True, always_call=True))
    return ladder


def encoder_windows(model: WhisperForConditionalGeneration) -> list[float]:
    """The windows this model runs (use_encoder_windows), or only its own window."""
    return list(getattr(model.config, "encoder_windows_s", None) or [window_seconds(model)])


def generate(model: WhisperForConditionalGeneration, features: torch.Tensor, **kwargs) -> torch.Tensor:
    """`model.generate(features, **kwargs)` with the encoder at the features' own window.

    transformers' Whisper generate() zero-pads every input to the model's own window (max_source_positions)
    before the encoder, and ignores its own num_segment_frames argument. A model with one fixed window is
    not affected, but on a ladder (own window 30 s) a batch at a 5 s window would be decoded at 30 s, with
    padding the feature extractor never makes: windows the model never saw in training. For the length of
    the call, max_source_positions is the input's window.
    """
    config = model.config
    native = config.max_source_positions
    config.max_source_positions = features.shape[-1] // MEL_FRAMES_PER_POSITION
    try:
        return model.generate(features, **kwargs)
    finally:
        config.max_source_positions = native


def input_features(processor: WhisperProcessor, audios: Sequence[np.ndarray],
                   windows: Sequence[float] | None = None) -> torch.Tensor:
    """Log-mel features (B, n_mels, frames), zero-padded to the smallest of `windows` (seconds) that
    holds the longest clip; without `windows`, to the processor's own window.

    Clips longer than every window raise: callers skip and count them, never silently truncate.
    """
    extractor = processor.feature_extractor
    ladder = list(windows) if windows else [extractor.n_samples / SAMPLE_RATE]
    window = ladder[window_index(max(len(a) for a in audios), ladder)]
    feats = extractor([np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=SAMPLE_RATE,
                      padding="max_length", max_length=round(window * SAMPLE_RATE), return_tensors="pt").input_features
    return feats


def encoder_frames(num_samples: int) -> int:
    """Number of encoder output frames that cover `num_samples` of real audio (at least 1)."""
    return max(1, math.ceil(num_samples / SAMPLES_PER_ENCODER_FRAME))


def encoder_layer_index(layer: str | int, num_layers: int) -> int:
    """Index into the encoder's hidden states for the `embeddings.layer` setting.

    0 is the input to the first encoder layer (convs + positional embedding), i the output of layer i.
    `transformers` replaces the last entry of `hidden_states` by `last_hidden_state`, the output of
    the final layer norm, so `num_layers` and "last" are the same features: the model's final output.
    """
    if layer == "last":
        return num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers:
        raise ValueError(f"embeddings.layer={layer!r} is out of range: this encoder has {num_layers} layers; "
                         f"use 'last' or an integer from 0 (input to the first layer) to {num_layers} "
                         "(output of the last layer, after the final layer norm)")
    return layer


def pooled_layers(model: WhisperForConditionalGeneration, features: torch.Tensor, num_samples: Sequence[int],
                  pooling: str, layers: Sequence[str | int]) -> list[torch.Tensor]:
    """Pooled embeddings at each of `layers` (see `encoder_layer_index`) from one encoder pass.

    Only frames covering real audio are pooled: the padded tail is silence, and averaging it in
    would make every short clip look alike. Run under torch.no_grad() when extracting.
    """
    if pooling not in ("mean", "mean_std"):
        raise ValueError(f"pooling={pooling!r}: use 'mean' or 'mean_std'")
    encoder = model.get_encoder()
    num_layers = len(encoder.layers)
    indices = [encoder_layer_index(layer, num_layers) for layer in layers]
    # The per-layer tuple holds num_layers + 1 (B, T, d) tensors: ask for it only when needed.
    need_all = any(i < num_layers for i in indices)
    param = next(encoder.parameters())
    out = encoder(features.to(param.device, param.dtype), output_hidden_states=need_all)
    last = out.last_hidden_state  # (B, T, d); every layer has the same frames
    frames = torch.tensor([min(encoder_frames(n), last.shape[1]) for n in num_samples], device=last.device)
    mask = (torch.arange(last.shape[1], device=last.device)[None, :] < frames[:, None]).unsqueeze(-1).to(last.dtype)
    count = frames[:, None].to(last.dtype)
    pooled = []
    for i in indices:
        hidden = last if i == num_layers else out.hidden_states[i]
        mean = (hidden * mask).sum(dim=1) / count
        if pooling == "mean":
            pooled.append(mean)
        else:
            std = ((((hidden - mean[:, None, :]) ** 2) * mask).sum(dim=1) / count).clamp_min(0).sqrt()
            pooled.append(torch.cat([mean, std], dim=-1))
    return pooled


def pooled_embeddings(model: WhisperForConditionalGeneration, features: torch.Tensor,
                      num_samples: Sequence[int], pooling: str = "mean", layer: str | int = "last") -> torch.Tensor:
    """Utterance embeddings (B, d) or (B, 2d) pooled over the real-audio frames of one encoder layer.

    `layer`: "last" (the encoder's final output) or an index, see `encoder_layer_index`.
    """
    return pooled_layers(model, features, num_samples, pooling, [layer])[0]


def is_multilingual(vocab_size: int) -> bool:
    """Whether a vocabulary of this size has language and task tokens (not an English-only *.en model)."""
    return vocab_size >= MULTILINGUAL_MIN_VOCAB


def prefix_token_ids(processor: WhisperProcessor) -> list[int]:
    """Decoder prompt after <|startoftranscript|>: [<|en|>, <|transcribe|>,] <|notimestamps|>."""
    tok = processor.tokenizer
    names = ["<|en|>", "<|transcribe|>"] if is_multilingual(len(tok)) else []
    return tok.convert_tokens_to_ids([*names, "<|notimestamps|>"])


def label_ids(processor: WhisperProcessor, texts: Sequence[str]) -> torch.Tensor:
    """Training labels (B, L): prefix tokens, " text", <|endoftext|>, padded with -100.

    No leading <|startoftranscript|>: the model's shift-right inserts the decoder start token, a
    second one would be learned otherwise. The leading space matches how Whisper writes text.
    """
    tok = processor.tokenizer
    prefix = prefix_token_ids(processor)
    rows = [prefix + tok.encode(" " + t.strip(), add_special_tokens=False) + [tok.eos_token_id]
            for t in texts]
    width = max(len(r) for r in rows)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, :len(row)] = torch.tensor(row)
    return labels


def generate_kwargs(model: WhisperForConditionalGeneration, num_samples: int | Sequence[int]) -> dict:
    """Greedy `generate()` settings for a batch whose longest clip has max(num_samples) samples."""
    longest = num_samples if isinstance(num_samples, int) else max(num_samples)
    multilingual = is_multilingual(model.config.vocab_size)
    prompt_len = 4 if multilingual else 2  # <|startoftranscript|> [lang task] <|notimestamps|>
    budget = math.ceil(TOKENS_PER_SECOND * longest / SAMPLE_RATE) + TOKEN_MARGIN
    kwargs: dict = {
        "max_new_tokens": min(budget, model.config.max_target_positions - prompt_len),
        "num_beams": 1,
        "do_sample": False,
        "return_timestamps": False,
    }
    if multilingual:
        kwargs.update(language="en", task="transcribe")
    return kwargs


def transcribe(model: WhisperForConditionalGeneration, processor: WhisperProcessor,
               audios: Sequence[np.ndarray], batch_size: int = 8, precision: str = "fp32") -> list[str]:
    """Greedy transcripts in the order of `audios`, batched by encoder window (encoder_windows)."""
    param = next(model.parameters())
    windows = encoder_windows(model)
    texts: list[str] = [""] * len(audios)
    with torch.inference_mode():
        for batch in batch_plan([len(a) for a in audios], windows, batch_size, shuffle=False):
            clips = [audios[i] for i in batch]
            feats = input_features(processor, clips, windows).to(param.device, param.dtype)
            with autocast(precision, param.device):
                ids = generate(model, feats, **generate_kwargs(model, [len(a) for a in clips]))
            for i, text in zip(batch, processor.batch_decode(ids, skip_special_tokens=True), strict=True):
                texts[i] = text.strip()
    return texts
