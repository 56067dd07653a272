"""The transcribe command on a trained asr_best: converted audio said so, long audio in chunks, a bad file
reported on its own line while the others are transcribed; results printed as each file is done; pipes,
folders and over-long audio refused without being read; every line strict JSON; the model card written
with the model."""

from __future__ import annotations

import csv
import io
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

from workflow_scripts import asr, transcribe
from workflow_scripts.sap_data import load_audio, read_utterances
from workflow_scripts.settings import default_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = Path(__file__).resolve().parent.parent
CLI_TIMEOUT_S = 300


def strict_json(line: str) -> dict:
    """A line parsed as strict JSON: NaN, Infinity and -Infinity, which Python writes by default, are errors."""
    def reject(name: str):
        raise ValueError(f"{name} is not JSON: {line}")
    return json.loads(line, parse_constant=reject)


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
    results = [strict_json(line) for line in capsys.readouterr().out.splitlines()]
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


@pytest.fixture(scope="module")
def clip(utterance_files) -> np.ndarray:
    return load_audio(read_utterances(utterance_files / "train.json")[0].wav)


@pytest.fixture(scope="module")
def cli_run(asr_best, clip, tmp_path_factory) -> dict:
    """The CLI as a user runs it, on: a short file, a 60 s one, a short one that is deleted as soon as the
    first result is read, a named pipe called pipe.wav, and a folder holding another pipe, a folder named
    like audio, and a real file. A pipe that were opened would block the run until the timeout."""
    folder = tmp_path_factory.mktemp("cli")
    sf.write(folder / "first.wav", clip, 16000)
    sf.write(folder / "minute.wav", np.resize(clip, 60 * 16000), 16000)
    sf.write(folder / "last.wav", clip, 16000)
    os.mkfifo(folder / "pipe.wav")
    odd = folder / "odd"
    (odd / "named_like_audio.wav").mkdir(parents=True)
    os.mkfifo(odd / "another_pipe.wav")
    sf.write(odd / "real.wav", clip, 16000)
    files = [folder / n for n in ("first.wav", "minute.wav", "last.wav", "pipe.wav")]
    cmd = [sys.executable, "-m", "workflow_scripts.transcribe", str(asr_best), *map(str, files), str(odd)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(folder / "stderr.txt", "wb") as err, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0, env=env) as proc:
        try:
            ready, _, _ = select.select([proc.stdout], [], [], CLI_TIMEOUT_S)
            assert ready, f"no result line in {CLI_TIMEOUT_S} s: {(folder / 'stderr.txt').read_text()[-3000:]}"
            first = proc.stdout.readline().decode()  # unbuffered: reads exactly the first line
            (folder / "last.wav").unlink()  # a run that read every file before printing has read it already
            rest, _ = proc.communicate(timeout=CLI_TIMEOUT_S)
        finally:
            proc.kill()
    lines = [first, *rest.decode().splitlines()]
    return {"status": proc.returncode, "lines": lines, "by_file": {r["file"]: r for r in map(strict_json, lines)},
            "files": files, "odd": odd}


def test_each_result_is_printed_before_the_next_file_is_read(cli_run):
    by_file, files = cli_run["by_file"], cli_run["files"]
    first, minute, last = (by_file[str(f)] for f in files[:3])
    assert json.loads(cli_run["lines"][0])["file"] == str(files[0])
    assert isinstance(first["text"], str) and isinstance(minute["text"], str)
    assert "decoded in 2 chunks" in minute["notes"][0]
    # Deleted right after the first result arrived, while the 60 s file was being decoded: the run reached
    # it only then.
    assert "No such file" in last["error"], last


def test_pipes_and_folders_named_like_audio_are_error_lines_never_read(cli_run):
    by_file, odd = cli_run["by_file"], cli_run["odd"]
    assert cli_run["status"] == 1
    assert "named pipe" in by_file[str(cli_run["files"][3])]["error"]
    assert "named pipe" in by_file[str(odd / "another_pipe.wav")]["error"]
    assert "is a folder" in by_file[str(odd / "named_like_audio.wav")]["error"]
    assert isinstance(by_file[str(odd / "real.wav")]["text"], str)
    assert len(cli_run["lines"]) == len(by_file) == 7


def test_audio_over_the_limit_is_refused_from_its_header(asr_best, clip, tmp_path, monkeypatch, capsys):
    ten_minutes = tmp_path / "ten_minutes_and_a_second.wav"
    sf.write(ten_minutes, np.zeros(601 * 16000, np.float32), 16000, subtype="PCM_16")
    short = tmp_path / "short.wav"
    sf.write(short, clip, 16000)
    decoded = []
    monkeypatch.setattr(transcribe, "load_audio", lambda path: decoded.append(Path(path)) or load_audio(path))
    model = transcribe.load_model(asr_best)
    over, ok = transcribe.transcribe(model, [ten_minutes, short])  # the default limit: 600 s
    assert over == {"file": str(ten_minutes), "error": f"{ten_minutes} lasts 601.0 s, over the limit of 600 s: cut "
                                                       "it into shorter files, or raise --max-duration-s"}
    assert "text" in ok and decoded == [short]  # the long file's audio was never decoded
    assert transcribe.main([str(asr_best), str(short), "--max-duration-s", "1"]) == 1
    assert "over the limit of 1 s" in strict_json(capsys.readouterr().out)["error"]


def test_a_non_finite_gate_probability_is_an_error_line_in_strict_json(asr_best, clip, tmp_path, monkeypatch,
                                                                        capsys):
    sf.write(tmp_path / "a.wav", clip, 16000)
    width = transcribe.load_model(asr_best).moe.gate.config["input_dim"]
    # A gate input of NaN (as a clip of non-finite samples would give): the probabilities are NaN too.
    monkeypatch.setattr(transcribe, "clip_gate_rows", lambda *a, **k: torch.full((1, width), float("nan")))
    assert transcribe.main([str(asr_best), str(tmp_path / "a.wav")]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    result = strict_json(line)
    assert "non-finite probability" in result["error"] and "text" not in result
    monkeypatch.undo()
    # Decoded text that cannot be written as UTF-8 (a lone surrogate) is that file's error, not a broken stream.
    monkeypatch.setattr(transcribe, "decode_clips", lambda *a, **k: (["half \udcff"], None))
    assert transcribe.main([str(asr_best), str(tmp_path / "a.wav")]) == 1
    result = strict_json(capsys.readouterr().out)
    assert "could not be written as JSON" in result["error"] and "text" not in result
