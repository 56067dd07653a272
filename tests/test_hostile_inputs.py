"""The data stage against hostile and careless input: every case below, added to a copy of the tiny corpus, is a
counted skip under its reason (named by the file or manifest entry), none crashes or hangs the reader, nothing
outside the dataset root is read, and the rest of the corpus reads exactly as it does without them.

Reads run in a subprocess: a FIFO opened by mistake would hang it (the timeout fails the test instead), and as root
it runs without the capabilities that let root read any file, so unreadable files are unreadable there too.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import soundfile as sf
from test_workflow import CPU_PROFILE, REPO, SNAKEMAKE, TEST_RUN, write_runs

from workflow_scripts.safe_files import shown
from workflow_scripts.sap_data import SKIP_REASONS, DataError, DataReport, load_audio, read_split, read_utterances
from workflow_scripts.sap_speaker import MAX_MANIFEST_BYTES

READ = """
import sys
from workflow_scripts import sap_data
from workflow_scripts.sap_data import DataReport, read_split, write_utterances
sap_data.PARALLEL_SPEAKERS = 1  # in worker processes, as a full-size release is read
report = DataReport()
write_utterances(sys.argv[3], read_split(sys.argv[1], "Train", report))
report.write(sys.argv[2])
"""


@cache
def permissions_prefix() -> tuple[str, ...] | None:
    """A command prefix under which file permissions hold: none needed for a user; for root, setpriv dropping the
    capabilities that override them. None when root cannot drop them here."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    probe = Path(f"/tmp/.permissions_probe_{os.getpid()}")
    probe.write_text("x")
    probe.chmod(0)
    try:
        denied = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe)!r})"], capture_output=True)
    except OSError:  # no setpriv
        return None
    finally:
        probe.unlink()
    return prefix if denied.returncode != 0 and b"PermissionError" in denied.stderr else None


def tone(seconds: float = 0.5, rate: int = 16000) -> np.ndarray:
    return 0.3 * np.sin(2 * np.pi * 220 * np.arange(round(seconds * rate)) / rate)


def float_wav_with(value: float, subtype: str = "FLOAT") -> Callable[[Path], None]:
    def write(path: Path) -> None:
        audio = tone()
        audio[len(audio) // 2] = value
        sf.write(path, audio, 16000, subtype=subtype)
    return write


def zero_width_wav(path: Path) -> None:
    """A header declaring 0 bits per sample: the header parser once divided by it."""
    data = bytes(64)
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 0, 0, 0)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", len(data)) + data)


def locked_wav(path: Path) -> None:
    sf.write(path, tone(), 16000)
    path.chmod(0)


# Wavs listed in a manifest entry of their own: name -> (reason, how the file is made).
WAVS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "empty_file": ("unreadable_wav", lambda p: p.write_bytes(b"")),
    "no_frames": ("unreadable_wav", lambda p: sf.write(p, np.zeros(0), 16000)),
    "not_audio": ("unreadable_wav", lambda p: p.write_bytes(b"<html>not a wav</html>\n" * 50)),
    "zero_bit_header": ("unreadable_wav", zero_width_wav),
    "folder_named_wav": ("unreadable_wav", lambda p: p.mkdir()),
    "fifo_named_wav": ("unreadable_wav", lambda p: os.mkfifo(p)),
    "one_hz": ("unsupported_rate", lambda p: sf.write(p, np.full(2000, 0.1), 1, subtype="PCM_16")),
    "384_khz": ("unsupported_rate", lambda p: sf.write(p, tone(0.5, 384000), 384000)),
    "nan_sample": ("non_finite_audio", float_wav_with(np.nan)),
    "inf_sample": ("non_finite_audio", float_wav_with(-np.inf)),
    "digital_silence": ("silent_audio", lambda p: sf.write(p, np.zeros(8000), 16000, subtype="PCM_16")),
    "unreadable_wav": ("unreadable_wav", locked_wav),
}
PERMISSION_CASES = {"unreadable_wav", "unreadable_manifest", "unreadable_speaker_folder"}


