"""Batches for the training stages: deterministic order, resumable mid-epoch, same with workers."""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperProcessor

from workflow_scripts.sap_data import DataReport, read_split
from workflow_scripts.training import make_loader


def _batches(loader) -> list[tuple[list[int], torch.Tensor]]:
    return [(b["index"], b["input_features"]) for b in loader]


def test_loader_order_is_seeded_resumable_and_worker_independent(tiny_corpus, tiny_random):
    utts = read_split(tiny_corpus, "Train", DataReport(), max_duration_s=10)[:10]
    processor = WhisperProcessor.from_pretrained(tiny_random)
    full = _batches(make_loader(utts, processor, batch_size=3, num_workers=0, shuffle=True, seed=11))
    assert sorted(i for idx, _ in full for i in idx) == list(range(10))
    assert [idx for idx, _ in full] == [idx for idx, _ in _batches(
        make_loader(utts, processor, batch_size=3, num_workers=0, shuffle=True, seed=11))]
    assert [idx for idx, _ in full] != [idx for idx, _ in _batches(
        make_loader(utts, processor, batch_size=3, num_workers=0, shuffle=True, seed=12))]
    # A resumed epoch continues with exactly the batches that were left.
    resumed = _batches(make_loader(utts, processor, batch_size=3, num_workers=0, shuffle=True, seed=11,
                                   skip_batches=2))
    assert [idx for idx, _ in resumed] == [idx for idx, _ in full[2:]]
    # Decoding in worker processes changes nothing but speed.
    with_workers = _batches(make_loader(utts, processor, batch_size=3, num_workers=2, shuffle=True, seed=11))
    assert [idx for idx, _ in with_workers] == [idx for idx, _ in full]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(with_workers, full, strict=True))


def test_precision_follows_the_setting_then_the_seed_flag():
    from workflow_scripts.settings import precision_setting
    from workflow_scripts.training import resolve_precision

    assert precision_setting({"precision": "bf16", "fp16": True}) == "bf16"  # precision wins
    assert precision_setting({"precision": "auto", "fp16": True}) == "fp16"  # the seed's --fp16
    assert precision_setting({"precision": "auto", "fp16": False}) == "fp32"
    assert precision_setting({"precision": "auto", "fp16": "auto"}) == "auto"
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for explicitly: CPU autocast runs it
    with pytest.raises(ValueError, match="training.precision"):
        resolve_precision("fp8", cpu)
