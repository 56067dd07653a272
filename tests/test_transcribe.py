"""The transcribe command on a trained asr_best: converted audio said so, long audio in chunks, a bad file
reported on its own line while the others are transcribed; the model card written with the model."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from workflow_scripts import asr, transcribe
from workflow_scripts.sap_data import load_audio, read_utterances
from workflow_scripts.settings import default_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def asr_best(utterance_files, tiny_random, tmp_path_factory):
    s = default_run()
    s.update(base_model="tiny-random", num_experts=2, skip_pretraining=True, seed=5)
    s["lora"].update(r=4, alpha=8)
    s["asr"].update(epochs=1, batch_size=4)
    s["training"].update(select_best_by="loss")
    folder = tmp_path_factory.mktemp("asr")
    asr.train(utterance_files / "train.json", utterance_files / "val.json", str(tiny_random), folder / "asr_best",
              folder / "work", s)
    return folder / "asr_best"


@pytest.fixture(scope="module")
def audio(utterance_files, tmp_path_factory) -> dict:
    clip = load_audio(read_utterances(utterance_files / "train.json")[0].wav)
    folder = tmp_path_factory.mktemp("audio")
    stereo = resample_poly(clip, 441, 160).astype(np.float32)
    sf.write(folder / "stereo_44k.wav", np.stack([stereo, 0.5 * stereo], axis=1), 44100)
    sf.write(folder / "long_40s.flac", np.resize(clip, 40 * 16000), 16000)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return {"folder": folder, "files": [folder / n for n in ("stereo_44k.wav", "long_40s.flac", "corrupt.wav")]}


def test_three_files_three_results_one_error(asr_best, audio, capsys):
    status = transcribe.main([str(asr_best), *map(str, audio["files"])])
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1 and [r["file"] for r in results] == list(map(str, audio["files"]))
    stereo, long, corrupt = results
    assert stereo["notes"] == ["resampled from 44100 Hz", "downmixed from 2 channels"]
    assert long["duration_s"] == 40.0 and "decoded in 2 chunks" in long["notes"][0]
    for r in (stereo, long):
        assert r["expert"] in (0, 1) and 0.5 <= r["gate_probability"] <= 1 and isinstance(r["text"], str)
    assert "error" in corrupt and "corrupt.wav" in corrupt["error"] and "text" not in corrupt


def test_tsv_and_folders_and_the_python_api(asr_best, audio, capsys):
    transcribe.main([str(asr_best), str(audio["folder"]), "--tsv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out), delimiter="\t"))
    assert sorted(r["file"] for r in rows) == sorted(map(str, audio["files"]))  # the folder, expanded
    model = transcribe.load_model(asr_best)
    api = transcribe.transcribe(model, [audio["files"][0]])
    by_file = {r["file"]: r for r in rows}
    assert api[0]["text"] == by_file[str(audio["files"][0])]["text"]


def test_model_card_says_what_the_model_is_and_how_to_load_it(asr_best, tiny_random):
    card = (asr_best / "README.md").read_text()
    assert str(tiny_random) in card and "2 LoRA adapters" in card and "load_model" in card
