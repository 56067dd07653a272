"""Session fixtures: the generated tiny SAP corpus and the tiny random Whisper, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workflow_scripts.base_model import materialize
from workflow_scripts.demo_corpus import generate

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
