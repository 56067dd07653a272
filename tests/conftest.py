"""Session fixtures: the generated tiny SAP corpus and the tiny random Whisper, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workflow_scripts.base_model import materialize
from workflow_scripts.demo_corpus import generate
from workflow_scripts.sap_data import DataReport, read_split, write_utterances

# Two cores on the dev/CI machines: more threads than that only add contention.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "tiny"
    generate(out, "tiny", seed=0, jobs=2)
    return out


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory) -> Path:
    return materialize("tiny-random", tmp_path_factory.mktemp("models") / "tiny-random")


@pytest.fixture(scope="session")
def utterance_files(tiny_corpus, tmp_path_factory) -> Path:
    """train.json (8 utterances) and val.json (2, from two other speakers) for the training-stage tests."""
    train = read_split(tiny_corpus, "Train", DataReport(), max_duration_s=10)
    folder = tmp_path_factory.mktemp("lists")
    val_speakers = set(sorted({u.speaker for u in train})[:2])
    write_utterances(folder / "train.json", [u for u in train if u.speaker not in val_speakers][:8])
    write_utterances(folder / "val.json", [u for u in train if u.speaker in val_speakers][:2])
    return folder
