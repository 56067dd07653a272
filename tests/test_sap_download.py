"""The SAP corpus as it arrives: layout detection, unpacking a download (resumable, safe, counted skips),
and a real Snakemake run whose dataset_root is the download."""

from __future__ import annotations

import filecmp
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from test_workflow import CPU_PROFILE, TEST_RUN, planned_jobs, snakemake, write_runs

from workflow_scripts.sap_data import DataError
from workflow_scripts.sap_download import DOWNLOAD, SPEAKERS, Layout, download_name, locate, unpack

RELEASE = "SpeechAccessibility_2099-01-01"
CUT_SPEAKER = "cut-speaker"


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _speaker_tar(speaker: Path, with_manifest: bool = True, extra: dict[str, bytes] | None = None) -> bytes:
    files = {f"{speaker.name}/{p.name}": p.read_bytes() for p in sorted(speaker.iterdir())
             if with_manifest or p.suffix != ".json"}
    return _tar_bytes({**files, **(extra or {})})


def make_download(corpus: Path, root: Path) -> Path:
    """The kit's DatasetDownload from the tiny corpus: per split, outer tars of per-speaker tars and a JSON tar.
    Also: Train's first speaker tar carries a `../` member, Dev's first speaker tar lacks its manifest (the JSON
    tar has it), and Train holds an outer tar cut off inside its one speaker tar."""
    download = root / "DatasetDownload"
    for split in ("Train", "Dev"):
        (download / split).mkdir(parents=True)
        speakers = sorted(p for p in (corpus / split).iterdir() if p.is_dir())
        halves = (speakers[: len(speakers) // 2], speakers[len(speakers) // 2:]) if split == "Train" else (speakers,)
        for n, group in enumerate(halves):
            inner = {}
            for i, speaker in enumerate(group):
                evil = {"../evil.txt": b"outside"} if split == "Train" and n == i == 0 else None
                inner[f"{speaker.name}.tar"] = _speaker_tar(speaker, with_manifest=split == "Train" or i > 0,
                                                            extra=evil)
            (download / split / f"{RELEASE}_{n:03d}.tar").write_bytes(_tar_bytes(inner))
        manifests = {f"{RELEASE}_{split}_Only_Json/{s.name}.json": (s / f"{s.name}.json").read_bytes()
                     for s in speakers}
        (download / split / f"{RELEASE}_{split}_Only_Json.tar").write_bytes(_tar_bytes(manifests))
    cut = _tar_bytes({f"{CUT_SPEAKER}.tar": _tar_bytes({f"{CUT_SPEAKER}/{CUT_SPEAKER}.json": b"{}",
                                                          f"{CUT_SPEAKER}/{CUT_SPEAKER}_1_1_16kHz.wav": bytes(20000)})})
    (download / "Train" / f"{RELEASE}_009.tar").write_bytes(cut[: len(cut) // 2])
    return download


@pytest.fixture(scope="module")
def download(tiny_corpus, tmp_path_factory) -> Path:
    return make_download(tiny_corpus, tmp_path_factory.mktemp("sap"))


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    if filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)[1:] != ([], []):
        return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def speaker_trees(root: Path) -> dict[str, list[str]]:
    return {split: sorted(p.name for p in (root / split).iterdir() if p.is_dir()) for split in ("Train", "Dev")}


@pytest.fixture(scope="module")
def unpacked(download, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("unpacked") / "sap"
    return out, unpack(download, out, out.parent / "report.json")


def test_unpack_gives_the_speaker_tree_of_the_source(tiny_corpus, unpacked):
    out, report = unpacked
    assert speaker_trees(out) == speaker_trees(tiny_corpus)
    for split, speakers in speaker_trees(tiny_corpus).items():
        for speaker in speakers:
            assert same_tree(tiny_corpus / split / speaker, out / split / speaker), (split, speaker)
    assert report["speakers"] == {split: len(s) for split, s in speaker_trees(tiny_corpus).items()}
    assert report["tars"] == {"unpacked": sum(report["speakers"].values()), "already_unpacked": 0}
    # Dev's first speaker tar came without its manifest: the JSON tar filled it in.
    assert report["manifests_from_json_tar"] == 1
    assert not out.with_name("sap.partial").exists()
    assert json.loads((out.parent / "report.json").read_text()) == report


def test_truncated_tar_is_a_counted_skip_naming_it(download, unpacked):
    out, report = unpacked
    truncated = report["skipped"]["truncated_tar"]
    cut = str(download.resolve() / "Train" / f"{RELEASE}_009.tar")
    assert truncated["count"] == 2  # the speaker tar that the cut runs through, and the archive itself
    assert set(truncated["examples"]) == {cut, f"{cut}!{CUT_SPEAKER}.tar"}
    assert not (out / "Train" / CUT_SPEAKER).exists()
    assert report["skipped"]["corrupt_tar"]["count"] == 0


def test_member_leaving_the_target_is_skipped_and_not_written(download, unpacked):
    out, report = unpacked
    unsafe = report["skipped"]["unsafe_member"]
    assert unsafe["count"] == 1 and unsafe["examples"][0].endswith("!../evil.txt")
    assert not list(out.parent.rglob("evil.txt"))


def test_second_unpack_does_nothing_but_retry_the_truncated_tar(download, unpacked, tmp_path):
    out, first = unpacked
    inodes = {p: p.stat().st_ino for p in out.rglob("*.wav")}
    again = unpack(download, out, tmp_path / "report.json")
    assert again["tars"] == {"unpacked": 0, "already_unpacked": first["tars"]["unpacked"]}
    # The report describes the tree, not just this run: skips found earlier are still listed.
    assert {k: v for k, v in again.items() if k != "tars"} == {k: v for k, v in first.items() if k != "tars"}
    assert {p: p.stat().st_ino for p in out.rglob("*.wav")} == inodes


def test_kill_mid_tar_redoes_only_that_tar(tiny_corpus, download, tmp_path):
    out = tmp_path / "sap"
    unpack(download, out, tmp_path / "first.json")
    speakers = speaker_trees(out)["Train"]
    victim, bystander = speakers[0], speakers[1]  # both in the first archive
    # As a kill inside the victim's tar leaves it: its temp folder half full, no marker for it or its archive,
    # and (from an earlier, interrupted placement) a speaker folder missing files.
    state = out / ".unpack" / "Train"
    (state / f"{RELEASE}_000.tar" / f"{victim}.tar.done.json").unlink()
    (state / f"{RELEASE}_000.tar.done.json").unlink()
    stale = out / "Train" / f".{victim}.x1y2.tmp"
    (stale / victim).mkdir(parents=True)
    next((out / "Train" / victim).glob("*.wav")).unlink()
    bystander_inodes = {p: p.stat().st_ino for p in (out / "Train" / bystander).iterdir()}

    report = unpack(download, out, tmp_path / "second.json")
    assert report["tars"]["unpacked"] == 1
    assert same_tree(tiny_corpus / "Train" / victim, out / "Train" / victim)
    assert not stale.exists()
    assert {p: p.stat().st_ino for p in (out / "Train" / bystander).iterdir()} == bystander_inodes


def test_download_with_nothing_usable_is_an_error_naming_the_tars(download, tmp_path):
    cut = tmp_path / "dl" / "Train"
    cut.mkdir(parents=True)
    shutil.copy(download / "Train" / f"{RELEASE}_009.tar", cut)
    with pytest.raises(DataError, match=rf"no speaker could be unpacked.*truncated_tar 2 \(e\.g\. \S*{RELEASE}_009"):
        unpack(cut.parent, tmp_path / "out", tmp_path / "report.json")
    assert not (tmp_path / "out").exists()  # nothing that looks like a finished unpack


def test_layouts_are_told_apart(tiny_corpus, download, tmp_path):
    assert locate(tiny_corpus) == Layout(SPEAKERS, tiny_corpus)
    assert locate(download) == Layout(DOWNLOAD, download)
    # The kit's data root: DatasetDownload/ beside an empty raw/ (unzip.sh makes it first) is still a download ...
    kit = download.parent
    (kit / "raw").mkdir(exist_ok=True)
    assert locate(kit) == Layout(DOWNLOAD, download)
    # ... raw/<Split>/<speaker>/ once unpacked, and processed/ (16 kHz, what the kit scores) over raw/.
    shutil.copytree(tiny_corpus / "Dev", kit / "raw" / "Dev")
    assert locate(kit) == Layout(SPEAKERS, kit / "raw")
    shutil.copytree(tiny_corpus / "Dev", kit / "processed" / "Dev")
    assert locate(kit) == Layout(SPEAKERS, kit / "processed")
    shutil.rmtree(kit / "raw"), shutil.rmtree(kit / "processed")


def test_no_layout_is_an_error_naming_what_was_found_and_expected(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "readme.txt").write_text("")
    with pytest.raises(DataError, match=r"(?s)notes/, readme\.txt.*<Split>/<speaker>/<speaker>\.json.*\*\.tar"):
        locate(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        locate(tmp_path / "missing")


def test_snakemake_reads_the_download_through_its_unpacked_copy(tiny_corpus, download, tmp_path):
    write_runs(tmp_path, {"dl": {**TEST_RUN, "dataset_root": str(download.parent)}})
    snakemake(tmp_path, *CPU_PROFILE, "results/dl/data_report.json")
    report = json.loads((tmp_path / "results/dl/data_report.json").read_text())
    unpacked = f"results/_datasets/{download_name(download)}/dataset"
    assert report["download"]["tars"]["unpacked"] == 20 and report["download"]["speakers"] == {"Train": 15, "Dev": 5}
    assert report["download"]["skipped"]["truncated_tar"]["count"] == 2
    # The data stage read the unpacked tree: every utterance of the tiny corpus, from there.
    kept = {split: sum(report[split]["kept"].values()) for split in ("Train", "Dev")}
    assert kept == {split: len(list((tiny_corpus / split).rglob("*.wav"))) for split in ("Train", "Dev")}
    wavs = [u["wav"] for u in json.loads((tmp_path / "results/dl/data/asr_train.json").read_text())]
    assert wavs and all(w.startswith(str(tmp_path / unpacked)) for w in wavs)
    assert planned_jobs(snakemake(tmp_path, *CPU_PROFILE, "-n", "results/dl/data_report.json")) == {}
