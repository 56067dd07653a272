"""The WAV header reader the data stage uses gives what soundfile.info gives, its sample checks find silence and
NaN/inf wherever they lie, and the data stage reads a large release in parallel processes into the same
utterances and report as one process does."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import soundfile as sf

from workflow_scripts import sap_data
from workflow_scripts.sap_data import DataReport, read_split
from workflow_scripts.wav_header import NON_FINITE, SILENT, read_header, sample_problem


def wav_info(path) -> tuple[int, int, int]:
    with open(path, "rb") as f:
        header = read_header(f)
    return header.frames, header.rate, header.channels


def problem_of(path) -> str:
    with open(path, "rb") as f:
        return sample_problem(f, read_header(f))


FORMATS = [(16000, 1, "PCM_16"), (8000, 2, "PCM_16"), (22050, 1, "PCM_24"), (16000, 8, "PCM_32"),
           (44100, 2, "FLOAT"), (16000, 1, "DOUBLE"), (16000, 1, "ULAW"), (16000, 1, "IMA_ADPCM")]


@pytest.mark.parametrize(("rate", "channels", "subtype"), FORMATS)
def test_header_matches_soundfile(tmp_path, rate, channels, subtype):
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros((rate // 3, channels), np.float32), rate, subtype=subtype)
    info = sf.info(str(path))
    assert wav_info(path) == (info.frames, info.samplerate, info.channels)


def test_odd_files_match_soundfile_or_raise_as_it_does(tmp_path):
    plain = tmp_path / "plain.wav"
    sf.write(plain, np.zeros(16000, np.float32), 16000)
    data = plain.read_bytes()
    # A LIST chunk before the data, an odd-sized chunk (padded), a cut-short copy, a FLAC, an extensible header.
    listed = tmp_path / "list.wav"
    extra = b"LIST" + struct.pack("<I", 5) + b"INFOx" + b"\0"
    listed.write_bytes(data[:12] + data[12:36] + extra + data[36:])
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2 + 1])
    flac = tmp_path / "a.flac"
    sf.write(flac, np.zeros(16000, np.float32), 16000, format="FLAC")
    extensible = tmp_path / "ext.wav"
    sf.write(extensible, np.zeros((16000, 3), np.float32), 16000, subtype="PCM_16")  # >2 channels: extensible
    for path in (listed, cut, flac, extensible):
        info = sf.info(str(path))
        assert wav_info(path) == (info.frames, info.samplerate, info.channels), path.name
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF" + bytes(300))
    with pytest.raises(RuntimeError):
        sf.info(str(garbage))
    with pytest.raises(RuntimeError):
        wav_info(garbage)


def test_parallel_reading_gives_the_same_utterances_and_report(tiny_corpus, tmp_path, monkeypatch):
    """Speakers read in processes (as for SAP's 833) against one process: same utterances, same report,
    duplicates across speakers decided in speaker order."""
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    first, second = sorted(p for p in (corpus / "Train").iterdir() if p.is_dir())[:2]
    manifest = json.loads((second / f"{second.name}.json").read_text())
    own = json.loads((first / f"{first.name}.json").read_text())["Files"][0]
    shutil.copy(first / own["Filename"], second / own["Filename"])
    manifest["Files"].append(own)  # the first speaker's utterance id again: a duplicate_id in the second
    (second / f"{second.name}.json").write_text(json.dumps(manifest))
    (corpus / "Train" / "broken").mkdir()  # a speaker folder without its manifest
    reports, results = [], []
    for threshold in (10**9, 1):
        monkeypatch.setattr(sap_data, "PARALLEL_SPEAKERS", threshold)
        report = DataReport()
        results.append(read_split(corpus, "Train", report))
        reports.append(report.to_dict())
    assert results[0] == results[1] and reports[0] == reports[1]
    assert reports[0]["Train"]["skipped"]["duplicate_id"]["count"] == 1
    assert reports[0]["Train"]["skipped"]["missing_manifest"]["count"] == 1


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_silence_is_found_and_one_late_sample_is_not_silence(tmp_path, subtype):
    """Digital silence in every sample width (8-bit WAV is unsigned: its zero is 0x80); a single non-zero sample
    10 s in, far past the first block read, makes the clip not silent."""
    path = tmp_path / "a.wav"
    audio = np.zeros((16000 * 12, 2), np.float32)
    sf.write(path, audio, 16000, subtype=subtype)
    assert problem_of(path) == SILENT
    audio[16000 * 10, 1] = 0.5
    sf.write(path, audio, 16000, subtype=subtype)
    assert problem_of(path) == ""


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_found_anywhere(tmp_path, subtype, bad):
    path = tmp_path / "a.wav"
    audio = 0.1 * np.sin(np.arange(16000 * 3) / 5.0)
    audio[-1] = bad  # the last sample: the whole clip must be read
    sf.write(path, audio, 16000, subtype=subtype)
    assert problem_of(path) == NON_FINITE


def test_other_formats_are_checked_by_decoding(tmp_path):
    flac = tmp_path / "a.flac"
    sf.write(flac, np.zeros(8000, np.float32), 16000, format="FLAC")
    assert problem_of(flac) == SILENT
    sf.write(flac, np.full(8000, 0.25, np.float32), 16000, format="FLAC")
    assert problem_of(flac) == ""


@pytest.mark.parametrize(("bits", "channels"), [(0, 1), (16, 2000)])
def test_headers_libsndfile_refuses_are_not_parsed_here(tmp_path, bits, channels):
    """A sample width of 0 once divided by zero here; widths and channel counts libsndfile refuses go to it
    and raise as it does."""
    align = channels * bits // 8
    data = bytes(max(align, 2) * 10)
    fmt = struct.pack("<HHIIHH", 1, channels, 16000, 16000 * align, align, bits)
    path = tmp_path / "odd.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", len(data)) + data)
    with pytest.raises(RuntimeError):
        sf.info(str(path))
    with pytest.raises(RuntimeError):
        wav_info(path)
