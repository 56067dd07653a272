"""Length-bucketed encoder windows: the ladder a setting means, and batches of clips that share a window."""

from __future__ import annotations

import pytest

from workflow_scripts.sap_data import SAMPLE_RATE
from workflow_scripts.windows import (
    batch_plan,
    fit_ladder,
    sap_like_durations,
    window_index,
    window_ladder,
)

LADDER = [5.0, 10.0, 20.0, 30.0]


def sap_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Clip lengths in samples, mixed as SAP's are: most short commands, a few long passages."""
    return [round(s * SAMPLE_RATE) for s in sap_like_durations(n, seed)]


def test_a_setting_is_a_ladder_topped_by_the_native_window():
    assert window_ladder([20, 5, 10]) == LADDER
    assert window_ladder(10) == [10.0, 30.0]  # one window, longer clips take 30 s: none is dropped
    assert window_ladder(30) == [30.0]  # stock Whisper, no bucketing
    assert window_ladder(7.02) == [7.02, 30.0]
    for bad in (0, 31, 7.01, [], [5, 40], True):
        with pytest.raises(ValueError, match="encoder_window_s"):
            window_ladder(bad)
    # A test model with a 10 s window of its own keeps the rungs below it.
    assert fit_ladder(LADDER, 10.0) == [5.0, 10.0]


def test_each_clip_goes_to_the_smallest_window_that_holds_it():
    assert [window_index(round(s * SAMPLE_RATE), LADDER) for s in (0.1, 5.0, 5.01, 10.0, 19.99, 30.0)] == [
        0, 0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match=r"30.01 s is longer than the largest encoder window \(30 s\)"):
        window_index(round(30.01 * SAMPLE_RATE), LADDER)


def test_bucketed_batches_are_seeded_complete_and_one_window_each():
    lengths = sap_like_lengths(500)
    plan = batch_plan(lengths, LADDER, 8, shuffle=True, seed=3)
    assert plan == batch_plan(lengths, LADDER, 8, shuffle=True, seed=3)  # deterministic: resumable by skipping
    assert plan != batch_plan(lengths, LADDER, 8, shuffle=True, seed=4)
    assert sorted(i for batch in plan for i in batch) == list(range(500))  # no clip up to 30 s dropped
    for batch in plan:
        windows = {window_index(lengths[i], LADDER) for i in batch}
        assert len(windows) == 1 and 1 <= len(batch) <= 8
        window = LADDER[windows.pop()]
        assert all(lengths[i] <= window * SAMPLE_RATE for i in batch)  # every clip fits its batch's window
    # At most one partial batch per window.
    assert sum(len(b) < 8 for b in plan) <= len(LADDER)
    # Windows mix over the epoch instead of running short clips first and long ones last.
    first = [window_index(lengths[b[0]], LADDER) for b in plan[:20]]
    assert len(set(first)) > 1
    # A budget of utterance passes keeps the first clips of the same seeded order.
    limited = batch_plan(lengths, LADDER, 8, shuffle=True, seed=3, limit=100)
    assert sum(len(b) for b in limited) == 100


def test_inference_batches_keep_the_given_order_within_a_window():
    lengths = sap_like_lengths(40, seed=1)
    plan = batch_plan(lengths, LADDER, 4, shuffle=False)
    for window in range(len(LADDER)):
        in_window = [i for i in range(40) if window_index(lengths[i], LADDER) == window]
        assert [i for b in plan for i in b if window_index(lengths[i], LADDER) == window] == in_window
    # The order depends on the windows only, not on the batch size (a resumed extraction may change it).
    assert [i for b in plan for i in b] == [i for b in batch_plan(lengths, LADDER, 7, shuffle=False) for i in b]
