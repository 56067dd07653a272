import random
from collections import Counter

import pytest

from workflow_scripts.sampling import (
    allocate_stratified,
    nested_samples,
    resolve_size,
    sample_utterances,
    speaker_disjoint_split,
)
from workflow_scripts.sap_data import Utterance

# Utterances per speaker per etiology, roughly SAP-shaped: one large, one tiny etiology.
SHAPE = {"Parkinson's Disease": (6, 20), "ALS": (4, 15), "Cerebral Palsy": (3, 12),
         "Down Syndrome": (2, 8), "Stroke": (1, 10)}


def corpus(shape: dict[str, tuple[int, int]] = SHAPE) -> list[Utterance]:
    utts = []
    for e, (eti, (n_speakers, per_speaker)) in enumerate(shape.items()):
        for s in range(n_speakers):
            spk = f"S{e}{s}"
            utts += [Utterance(f"{spk}_{i:03d}", spk, eti, f"/d/{spk}_{i:03d}.wav", "hi", "", "Train", 2.0)
                     for i in range(per_speaker)]
    return utts


def ids(utts):
    return [u.id for u in utts]


def test_allocate_largest_remainder():
    # Quotas 4.5 / 3.3 / 2.2 -> floors 4/3/2, the one left goes to the largest remainder.
    assert allocate_stratified({"a": 45, "b": 33, "c": 22}, 10) == {"a": 5, "b": 3, "c": 2}
    assert allocate_stratified({"a": 10, "b": 10}, 0) == {"a": 0, "b": 0}
    assert allocate_stratified({"a": 3, "b": 2}, 5) == {"a": 3, "b": 2}


def test_allocate_gives_small_stratum_its_share():
    # Real SAP Train proportions (thousands): pure largest remainder would give Stroke nothing.
    counts = {"PD": 129, "ALS": 85, "CP": 59, "DS": 29, "Stroke": 18}
    assert allocate_stratified(counts, 5) == dict.fromkeys(counts, 1)
    alloc = allocate_stratified(counts, 100)
    assert sum(alloc.values()) == 100 and alloc["Stroke"] == 6 and alloc["PD"] == 40
    assert allocate_stratified({"a": 90, "b": 10, "c": 0}, 3) == {"a": 2, "b": 1, "c": 0}


def test_allocate_rejects_impossible_n():
    with pytest.raises(ValueError, match="cannot draw 6 from 5"):
        allocate_stratified({"a": 5}, 6)


def test_resolve_size():
    assert resolve_size(200, n=10) == 10
    assert resolve_size(200, percent=15) == 30
    assert resolve_size(200, n=10, percent=15) == 10
    assert resolve_size(200, n=50, percent=15) == 30
    assert resolve_size(200, percent=0.1) == 1  # a tiny fraction still yields one utterance
    assert resolve_size(200) == 200
    assert resolve_size(5, n=10) == 5
    with pytest.raises(ValueError, match="percent"):
        resolve_size(10, percent=0)


@pytest.mark.parametrize("method", ["stratified", "random"])
@pytest.mark.parametrize("n", [10, 5, 1])
def test_exact_counts(method, n):
    sample = sample_utterances(corpus(), n=n, method=method, seed=3)
    assert len(sample) == n == len(set(ids(sample)))


def test_stratified_proportions_and_small_etiology():
    utts = corpus()
    sample = sample_utterances(utts, percent=20, seed=0)
    pool_counts = Counter(u.etiology for u in utts)
    assert Counter(u.etiology for u in sample) == allocate_stratified(pool_counts, len(sample))
    assert set(Counter(u.etiology for u in sample_utterances(utts, n=5, seed=1))) == set(SHAPE)


@pytest.mark.parametrize("method", ["stratified", "random"])
def test_deterministic_and_order_independent(method):
    utts = corpus()
    shuffled = list(utts)
    random.Random(7).shuffle(shuffled)
    a = sample_utterances(utts, n=20, method=method, seed=11)
    assert ids(a) == ids(sample_utterances(shuffled, n=20, method=method, seed=11))
    assert ids(a) == sorted(ids(a))
    assert ids(a) != ids(sample_utterances(utts, n=20, method=method, seed=12))


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample_utterances(corpus(), n=3, method="cluster")


def test_nested_samples_are_subsets_and_stratified():
    utts = corpus()
    sizes = {"gate": 10, "embed": 40, "expert": 20}
    samples = nested_samples(utts, sizes, method="stratified", seed=5)
    assert list(samples) == list(sizes)
    assert {k: len(v) for k, v in samples.items()} == sizes
    assert set(ids(samples["gate"])) <= set(ids(samples["expert"])) <= set(ids(samples["embed"]))
    for sample in samples.values():
        assert set(Counter(u.etiology for u in sample)) == set(SHAPE)
    shuffled = list(reversed(utts))
    again = nested_samples(shuffled, sizes, method="stratified", seed=5)
    assert {k: ids(v) for k, v in again.items()} == {k: ids(v) for k, v in samples.items()}


def test_nested_samples_quick_run_sizes_random():
    samples = nested_samples(corpus(), {"a": 10, "b": 5, "c": 5}, method="random", seed=0)
    assert [len(v) for v in samples.values()] == [10, 5, 5]
    assert set(ids(samples["b"])) <= set(ids(samples["a"]))
    assert set(ids(samples["c"])) <= set(ids(samples["a"]))


def test_speaker_disjoint_split_stratified():
    utts = corpus()
    train, val = speaker_disjoint_split(utts, val_fraction=0.25, seed=0)
    train_spk, val_spk = {u.speaker for u in train}, {u.speaker for u in val}
    assert not train_spk & val_spk
    assert len(train) + len(val) == len(utts)
    multi = {e for e, (n_spk, _) in SHAPE.items() if n_spk >= 2}
    assert {u.etiology for u in val} == multi  # single-speaker Stroke stays in train
    assert {u.etiology for u in train} == set(SHAPE)  # no etiology moved wholly to val
    # 16 speakers * 0.25 = 4 -> allocated by largest remainder over the eligible etiologies.
    assert len(val_spk) == 4


def test_speaker_disjoint_split_never_takes_all_speakers():
    train, val = speaker_disjoint_split(corpus({"ALS": (2, 5), "Stroke": (3, 5)}), val_fraction=0.9, seed=1)
    assert Counter(u.etiology for u in train) == {"ALS": 5, "Stroke": 5}
    assert Counter(u.etiology for u in val) == {"ALS": 5, "Stroke": 10}


def test_speaker_disjoint_split_max_val_and_determinism():
    utts = corpus()
    train, val = speaker_disjoint_split(utts, val_fraction=0.3, seed=4, max_val=6)
    assert len(val) == 6
    assert not {u.speaker for u in train} & {u.speaker for u in val}
    assert {u.etiology for u in val} == {"Parkinson's Disease", "ALS", "Cerebral Palsy", "Down Syndrome"}
    shuffled = list(reversed(utts))
    train2, val2 = speaker_disjoint_split(shuffled, val_fraction=0.3, seed=4, max_val=6)
    assert (ids(train2), ids(val2)) == (ids(train), ids(val))


def test_speaker_disjoint_split_zero_fraction():
    utts = corpus()
    train, val = speaker_disjoint_split(utts, val_fraction=0.0, seed=0)
    assert val == [] and len(train) == len(utts)
    with pytest.raises(ValueError, match="val_fraction"):
        speaker_disjoint_split(utts, val_fraction=1.0, seed=0)