def clone_speaker(source: Path, dest: Path, speaker: str) -> tuple[Path, dict]:
    """A copy of a speaker folder as a new speaker `speaker` (new wav names, so its ids are new) at `dest`."""
    manifest = json.loads((source / f"{source.name}.json").read_text())
    dest.mkdir()
    files = []
    for n, entry in enumerate(manifest["Files"]):
        name = f"{speaker}_{n}_1_16kHz.wav"
        shutil.copy(source / entry["Filename"], dest / name)
        files.append({**entry, "Filename": name})
    manifest = {**manifest, "Contributor ID": speaker, "Files": files}
    path = dest / f"{dest.name}.json"
    path.write_text(json.dumps(manifest))
    return path, manifest


def add_hostile_speakers(split: Path, source: Path, outside: Path, deny: bool) -> dict[str, tuple[str, str]]:
    """Speaker folders and manifests that must not be read: name -> (reason, example path in the report)."""
    cases = {}
    # A valid speaker outside the root, reached by a folder link: read, it would add its utterances.
    clone_speaker(source, outside / "OUTSPK", "OUTSPK")
    (split / "OUTSPK").symlink_to(outside / "OUTSPK")
    cases["folder_link_outside"] = ("outside_root", str(split / "OUTSPK"))
    bad_name = os.fsdecode(b"SPK\xff\xfe")  # not UTF-8: Linux allows any bytes in a name
    clone_speaker(source, split / bad_name, "BADNAME")
    cases["folder_name_not_utf8"] = ("bad_filename", shown(split / bad_name))
    manifest, _ = clone_speaker(source, split / "JSONLINK", "JSONLINK")
    manifest.rename(outside / "JSONLINK.json")
    manifest.symlink_to(outside / "JSONLINK.json")
    cases["manifest_link_outside"] = ("outside_root", str(manifest))
    deep = {"DEEP": '{"Contributor ID": "DEEP", "Etiology": "ALS", "Files": ' + "[" * 100_000 + "]" * 100_000 + "}",
            # valid JSON of 0 utterances but over the cap: parsing is refused, not attempted
            "HUGE": json.dumps({"Contributor ID": "HUGE", "Etiology": "ALS", "Files": [],
                                "pad": "x" * (MAX_MANIFEST_BYTES + 1)})}
    for name, text in deep.items():
        (split / name).mkdir()
        (split / name / f"{name}.json").write_text(text)
        cases[f"manifest_{name.lower()}"] = ("malformed_manifest", str(split / name / f"{name}.json"))
    for name, make in (("FIFOJSON", os.mkfifo), ("DIRJSON", os.mkdir)):
        (split / name).mkdir()
        make(split / name / f"{name}.json")
        cases[f"manifest_{name.lower()}"] = ("malformed_manifest", str(split / name / f"{name}.json"))
    manifest, data = clone_speaker(source, split / "SURR", "SURR")
    manifest.write_text(json.dumps({**data, "Contributor ID": "id\udcff"}))  # written as a lone \udcff escape
    cases["contributor_id_lone_surrogate"] = ("malformed_manifest", str(manifest))
    manifest, data = clone_speaker(source, split / "LATIN1", "LATIN1")
    # Latin-1, as an editor on another system might save it: the byte 0xe9 alone is not UTF-8.
    manifest.write_bytes(json.dumps({**data, "Comment": "Caf\u00e9"}).encode("ascii").replace(b"\\u00e9", b"\xe9"))
    cases["manifest_not_utf8"] = ("malformed_manifest", str(manifest))
    if deny:
        manifest, _ = clone_speaker(source, split / "LOCKED", "LOCKED")
        manifest.chmod(0)
        cases["unreadable_manifest"] = ("malformed_manifest", str(manifest))
        clone_speaker(source, split / "NOEXEC", "NOEXEC")
        (split / "NOEXEC").chmod(0)
        cases["unreadable_speaker_folder"] = ("malformed_manifest", str(split / "NOEXEC" / "NOEXEC.json"))
    return cases


