"""Deterministic sampling of utterances: stratified by etiology or random, and speaker-disjoint splits.

Determinism: every function sorts its input by utterance id before drawing with a numpy
``default_rng(seed)``, so the same seed and the same set of utterances give the same sample whatever
the input order.

Stratified allocation uses the largest-remainder method over etiology counts, with one adjustment:
when ``n`` is at least the number of etiologies present, every etiology gets at least one utterance
(taken from the etiology that is most over its exact quota). Without it a 5-utterance sample of real
SAP proportions would leave Stroke out entirely, and the expert-assignment and gating stages need
every etiology represented.

Nested samples (decision): the stages use samples of different sizes (embedding / expert assignment,
gate training, expert training). :func:`nested_samples` draws the largest sample from the pool, the
next largest from that sample, and so on, each level stratified again. A smaller sample is therefore
always a subset of every larger one, so a later stage can reuse the embeddings already computed for
the larger sample instead of encoding its utterances again (the seed's "cached embedding reuse").
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import numpy as np

from .sap_data import Utterance

log = logging.getLogger(__name__)

METHODS = ("stratified", "random")


def allocate_stratified(counts: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` draws over strata by ``counts`` (largest remainder, >=1 each if n allows)."""
    total = sum(counts.values())
    if not 0 <= n <= total:
        raise ValueError(f"cannot draw {n} from {total} items; n must be between 0 and {total}")
    if n == 0:
        return dict.fromkeys(counts, 0)
    quota = {k: n * c / total for k, c in counts.items()}
    alloc = {k: math.floor(q) for k, q in quota.items()}
    # Ties broken by the larger stratum, then by name, so the result never depends on dict order.
    by_remainder = sorted(counts, key=lambda k: (-(quota[k] - alloc[k]), -counts[k], k))
    for k in by_remainder[: n - sum(alloc.values())]:
        alloc[k] += 1
    nonempty = [k for k, c in counts.items() if c > 0]
    if n >= len(nonempty):
        for k in sorted((k for k in nonempty if alloc[k] == 0), key=lambda k: (-counts[k], k)):
            donor = max((d for d in nonempty if alloc[d] > 1), key=lambda d: (alloc[d] - quota[d], d))
            alloc[donor] -= 1
            alloc[k] = 1
    return alloc


def resolve_size(pool_size: int, *, n: int | None = None, percent: float | None = None) -> int:
    """Sample size from an exact count and/or a percentage of the pool (the smaller if both).

    A positive percentage of a non-empty pool gives at least one utterance; ``n`` larger than the
    pool is capped (with a warning). Neither given: the whole pool.
    """
    sizes = [pool_size]
    if n is not None:
        if n < 0:
            raise ValueError(f"max_samples must be >= 0, got {n}")
        if n > pool_size:
            log.warning("asked for %d utterances but only %d are available; using all", n, pool_size)
        sizes.append(n)
    if percent is not None:
        if not 0 < percent <= 100:
            raise ValueError(f"percent must be in (0, 100], got {percent}")
        sizes.append(max(1, round(pool_size * percent / 100)) if pool_size else 0)
    return min(sizes)


def sample_utterances(
    utts: list[Utterance],
    *,
    n: int | None = None,
    percent: float | None = None,
    method: str = "stratified",
    seed: int = 0,
) -> list[Utterance]:
    """Draw ``resolve_size(len(utts), n=n, percent=percent)`` utterances; result sorted by id."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; use one of {METHODS}")
    pool = sorted(utts, key=lambda u: u.id)
    size = resolve_size(len(pool), n=n, percent=percent)
    rng = np.random.default_rng(seed)
    if method == "random":
        picked = [pool[i] for i in rng.choice(len(pool), size=size, replace=False)]
    else:
        groups: dict[str, list[Utterance]] = defaultdict(list)
        for u in pool:
            groups[u.etiology].append(u)
        alloc = allocate_stratified({e: len(g) for e, g in groups.items()}, size)
        picked = []
        for eti in sorted(groups):  # fixed order: the rng stream must not depend on input order
            group = groups[eti]
            picked += [group[i] for i in rng.choice(len(group), size=alloc[eti], replace=False)]
    return sorted(picked, key=lambda u: u.id)


def nested_samples(
    utts: list[Utterance], sizes: dict[str, int], *, method: str = "stratified", seed: int = 0
) -> dict[str, list[Utterance]]:
    """One sample per name in ``sizes`` (exact counts); a smaller sample is a subset of every larger one."""
    samples: dict[str, list[Utterance]] = {}
    pool = list(utts)
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        pool = sample_utterances(pool, n=sizes[name], method=method, seed=seed)
        samples[name] = pool
    return {name: samples[name] for name in sizes}


def speaker_disjoint_split(
    utts: list[Utterance], *, val_fraction: float, seed: int, max_val: int | None = None
) -> tuple[list[Utterance], list[Utterance]]:
    """Split into (train, val) by whole speakers, stratified by etiology.

    About ``val_fraction`` of the speakers go to val, allocated per etiology by largest remainder;
    an etiology with >=2 speakers always gets at least one val speaker and always keeps at least
    one train speaker; a single-speaker etiology stays in train. ``max_val`` caps val utterances by
    a stratified subsample of the val speakers' utterances; the ones not drawn are used by neither
    side, because putting them in train would break speaker-disjointness.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    pool = sorted(utts, key=lambda u: u.id)
    speakers: dict[str, set[str]] = defaultdict(set)
    for u in pool:
        speakers[u.etiology].add(u.speaker)
    val_speakers: set[str] = set()
    if val_fraction > 0:
        eligible = {e: len(s) for e, s in speakers.items() if len(s) >= 2}
        n_val = round(val_fraction * sum(len(s) for s in speakers.values()))
        alloc = allocate_stratified(eligible, min(n_val, sum(eligible.values())))
        rng = np.random.default_rng(seed)
        for eti in sorted(eligible):
            k = min(max(alloc[eti], 1), eligible[eti] - 1)
            ordered = sorted(speakers[eti])
            val_speakers.update(ordered[i] for i in rng.choice(len(ordered), size=k, replace=False))
    train = [u for u in pool if u.speaker not in val_speakers]
    val = [u for u in pool if u.speaker in val_speakers]
    if max_val is not None and len(val) > max_val:
        val = sample_utterances(val, n=max_val, method="stratified", seed=seed)
    return train, val
