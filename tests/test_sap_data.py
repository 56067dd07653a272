import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from workflow_scripts import sap_data
from workflow_scripts.sap_data import (
    ETIOLOGIES,
    DataError,
    DataReport,
    Utterance,
    load_audio,
    read_split,
    read_utterances,
    write_utterances,
)
from workflow_scripts.settings import default_run


def write_tone(path: Path, seconds: float = 0.5, rate: int = 16000, channels: int = 1, freq: float = 440.0):
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([tone * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else tone
    sf.write(str(path), data, rate, subtype="PCM_16")


def make_speaker(split_dir: Path, speaker: str, etiology: str, n_utts: int = 2, *, seconds: float = 0.5,
                 manifest_extra: dict | None = None) -> tuple[Path, dict]:
    """One SAP speaker folder with real 16 kHz wavs; returns (manifest path, manifest dict)."""
    folder = split_dir / speaker
    folder.mkdir(parents=True)
    files = []
    for i in range(n_utts):
        name = f"{speaker}_{i}_1_16kHz.wav"
        write_tone(folder / name, seconds=seconds, freq=300 + 50 * i)
        files.append({
            "Filename": name, "Created": "2023-01-01", "Comment": None,
            "Prompt": {"Prompt Text": f"say {i}", "Transcript": f"Say {i} (uh) [PII]",
                       "Category Description": "Digital Assistant Commands", "Sub Category Description": "x"},
            "Ratings": [{"Level": 1, "Dimension Description": "d"}],
        })
    manifest = {"Contributor ID": speaker, "Etiology": etiology, "BlockNumber": 1,
                "Survey field nobody reads": "free text", "Files": files, **(manifest_extra or {})}
    path = folder / f"{speaker}.json"
    path.write_text(json.dumps(manifest))
    return path, manifest


def make_tree(root: Path, split: str = "Train", speakers_per_etiology: int = 2, n_utts: int = 2) -> Path:
    split_dir = root / split
    for e, eti in enumerate(ETIOLOGIES):
        for s in range(speakers_per_etiology):
            make_speaker(split_dir, f"spk{e}{s}", eti, n_utts)
    return split_dir


def rewrite(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest))


def skipped(report: DataReport, split: str = "Train") -> dict[str, int]:
    return {r: v["count"] for r, v in report.to_dict()[split]["skipped"].items() if v["count"]}


def test_reads_utterance_records(tmp_path):
    make_tree(tmp_path)
    report = DataReport()
    utts = read_split(tmp_path, "Train", report)
    assert len(utts) == 20
    assert [u.id for u in utts] == sorted(u.id for u in utts)
    u = utts[0]
    assert u == Utterance(
        id="spk00_0_1_16kHz", speaker="spk00", etiology="Parkinson's Disease",
        wav=str((tmp_path / "Train/spk00/spk00_0_1_16kHz.wav").resolve()),
        transcript="Say 0 (uh) [PII]", category="Digital Assistant Commands", split="Train",
        duration_s=pytest.approx(0.5),
    )
    assert report.to_dict()["Train"]["kept"] == dict.fromkeys(ETIOLOGIES, 4)
    assert skipped(report) == {}


def test_missing_category_gives_empty_string(tmp_path):
    path, manifest = make_speaker(tmp_path / "Dev", "s1", "ALS", 1)
    del manifest["Files"][0]["Prompt"]["Category Description"]
    rewrite(path, manifest)
    assert read_split(tmp_path, "Dev", DataReport())[0].category == ""


def test_durations_come_from_headers_without_decoding(tmp_path, monkeypatch):
    make_tree(tmp_path, speakers_per_etiology=1)

    def no_decode(*args, **kwargs):
        raise AssertionError("read_split decoded audio")

    monkeypatch.setattr(sap_data.sf, "read", no_decode)
    assert len(read_split(tmp_path, "Train", DataReport())) == 10


def test_missing_split_lists_existing_splits(tmp_path):
    make_tree(tmp_path, "Train", 1, 1)
    (tmp_path / "Dev").mkdir()
    with pytest.raises(DataError, match=r"Test.*does not exist.*\['Dev', 'Train'\]"):
        read_split(tmp_path, "Test", DataReport())


def test_missing_dataset_root(tmp_path):
    with pytest.raises(DataError, match="dataset root .*nope"):
        read_split(tmp_path / "nope", "Train", DataReport())


def test_empty_split_folder(tmp_path):
    (tmp_path / "Dev").mkdir()
    with pytest.raises(DataError, match="holds no speaker folders"):
        read_split(tmp_path, "Dev", DataReport())


def test_nothing_kept_points_to_report_counts(tmp_path):
    path, manifest = make_speaker(tmp_path / "Train", "s1", "Autism", 2)
    with pytest.raises(DataError, match=r"no usable utterances.*'unknown_etiology': 1.*data report"):
        read_split(tmp_path, "Train", DataReport())


def test_speaker_folder_without_manifest(tmp_path):
    make_tree(tmp_path, speakers_per_etiology=1)
    (tmp_path / "Train/orphan").mkdir()
    report = DataReport()
    assert len(read_split(tmp_path, "Train", report)) == 10
    assert skipped(report) == {"missing_manifest": 1}


def test_malformed_json_is_skipped_and_counted(tmp_path):
    make_tree(tmp_path, speakers_per_etiology=1)
    bad, _ = make_speaker(tmp_path / "Train", "bad", "ALS")
    bad.write_text('{"Contributor ID": "bad", "Files": [')
    report = DataReport()
    assert len(read_split(tmp_path, "Train", report)) == 10
    assert skipped(report) == {"malformed_manifest": 1}
    assert report.to_dict()["Train"]["skipped"]["malformed_manifest"]["examples"] == [str(bad)]


@pytest.mark.parametrize("key", ["Contributor ID", "Etiology", "Files"])
def test_manifest_missing_required_key(tmp_path, key):
    make_tree(tmp_path, speakers_per_etiology=1)
    path, manifest = make_speaker(tmp_path / "Train", "bad", "ALS")
    del manifest[key]
    rewrite(path, manifest)
    report = DataReport()
    assert all(u.speaker != "bad" for u in read_split(tmp_path, "Train", report))
    assert skipped(report) == {"manifest_missing_keys": 1}


@pytest.mark.parametrize("breakage", ["no_filename", "no_prompt", "no_transcript", "not_a_dict"])
def test_file_entry_missing_keys(tmp_path, breakage):
    path, manifest = make_speaker(tmp_path / "Train", "s1", "ALS", 2)
    entry = manifest["Files"][1]
    if breakage == "no_filename":
        del entry["Filename"]
    elif breakage == "no_prompt":
        del entry["Prompt"]
    elif breakage == "no_transcript":
        del entry["Prompt"]["Transcript"]
    else:
        manifest["Files"][1] = "s1_1_1_16kHz.wav"
    rewrite(path, manifest)
    report = DataReport()
    assert [u.id for u in read_split(tmp_path, "Train", report)] == ["s1_0_1_16kHz"]
    assert report.to_dict()["Train"]["skipped"]["file_entry_missing_keys"] == {
        "count": 1, "examples": [f"{path}#Files[1]"]}


def test_unknown_etiology_is_skipped(tmp_path):
    make_tree(tmp_path, speakers_per_etiology=1)
    make_speaker(tmp_path / "Train", "other", "Huntington's Disease", 3)
    report = DataReport()
    utts = read_split(tmp_path, "Train", report)
    assert {u.etiology for u in utts} == set(ETIOLOGIES)
    assert skipped(report) == {"unknown_etiology": 1}


def test_etiologies_argument_restricts_accepted_values(tmp_path):
    make_tree(tmp_path, speakers_per_etiology=1)
    report = DataReport()
    utts = read_split(tmp_path, "Train", report, etiologies=("ALS", "Stroke"))
    assert {u.etiology for u in utts} == {"ALS", "Stroke"}
    assert skipped(report) == {"unknown_etiology": 3}


def test_missing_wav_counted_with_at_most_five_examples(tmp_path):
    make_speaker(tmp_path / "Train", "s1", "ALS", 8)
    for i in range(1, 8):
        (tmp_path / f"Train/s1/s1_{i}_1_16kHz.wav").unlink()
    report = DataReport()
    assert len(read_split(tmp_path, "Train", report)) == 1
    entry = report.to_dict()["Train"]["skipped"]["missing_wav"]
    assert entry["count"] == 7
    assert len(entry["examples"]) == 5
    assert entry["examples"][0] == str((tmp_path / "Train/s1/s1_1_1_16kHz.wav").resolve())


@pytest.mark.parametrize("kind", ["garbage", "zero_frames"])
def test_unreadable_wav(tmp_path, kind):
    make_speaker(tmp_path / "Train", "s1", "ALS", 2)
    bad = tmp_path / "Train/s1/s1_1_1_16kHz.wav"
    if kind == "garbage":
        bad.write_bytes(b"this is not a RIFF file at all" * 10)
    else:
        sf.write(str(bad), np.zeros(0, dtype=np.float32), 16000)
    report = DataReport()
    assert [u.id for u in read_split(tmp_path, "Train", report)] == ["s1_0_1_16kHz"]
    assert skipped(report) == {"unreadable_wav": 1}


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_transcript(tmp_path, text):
    path, manifest = make_speaker(tmp_path / "Train", "s1", "ALS", 2)
    manifest["Files"][0]["Prompt"]["Transcript"] = text
    rewrite(path, manifest)
    report = DataReport()
    assert [u.id for u in read_split(tmp_path, "Train", report)] == ["s1_1_1_16kHz"]
    assert skipped(report) == {"empty_transcript": 1}


def test_too_long_clips_are_skipped(tmp_path):
    make_speaker(tmp_path / "Train", "s1", "ALS", 1, seconds=0.5)
    write_tone(tmp_path / "Train/s1/s1_0_1_16kHz.wav", seconds=2.5)
    make_speaker(tmp_path / "Train", "s2", "ALS", 1, seconds=1.0)
    report = DataReport()
    utts = read_split(tmp_path, "Train", report, max_duration_s=2.0)
    assert [u.speaker for u in utts] == ["s2"]
    assert skipped(report) == {"too_long": 1}


def test_duplicate_ids_are_skipped(tmp_path):
    path, manifest = make_speaker(tmp_path / "Train", "s1", "ALS", 2)
    manifest["Files"].append(dict(manifest["Files"][0]))
    rewrite(path, manifest)
    report = DataReport()
    assert len(read_split(tmp_path, "Train", report)) == 2
    assert skipped(report) == {"duplicate_id": 1}


def test_other_rates_and_stereo_are_kept_and_converted(tmp_path):
    make_speaker(tmp_path / "Train", "s1", "ALS", 2)
    wav = tmp_path / "Train/s1/s1_1_1_16kHz.wav"
    write_tone(wav, seconds=0.5, rate=44100, channels=2, freq=440.0)
    report = DataReport()
    utts = read_split(tmp_path, "Train", report)
    assert len(utts) == 2 and utts[1].duration_s == pytest.approx(0.5, abs=1e-3)
    converted = report.to_dict()["Train"]["converted"]
    assert converted["resampled"] == {"count": 1, "examples": [str(wav.resolve())]}
    assert converted["downmixed"]["count"] == 1

    audio = load_audio(wav)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 8000
    # Channels hold 0.5x and 1x the tone: the mean downmix has amplitude 0.75 * 0.3, at 440 Hz.
    assert np.abs(audio[1000:7000]).max() == pytest.approx(0.225, abs=0.01)
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) * 16000 / len(audio) == pytest.approx(440, abs=4)