def build_hostile(corpus: Path, dest: Path, deny: bool) -> dict[str, tuple[str, str]]:
    """A copy of `corpus` at `dest/corpus` with every hostile input; name -> (skip reason, example path)."""
    root = dest / "corpus"
    shutil.copytree(corpus, root)
    outside = dest / "outside"
    outside.mkdir()
    secret = outside / "secret_16kHz.wav"  # a valid wav: followed, it would be kept
    sf.write(secret, tone(), 16000)
    split = root / "Train"
    speaker, other = sorted(p for p in split.iterdir() if p.is_dir())[:2]
    manifest_path = speaker / f"{speaker.name}.json"
    manifest = json.loads(manifest_path.read_text())
    template = manifest["Files"][0]
    # Kept and counted, not skipped: one of the clean clips replaced by an 8-channel one of the same length.
    audio, rate = sf.read(speaker / template["Filename"])
    sf.write(speaker / template["Filename"], np.repeat(audio[:, None], 8, axis=1), rate, subtype="PCM_16")

    cases: dict[str, tuple[str, str]] = {}

    def entry(name: str, reason: str, filename: str, transcript: str | None = None, example: str = "") -> None:
        prompt = {**template["Prompt"], **({"Transcript": transcript} if transcript is not None else {})}
        manifest["Files"].append({**template, "Filename": filename, "Prompt": prompt})
        cases[name] = (reason, example or f"{manifest_path}#Files[{len(manifest['Files']) - 1}]")

    for n, (name, (reason, make)) in enumerate(WAVS.items()):
        if name in PERMISSION_CASES and not deny:
            continue
        filename = f"{speaker.name}_{9100 + n}_1_16kHz.wav"
        make(speaker / filename)
        entry(name, reason, filename, example=str(speaker / filename))
    link = f"{speaker.name}_9200_1_16kHz.wav"
    (speaker / link).symlink_to(secret)
    entry("wav_link_outside", "outside_root", link, example=str(speaker / link))
    other_wav = json.loads((other / f"{other.name}.json").read_text())["Files"][0]["Filename"]
    for name, filename in {"absolute_filename": str(secret), "dotdot_out_of_root": "../../../outside/" + secret.name,
                           "dotdot_into_other_speaker": f"../{other.name}/{other_wav}", "dotdot_alone": "..",
                           "windows_separators": "..\\..\\outside\\" + secret.name}.items():
        entry(name, "outside_root", filename)
    undecodable = f"{speaker.name}_\udcff_16kHz.wav"  # a lone surrogate in JSON; the file exists (byte 0xff)
    shutil.copy(speaker / template["Filename"], speaker / undecodable)
    entry("filename_not_utf8", "bad_filename", undecodable)
    entry("filename_with_nul", "bad_filename", f"{speaker.name}_\0_16kHz.wav")
    copy = f"{speaker.name}_9300_1_16kHz.wav"
    shutil.copy(speaker / template["Filename"], speaker / copy)
    entry("transcript_lone_surrogate", "bad_text", copy, transcript="turn \ud800 on")
    manifest_path.write_text(json.dumps(manifest))  # ensure_ascii: lone surrogates become \udXXX escapes
    cases.update(add_hostile_speakers(split, other, outside, deny))
    return cases


