"""Length-bucketed encoder windows: which window each clip gets, and batches of clips that share one.

Whisper pads every clip to 30 s, yet most SAP prompts last 2-5 s. The run's `encoder_window_s` is a
ladder of windows (e.g. 5 / 10 / 20 / 30 s); a clip always goes into the smallest window that holds
it, and a batch holds clips of one window only. The native 30 s window is always the ladder's top,
so no clip up to 30 s is ever dropped; the data stage skips (and counts) only longer ones.

A clip's window depends on the clip alone, never on its batch. The encoder has no attention mask, so
its padding changes what the real frames become; one window per clip keeps a pooled embedding, a
gate route and a transcript the same in training, in the cached gate inputs and at eval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from workflow_scripts.whisper_audio import NATIVE_WINDOW_S, SAMPLE_RATE

# Whisper's encoder runs at 50 positions per second of audio: log-mel frames every 10 ms (100 per
# second), halved by the stride-2 second convolution.
POSITIONS_PER_SECOND = 50
MEL_FRAMES_PER_POSITION = 2


def window_ladder(setting: float | Sequence[float]) -> list[float]:
    """The windows of an `encoder_window_s` setting, ascending, with the native 30 s on top.

    A number is one window for every clip it holds (30: no bucketing); longer clips take 30 s.
    """
    values = [setting] if isinstance(setting, int | float) else list(setting)
    if not values:
        raise ValueError("encoder_window_s is an empty list; give a number or a ladder such as [5, 10, 20, 30]")
    for value in values:
        positions = value * POSITIONS_PER_SECOND
        if isinstance(value, bool) or not 0 < value <= NATIVE_WINDOW_S or abs(positions - round(positions)) > 1e-6:
            raise ValueError(f"encoder_window_s: {value!r} is not a window; each must be a multiple of 0.02 s "
                             f"in (0, {NATIVE_WINDOW_S:g}]")
    return sorted({float(v) for v in values} | {NATIVE_WINDOW_S})


def fit_ladder(ladder: Sequence[float], native_s: float) -> list[float]:
    """The ladder on a model whose own window is `native_s` (under 30 s only for test models)."""
    return sorted({w for w in ladder if w < native_s} | {native_s})


def sap_like_durations(n: int, seed: int = 0) -> np.ndarray:
    """Clip durations (s) in SAP's mix, for benchmarks and tests: 72 % short commands (1.5-5 s), 23 %
    sentences (5-15 s), 5 % long passages (15-30 s), in a seeded order."""
    rng = np.random.default_rng(seed)
    short, medium = round(n * 0.72), round(n * 0.23)
    return rng.permutation(np.concatenate([rng.uniform(1.5, 5, short), rng.uniform(5, 15, medium),
                                           rng.uniform(15, 30, n - short - medium)]))


def window_index(num_samples: int, ladder: Sequence[float]) -> int:
    """Index of the smallest window in `ladder` that holds `num_samples` of audio."""
    for i, window in enumerate(ladder):
        if num_samples <= round(window * SAMPLE_RATE):
            return i
    raise ValueError(f"a clip of {num_samples / SAMPLE_RATE:.2f} s is longer than the largest encoder window "
                     f"({ladder[-1]:g} s); the data stage skips such clips, so re-run it for this model")


def clip_samples(duration_s: float) -> int:
    """Samples of a clip at 16 kHz, from its header duration (what load_audio will return)."""
    return round(duration_s * SAMPLE_RATE)


def batch_plan(num_samples: Sequence[int], ladder: Sequence[float], batch_size: int, *, shuffle: bool,
               seed: int = 0, limit: int | None = None) -> list[list[int]]:
    """Batches of indices into `num_samples`; every batch holds clips of one window.

    shuffle: a seeded order of clips, cut into batches per window, then the batches in a seeded order
    (so windows mix over an epoch); the plan depends only on the seed, so a resumed epoch can skip
    the batches already trained. Without shuffle: clips in their given order, grouped by window
    (inference). `limit` keeps the first `limit` clips of the order (a partial last epoch).
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(num_samples), generator=generator).tolist() if shuffle else list(range(len(num_samples)))
    buckets: list[list[int]] = [[] for _ in ladder]
    for i in order[:limit]:
        buckets[window_index(num_samples[i], ladder)].append(i)
    batches = [bucket[j:j + batch_size] for bucket in buckets for j in range(0, len(bucket), batch_size)]
    if shuffle:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    return batches
