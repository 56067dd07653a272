"""The gate file says what its input was, and a stage that embeds differently is stopped before routing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workflow_scripts import gating
from workflow_scripts.gate_mlp import read_gate_file
from workflow_scripts.settings import default_run

RECORD = {"pooling": "mean", "layer": 2, "base_model": "results/_models/tiny.en", "encoder_window_s": 10}


def check(extra: dict, **overrides) -> None:
    expected = {"base_model": "results/_models/tiny.en", "encoder_window_s": 10.0, "pooling": "mean", "layer": 2,
                **overrides}
    gating.check_gate_record(extra, path="results/demo/gating.safetensors", **expected)


def test_matching_record_passes() -> None:
    check(RECORD)  # 10 and 10.0 are the same window
    check(RECORD, pooling=None, layer=None)  # keys passed as None are not checked
    check({k: v for k, v in RECORD.items() if k != "layer"}, layer="last")  # older gates: "last"


@pytest.mark.parametrize(("override", "key", "have", "want"), [
    ({"layer": "last"}, "embeddings.layer", "2", "'last'"),
    ({"layer": 3}, "embeddings.layer", "2", "3"),
    ({"encoder_window_s": 30}, "encoder_window_s", "10", "30"),
    ({"base_model": "openai/whisper-large-v2"}, "base_model", "'results/_models/tiny.en'",
     "'openai/whisper-large-v2'"),
    ({"pooling": "mean_std"}, "embeddings.pooling", "'mean'", "'mean_std'"),
])
def test_mismatch_names_file_key_values_and_the_fix(override: dict, key: str, have: str, want: str) -> None:
    with pytest.raises(ValueError) as err:
        check(RECORD, **override)
    message = str(err.value)
    assert message.startswith("results/demo/gating.safetensors:")
    assert f"{key}={have}" in message and f"{key}={want}" in message
    assert "rerun the gating stage" in message


def test_gate_without_layer_is_last() -> None:
    with pytest.raises(ValueError, match=r"embeddings.layer='last'.*embeddings.layer=1"):
        check({k: v for k, v in RECORD.items() if k != "layer"}, layer=1)


def test_trained_gate_records_its_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb_dir = tmp_path / "embeddings"
    emb_dir.mkdir()
    speakers = [f"{eti}{s}" for eti in ("A", "B") for s in range(3)]
    utts = {f"{spk}_u{i}": {"row": row, "speaker": spk, "etiology": spk[0]}
            for row, (spk, i) in enumerate((spk, i) for spk in speakers for i in range(4))}
    labels = np.array([int(u["etiology"] == "B") for u in utts.values()])
    np.save(emb_dir / "embeddings.npy", (rng.normal(size=(len(utts), 8)) + 3 * labels[:, None]).astype(np.float16))
    (emb_dir / "mapping.json").write_text(json.dumps({
        "base_model": "tiny-random", "pooling": "mean_std", "layer": 1, "encoder_window_s": 10, "dim": 8,
        "utterances": utts}))
    np.save(tmp_path / "labels.npy", labels)
    settings = default_run()
    settings["gating"].update(epochs=3, hidden_dim=8)
    gating.train(emb_dir, tmp_path / "labels.npy", tmp_path / "gating.safetensors", tmp_path / "metrics.json", settings)
    _, extra = read_gate_file(tmp_path / "gating.safetensors")
    assert extra == {"pooling": "mean_std", "layer": 1, "base_model": "tiny-random", "encoder_window_s": 10}
    gating.check_gate_record(extra, base_model="tiny-random", encoder_window_s=10, pooling="mean_std", layer=1,
                             path=tmp_path / "gating.safetensors")