def read_hostile(root: Path, out: Path, prefix: tuple[str, ...]) -> tuple[list, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*prefix, sys.executable, "-c", READ, str(root), str(out / "report.json"),
                           str(out / "utts.json")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_utterances(out / "utts.json"), json.loads((out / "report.json").read_text(encoding="utf-8"))


class Hostile(NamedTuple):
    root: Path
    cases: dict[str, tuple[str, str]]  # name -> (skip reason, example path)
    prefix: tuple[str, ...] | None  # how to run a reader for whom permissions hold; None: not possible here

    def expected_counts(self) -> Counter:
        return Counter(reason for reason, _ in self.cases.values())


@pytest.fixture(scope="module")
def hostile(tiny_corpus, tmp_path_factory) -> Hostile:
    prefix = permissions_prefix()
    dest = tmp_path_factory.mktemp("hostile")
    return Hostile(dest / "corpus", build_hostile(tiny_corpus, dest, deny=prefix is not None), prefix)


def ids_and_durations(utts) -> list[tuple[str, float]]:
    return [(u.id, u.duration_s) for u in utts]


def test_each_hostile_input_is_counted_under_its_reason_and_the_rest_reads_as_without_them(tiny_corpus, hostile,
                                                                                         tmp_path):
    assert len(hostile.cases) >= 20
    clean_report = DataReport()
    clean = read_split(tiny_corpus, "Train", clean_report)
    assert not any(v["count"] for v in clean_report.to_dict()["Train"]["skipped"].values())

    utts, report = read_hostile(hostile.root, tmp_path, hostile.prefix or ())

    assert ids_and_durations(utts) == ids_and_durations(clean)
    skipped = report["Train"]["skipped"]
    assert set(skipped) == set(SKIP_REASONS)  # every reason listed, count 0 if none
    assert {r: v["count"] for r, v in skipped.items() if v["count"]} == hostile.expected_counts()
    for reason, entry in skipped.items():  # each example names one of this reason's hostile inputs
        assert set(entry["examples"]) <= {ex for r, ex in hostile.cases.values() if r == reason}, reason
    assert "\\xff\\xfe" in hostile.cases["folder_name_not_utf8"][1]  # shown with escapes, as JSON can hold it
    assert report["Train"]["converted"]["downmixed"]["count"] == 1  # the 8-channel clip: kept, counted


def test_unreadable_files_were_in_the_matrix(hostile):
    if hostile.prefix is None:
        pytest.skip("running as root without setpriv able to drop the read override: unreadable files untested")
    assert PERMISSION_CASES <= set(hostile.cases)


def test_links_inside_the_root_are_followed(tiny_corpus, tmp_path):
    """A speaker folder stored elsewhere in the root and a wav shared with another speaker, both links: kept."""
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    speaker = sorted(p for p in (root / "Train").iterdir() if p.is_dir())[0]
    (root / "store").mkdir()
    speaker.rename(root / "store" / speaker.name)
    speaker.symlink_to(Path("..") / "store" / speaker.name)
    other = sorted(p for p in (root / "Train").iterdir() if p.is_dir())[1]
    manifest = json.loads((other / f"{other.name}.json").read_text())
    shared = {**manifest["Files"][0], "Filename": f"{other.name}_9999_1_16kHz.wav"}
    (other / shared["Filename"]).symlink_to(speaker / json.loads(
        (speaker / f"{speaker.name}.json").read_text())["Files"][0]["Filename"])
    manifest["Files"].append(shared)
    (other / f"{other.name}.json").write_text(json.dumps(manifest))

    report = DataReport()
    utts = read_split(root, "Train", report)
    clean = read_split(tiny_corpus, "Train", DataReport())
    assert {u.id for u in utts} == {u.id for u in clean} | {f"{other.name}_9999_1_16kHz"}
    assert not any(v["count"] for v in report.to_dict()["Train"]["skipped"].values())


@pytest.mark.parametrize(("make", "message"), [
    (float_wav_with(np.nan), "NaN or infinite"),
    (float_wav_with(np.inf, "DOUBLE"), "NaN or infinite"),
    (lambda p: sf.write(p, np.full(2000, 0.1), 1, subtype="PCM_16"), "1 Hz, outside 8000-192000 Hz"),
    (lambda p: sf.write(p, tone(0.1, 384000), 384000), "384000 Hz, outside"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: p.write_bytes(b""), "cannot decode audio"),
])
def test_load_audio_refuses_what_must_not_reach_the_model_naming_the_file(tmp_path, make, message):
    """Training, eval and transcribe decode through load_audio: a file changed after the data stage, or one given
    to transcribe, is a DataError naming it, not NaN activations, a 16,000-fold resampling or a hang."""
    path = tmp_path / "clip \xe9.wav"
    make(path)
    with pytest.raises(DataError, match=message) as err:
        load_audio(path)
    assert "clip \xe9.wav" in str(err.value)


def test_data_stage_run_by_snakemake_writes_the_report_and_the_clean_lists(tiny_corpus, hostile, tmp_path):
    """The real data stage (Snakemake, the CLI, data_report.json) on the hostile tree and on the clean one: the
    same utterance lists for every later stage, the hostile inputs counted in the report."""
    write_runs(tmp_path, {"clean": {**TEST_RUN, "dataset_root": str(tiny_corpus)},
                          "hostile": {**TEST_RUN, "dataset_root": str(hostile.root)}})
    cmd = [*(hostile.prefix or ()), str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "2", "--configfile", str(tmp_path / "runs.yaml"), *CPU_PROFILE,
           "results/clean/data_report.json", "results/hostile/data_report.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results"
    for name in ("embedding", "expert", "asr_train", "asr_val", "eval"):
        clean = read_utterances(results / "clean/data" / f"{name}.json")
        assert ids_and_durations(read_utterances(results / "hostile/data" / f"{name}.json")) == \
            ids_and_durations(clean), name
    report = json.loads((results / "hostile/data_report.json").read_text(encoding="utf-8"))
    assert {r: v["count"] for r, v in report["Train"]["skipped"].items() if v["count"]} == hostile.expected_counts()
    # The report's reader sees the name that is not UTF-8, escaped (the first bad_filename: folders come first).
    assert "SPK\\xff\\xfe" in (results / "hostile/data_report.html").read_text(encoding="utf-8")


def test_a_download_with_names_that_are_not_utf8_unpacks_and_reports(tiny_corpus, tmp_path):
    """Tar member names are bytes: a speaker tar holding a folder whose name is not UTF-8, and an unsafe member
    named so, are unpacked or refused, counted, and both reports are written (the JSON once could not hold them)."""
    from test_sap_download import RELEASE, _speaker_tar, _tar_bytes

    from workflow_scripts.data import write_data_report
    from workflow_scripts.sap_download import read_unpack_report, unpack

    speaker = sorted(p for p in (tiny_corpus / "Train").iterdir() if p.is_dir())[0]
    odd = os.fsdecode(b"SPK\xff")
    odd_tar = _tar_bytes({f"{odd}/{odd}.json": (speaker / f"{speaker.name}.json").read_bytes(),
                          "../escape\udcff.txt": b"outside"})
    split = tmp_path / "DatasetDownload" / "Train"
    split.mkdir(parents=True)
    (split / f"{RELEASE}_000.tar").write_bytes(_tar_bytes({f"{speaker.name}.tar": _speaker_tar(speaker),
                                                           "odd.tar": odd_tar}))
    unpack(tmp_path / "DatasetDownload", tmp_path / "out", tmp_path / "unpack.json")
    download = read_unpack_report(tmp_path / "unpack.json")
    assert download["skipped"]["unsafe_member"]["examples"][0].endswith("odd.tar!../escape\\xff.txt")

    report = DataReport()
    utts = read_split(tmp_path / "out", "Train", report)
    assert {u.speaker for u in utts} == {json.loads((speaker / f"{speaker.name}.json").read_text())["Contributor ID"]}
    assert report.to_dict()["Train"]["skipped"]["bad_filename"]["examples"] == [str(tmp_path / "out/Train/SPK\\xff")]
    write_data_report(tmp_path / "data_report.json", report, download)
    assert json.loads((tmp_path / "data_report.json").read_text(encoding="utf-8"))["download"] == download


def test_the_kit_selection_keeps_what_the_kit_scores_and_counts_it(tiny_corpus, tmp_path):
    """Read as the challenge kit reads Dev, a silent, a NaN and a 1 Hz clip stay in (the kit scores every wav whose
    header it reads; eval gives them empty predictions), counted as kept_for_kit; the run's own selection skips
    them."""
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    speaker = sorted(p for p in (corpus / "Dev").iterdir() if p.is_dir())[0]
    manifest = json.loads((speaker / f"{speaker.name}.json").read_text())
    makers = {"silent": lambda p: sf.write(p, np.zeros(8000), 16000), "nan": float_wav_with(np.nan),
              "slow": lambda p: sf.write(p, np.full(2000, 0.1), 1, subtype="PCM_16")}
    for name, make in makers.items():
        make(speaker / f"{name}.wav")
        manifest["Files"].append({**manifest["Files"][0], "Filename": f"{name}.wav"})
    (speaker / f"{speaker.name}.json").write_text(json.dumps(manifest))
    kit_report, own_report = DataReport(), DataReport()
    kit_ids = {u.id for u in read_split(corpus, "Dev", kit_report, as_kit=True)}
    own_ids = {u.id for u in read_split(corpus, "Dev", own_report)}
    assert set(makers) <= kit_ids and not set(makers) & own_ids
    assert kit_report.to_dict()["Dev"]["converted"]["kept_for_kit"]["count"] == 3
    skipped = own_report.to_dict()["Dev"]["skipped"]
    assert [skipped[r]["count"] for r in ("silent_audio", "non_finite_audio", "unsupported_rate")] == [1, 1, 1]