def test_load_audio_16k_mono_is_unchanged(tmp_path):
    wav = tmp_path / "a.wav"
    write_tone(wav, seconds=0.25)
    expected, _ = sf.read(str(wav), dtype="float32")
    np.testing.assert_array_equal(load_audio(wav), expected)


def test_load_audio_corrupt_file_names_it(tmp_path):
    wav = tmp_path / "broken.wav"
    wav.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="broken.wav"):
        load_audio(wav)


def test_report_write_layout(tmp_path):
    make_speaker(tmp_path / "Train", "s1", "ALS", 2)
    (tmp_path / "Train/s1/s1_1_1_16kHz.wav").unlink()
    report = DataReport()
    read_split(tmp_path, "Train", report)
    out = tmp_path / "results/quick/data_report.json"
    report.write(out)
    data = json.loads(out.read_text())
    assert data["Train"]["kept"] == {"ALS": 1}
    assert set(data["Train"]["skipped"]) == set(sap_data.SKIP_REASONS)
    assert data["Train"]["skipped"]["missing_wav"]["count"] == 1
    assert set(data["Train"]["converted"]) == set(sap_data.CONVERSIONS) == {"resampled", "downmixed", "over_30s",
                                                                           "kept_for_kit"}
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_report_rejects_unknown_reason():
    with pytest.raises(ValueError, match="unknown skip reason"):
        DataReport().skip("Train", "bad_vibes", "x.wav")


def test_utterance_round_trip(tmp_path):
    make_tree(tmp_path, speakers_per_etiology=1)
    utts = read_split(tmp_path, "Train", DataReport())
    assert [Utterance.from_dict(u.to_dict()) for u in utts] == utts
    path = tmp_path / "out/utts.json"
    write_utterances(path, utts)
    assert read_utterances(path) == utts


def test_read_utterances_bad_file(tmp_path):
    path = tmp_path / "utts.json"
    path.write_text('[{"id": "a"}]')
    with pytest.raises(DataError, match="lacks keys"):
        read_utterances(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="utts.json"):
        read_utterances(path)


def test_etiologies_are_the_schema_default():
    # config/schema.yaml documents the default `etiologies`; the reader's default must be the same list.
    assert default_run()["etiologies"] == list(ETIOLOGIES)
