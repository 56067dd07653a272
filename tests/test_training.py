"""Batches for the training stages: length-bucketed, deterministic order, resumable mid-epoch, same with workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperProcessor

from workflow_scripts.sap_data import DataReport, read_split
from workflow_scripts.training import make_loader, utterance_plan
from workflow_scripts.windows import window_index

LADDER = [3.0, 5.0, 30.0]


def _batches(loader) -> list[tuple[list[int], torch.Tensor]]:
    return [(b["index"], b["input_features"]) for b in loader]


def test_loader_order_is_seeded_resumable_and_worker_independent(tiny_corpus, tiny_random):
    utts = read_split(tiny_corpus, "Train", DataReport())[:10]
    processor = WhisperProcessor.from_pretrained(tiny_random)

    def batches(plan, workers=0):
        return _batches(make_loader(utts, processor, plan, windows=LADDER, num_workers=workers))

    plan = utterance_plan(utts, LADDER, 3, shuffle=True, seed=11)
    full = batches(plan)
    assert sorted(i for idx, _ in full for i in idx) == list(range(10))
    assert utterance_plan(utts, LADDER, 3, shuffle=True, seed=11) == plan
    assert utterance_plan(utts, LADDER, 3, shuffle=True, seed=12) != plan
    # Each batch runs at the window of its clips, and every clip's window is the smallest that holds it.
    windows_used = set()
    for idx, feats in full:
        own = {LADDER[window_index(round(utts[i].duration_s * 16000), LADDER)] for i in idx}
        assert len(own) == 1 and feats.shape[-1] == 100 * own.pop()
        windows_used.add(feats.shape[-1])
    assert len(windows_used) > 1, "the tiny corpus should span two windows of this ladder"
    # A resumed epoch continues with exactly the batches that were left.
    assert [idx for idx, _ in batches(plan[2:])] == [idx for idx, _ in full[2:]]
    # Decoding in worker processes changes nothing but speed.
    with_workers = batches(plan, workers=2)
    assert [idx for idx, _ in with_workers] == [idx for idx, _ in full]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(with_workers, full, strict=True))


def test_precision_follows_the_setting_then_the_seed_flag():
    from workflow_scripts.device import resolve_precision
    from workflow_scripts.settings import precision_setting

    assert precision_setting({"precision": "bf16", "fp16": True}) == "bf16"  # precision wins
    assert precision_setting({"precision": "auto", "fp16": True}) == "fp16"  # the seed's --fp16
    assert precision_setting({"precision": "auto", "fp16": False}) == "fp32"
    assert precision_setting({"precision": "auto", "fp16": "auto"}) == "auto"
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for explicitly: CPU autocast runs it
    with pytest.raises(ValueError, match="training.precision"):
        resolve_precision("fp8", cpu)


def test_embeddings_do_not_depend_on_batch_mates_workers_or_a_resume(tiny_corpus, tiny_random):
    """Each clip is embedded at its own window, in window order; rows come back in the given order."""
    from workflow_scripts.embeddings import embed_utterances, window_order
    from workflow_scripts.training import load_base

    utts = read_split(tiny_corpus, "Train", DataReport())[:9]
    model, processor = load_base(str(tiny_random), [3, 5])
    cpu = torch.device("cpu")
    with torch.no_grad():
        batched = embed_utterances(model, processor, utts, pooling="mean", batch_size=4, device=cpu)
        one_by_one = np.concatenate([embed_utterances(model, processor, [u], pooling="mean", batch_size=1,
                                                      device=cpu) for u in utts])
        with_workers = embed_utterances(model, processor, utts, pooling="mean", batch_size=4, device=cpu,
                                        num_workers=2)
        # A resumed extraction: the first rows (in window order) come from the interrupted run.
        order = window_order(utts, [3.0, 5.0, 30.0])
        resumed = embed_utterances(model, processor, utts, pooling="mean", batch_size=3, device=cpu,
                                   done=batched[order[:4]])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_array_equal(with_workers, batched)
    np.testing.assert_allclose(resumed, batched, atol=1e-5)
