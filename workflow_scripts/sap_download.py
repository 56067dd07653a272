"""The SAP corpus as it arrives: find the folder that holds the split folders, and unpack a download.

``dataset_root`` may be any of three layouts (the kit is xiuwenz2/SAPC-template; files named below):

(a) Speaker folders, as :mod:`workflow_scripts.sap_data` reads them::

        <root>/<Split>/<speaker>/<speaker>.json + <speaker>_<n1>_<n2>_16kHz.wav

(b) The kit's data root after its preprocessing (``preprocess.sh`` runs ``steps/preprocess/unzip.sh``, then
    ``steps/preprocess/preprocess.sh``)::

        <root>/raw/<Split>/<speaker>/...        unzip.sh: per-speaker tars unpacked, wavs as recorded
        <root>/processed/<Split>/<speaker>/...  preprocess.sh stage 1 (utils/resample.py: 16 kHz wavs) and
                                                stage 2 (JSONs copied from raw/, same <speaker>/ folders);
                                                utils/manifest.py reads processed/<Split>/<speaker>/*.json
        <root>/manifest/<Split>.csv             utils/manifest.py's kit manifest (not read here)

    ``processed/`` wins over ``raw/`` (it is what the kit scores); both are layout (a) one level down.

(c) The download itself, as the kit's ``unzip.sh`` expects it (``<root>/DatasetDownload`` or that folder)::

        DatasetDownload/<Split>/SpeechAccessibility_<release>_000.tar ...   each holds <speaker>.tar files
        DatasetDownload/<Split>/SpeechAccessibility_<release>_<Split>_Only_Json.tar   speaker JSONs

    A ``<speaker>.tar`` holds ``<speaker>/<speaker>.json`` and the wavs. ``unzip.sh`` unpacks the outer tars
    into ``raw/<Split>/`` (skipping ``*Json.tar``), then each speaker tar there, giving layout (b).

:func:`unpack` turns (c) into (a): speaker tar by speaker tar, each into a temp folder beside its target
and renamed into place, then a marker (under ``<out>/.unpack/``), so a rerun after a kill redoes only the
unfinished tar. Members must be plain files or folders inside the target (tarfile's ``data`` filter as well,
where the Python has it); anything else is skipped and counted. A truncated or corrupt tar is a counted
skip naming it, never a crash; the JSON tar only fills in a manifest that a speaker tar lacked. Into a new
``--out`` the work goes to ``<out>.partial`` (outside the folder Snakemake deletes before a rerun), renamed
to ``<out>`` when every tar was tried; an existing ``<out>`` is topped up in place.

    python -m workflow_scripts.sap_download --download DatasetDownload --out data/sap --report unpack.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from tqdm import tqdm

from workflow_scripts.atomic import write_bytes, write_json
from workflow_scripts.safe_files import shown
from workflow_scripts.sap_data import DataError

log = logging.getLogger("sap_download")

SPEAKERS, DOWNLOAD = "speakers", "download"
KIT_UNPACKED = ("processed", "raw")  # preference order: processed/ is what the kit scores
KIT_DOWNLOAD = "DatasetDownload"
STATE = ".unpack"  # markers, inside the unpacked tree so they vanish with it
SKIP_REASONS = ("truncated_tar", "corrupt_tar", "unsafe_member", "unexpected_member")
MAX_EXAMPLES = 5
# Speaker folders sampled when telling layouts apart: enough to step over a broken speaker, few enough
# that the check at every Snakemake start stays a handful of directory reads.
PROBE = 5
# ReadError messages of an archive that ends early (a cut-off download); any other ReadError is corruption.
TRUNCATION_HINTS = ("unexpected end of data", "truncated header", "empty file", "end-of-archive")
# Mode bits and ownership cleaned by tarfile's own filter where the Python has it (3.11.4+, 3.10.12+).
TAR_FILTER = "data" if hasattr(tarfile, "data_filter") else None


@dataclass(frozen=True)
class Layout:
    kind: str  # SPEAKERS (layouts a and b) or DOWNLOAD (layout c)
    path: Path  # the folder holding the split folders


def _dirs(folder: Path) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            yield from (e for e in entries if not e.name.startswith(".") and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return


def _speaker_tree(folder: Path) -> int:
    """2: a split folder holds a speaker folder with its manifest; 1: split folders hold folders; 0: neither."""
    score = 0
    for split in _dirs(folder):
        for n, speaker in enumerate(_dirs(Path(split.path))):
            if os.path.isfile(os.path.join(speaker.path, f"{speaker.name}.json")):
                return 2
            score = 1
            if n + 1 >= PROBE:
                break
    return score


def _is_download(folder: Path) -> bool:
    for split in _dirs(folder):
        with os.scandir(split.path) as entries:
            if any(e.name.endswith(".tar") and e.is_file() for e in entries):
                return True
    return False


def locate(root: str | os.PathLike) -> Layout:
    """Which layout ``root`` is (module docstring) and the folder holding its split folders.

    A few directory reads, no tar is opened: Snakemake calls this at every start. Speaker folders with a
    manifest win; then a download; then folders of folders without manifests (read_split counts those)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset_root {root} does not exist or is not a folder; set it to the SAP data "
                        f"(speaker folders, the kit's raw/ or processed/, or the download with <Split>/*.tar)")
    candidates = [root / name for name in KIT_UNPACKED] + [root]
    scores = {c: _speaker_tree(c) for c in candidates}
    for folder in candidates:
        if scores[folder] == 2:
            return Layout(SPEAKERS, folder)
    for folder in (root, root / KIT_DOWNLOAD):
        if _is_download(folder):
            return Layout(DOWNLOAD, folder)
    for folder in candidates:
        if scores[folder] == 1:
            return Layout(SPEAKERS, folder)
    found = sorted(shown(e.name) + ("/" if e.is_dir() else "") for e in os.scandir(root))
    listing = ", ".join(found[:12]) + (f" ... ({len(found)} entries)" if len(found) > 12 else "")
    raise DataError(
        f"dataset_root {root} matches no SAP layout (found: {listing or 'an empty folder'}). Expected one of: "
        f"<Split>/<speaker>/<speaker>.json + wavs; the kit's raw/<Split>/... or processed/<Split>/...; "
        f"the download, <Split>/*.tar (also as {KIT_DOWNLOAD}/<Split>/*.tar). Point dataset_root at one of these")


def download_name(download: str | os.PathLike) -> str:
    """A folder name for the unpacked copy of a download: its name plus a hash of its absolute path, so two
    downloads never share a copy and every run on one download does."""
    path = os.path.abspath(download)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(path)).strip("._") or "download"
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


class UnpackReport:
    """What :func:`unpack` did, as written to --report and merged into data_report.json under "download"."""

    def __init__(self, download: Path, out: Path) -> None:
        self.data: dict[str, Any] = {
            "download": shown(download),
            "unpacked_to": shown(out),
            "archives": 0,
            "tars": {"unpacked": 0, "already_unpacked": 0},
            "manifests_from_json_tar": 0,
            "skipped": {r: {"count": 0, "examples": []} for r in SKIP_REASONS},
            "speakers": {},
        }

    def skip(self, reason: str, path: str, detail: str = "") -> None:
        # A member name that is not UTF-8 (tar allows any bytes) must not break data_report.json.
        path, detail = shown(path), shown(detail)
        entry = self.data["skipped"][reason]
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(path)
            log.warning("skipped %s (%s)%s", path, reason, f": {detail}" if detail else "")

    def summary(self) -> str:
        """Skips per reason with the first example, for an error message (a failed job's report is deleted)."""
        return "; ".join(f"{reason} {v['count']} (e.g. {v['examples'][0]})"
                         for reason, v in self.data["skipped"].items() if v["count"]) or "nothing"


def read_unpack_report(path: str | os.PathLike) -> dict[str, Any]:
    """The report :func:`unpack` wrote, for data_report.json."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the unpack report {path}: {e}; rerun the unpack "
                        f"(snakemake --forcerun unpack_download, or python -m workflow_scripts.sap_download)") from e


def _read_error(err: BaseException) -> str:
    return "truncated_tar" if any(h in str(err) for h in TRUNCATION_HINTS) else "corrupt_tar"


def _list_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, reading headers only; raises ReadError, with the members read so far in
    ``err.members``, when the archive is cut off or damaged (no zero block where it should end)."""
    members: list[tarfile.TarInfo] = []
    try:
        members.extend(tar)
        tar.fileobj.seek(tar.offset)
        if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
            raise tarfile.ReadError("no end-of-archive marker: the file is cut off or damaged")
    except (tarfile.ReadError, EOFError) as e:
        err = tarfile.ReadError(str(e))
        err.members = members  # type: ignore[attr-defined]
        raise err from e
    return members


def _unsafe(member: tarfile.TarInfo, dest: Path) -> str:
    """Why a member may not be written into ``dest`` ('' if it may): speaker tars hold plain files and
    folders only, and tarfile's own filter must accept it too."""
    if not (member.isfile() or member.isdir()):
        return "a link or special file"
    if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
        return "its path leaves the target folder"
    if TAR_FILTER:
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as e:
            return str(e)
    return ""


def _marker(work: Path, split: str, *names: str) -> Path:
    *parents, name = (n.replace("/", "%2F") for n in names)
    return work.joinpath(STATE, split, *parents, f"{name}.done.json")


def _clean_stale(split_out: Path) -> None:
    """Temp folders of a tar that was being unpacked when the previous run was killed."""
    for entry in split_out.iterdir():
        if entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")) and entry.is_dir():
            shutil.rmtree(entry)


def _place(tmp: Path, split_out: Path, stem: str) -> list[str]:
    """Move an unpacked speaker tar into place: its top folder(s) as speaker folders, or, for a tar of
    loose files, the temp folder itself named after the tar. An older copy is moved aside, then removed."""
    entries = list(tmp.iterdir())
    moves = [(e, split_out / e.name) for e in entries] if entries and all(e.is_dir() for e in entries) \
        else [(tmp, split_out / stem)]
    for src, dst in moves:
        old = dst.with_name(f".{dst.name}.old")
        if dst.exists():
            os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    return sorted(dst.name for _, dst in moves)


def _unpack_speaker_tar(fileobj: IO[bytes], where: str, split_out: Path, stem: str,
                        report: UnpackReport) -> tuple[list[str], list[list[str]]]:
    """One speaker tar into ``split_out``: (speaker folders placed, member skips as [reason, path])."""
    skipped = []
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".tmp", dir=split_out))
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            safe = []
            for member in _list_members(tar):
                why = _unsafe(member, tmp)
                if why:
                    skipped.append(["unsafe_member", f"{where}!{member.name}"])
                    report.skip("unsafe_member", f"{where}!{member.name}", why)
                else:
                    safe.append(member)
            tar.extractall(tmp, members=safe, **({"filter": TAR_FILTER} if TAR_FILTER else {}))
        return _place(tmp, split_out, stem), skipped
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore_skips(report: UnpackReport, marker: dict) -> None:
    """Skips recorded by an earlier run, so the report describes the tree, not just this run."""
    for reason, path in marker.get("skipped", []):
        report.skip(reason, path)


def _unpack_archive(path: Path, split: str, work: Path, report: UnpackReport, bar: tqdm) -> None:
    """One outer tar: each speaker tar in it that has no marker yet, then the archive's own marker."""
    with tarfile.open(path, mode="r:") as outer:
        truncated = None
        try:
            members = _list_members(outer)
        except tarfile.ReadError as e:
            members, truncated = e.members, e  # type: ignore[attr-defined]
        inner = [m for m in members if m.isfile() and m.name.endswith(".tar")]
        bar.total += len(inner)
        bar.refresh()
        skipped, unpacked = [], 0
        for m in members:
            if m.isfile() and not m.name.endswith(".tar"):
                skipped.append(["unexpected_member", f"{path}!{m.name}"])
                report.skip("unexpected_member", f"{path}!{m.name}", "not a speaker .tar")
        for member in inner:
            where, done = f"{path}!{member.name}", _marker(work, split, path.name, member.name)
            if done.is_file():
                marker = json.loads(done.read_text())
                _restore_skips(report, marker)
                report.data["tars"]["already_unpacked"] += 1
            else:
                try:
                    speakers, member_skips = _unpack_speaker_tar(outer.extractfile(member), where, work / split,
                                                                 PurePosixPath(member.name).stem, report)
                except (tarfile.ReadError, EOFError) as e:
                    # Counted in the archive's marker too: the same file fails the same way next time.
                    skipped.append([_read_error(e), where])
                    report.skip(_read_error(e), where, str(e))
                    bar.update()
                    continue
                # A machine crash must not leave a marker for files still only in memory; one flush per
                # speaker tar (not an fsync per wav) keeps that cheap.
                os.sync()
                marker = {"speakers": speakers, "skipped": member_skips}
                write_json(done, marker)
                report.data["tars"]["unpacked"] += 1
            skipped += marker["skipped"]
            unpacked += 1
            bar.update()
    if truncated is not None:
        report.skip(_read_error(truncated), str(path), str(truncated))
        return  # no marker: a re-downloaded, complete file is read again
    write_json(_marker(work, split, path.name), {"tars": unpacked, "total": len(inner), "skipped": skipped})


def _fill_manifests(path: Path, split: str, work: Path) -> int:
    """The JSON tar: a speaker folder that came without its manifest gets the one from here; how many did."""
    split_out = work / split
    filled = 0
    with tarfile.open(path, mode="r:") as tar:
        for member in _list_members(tar):
            name = PurePosixPath(member.name)
            speaker_dir = split_out / name.stem
            if (member.isfile() and name.suffix == ".json" and not name.stem.startswith(".")
                    and speaker_dir.is_dir() and not (speaker_dir / name.name).exists()):
                write_bytes(speaker_dir / name.name, tar.extractfile(member).read())
                filled += 1
    write_json(_marker(work, split, path.name), {"filled": filled})
    return filled


def _archives(download: Path) -> dict[str, tuple[list[Path], list[Path]]]:
    """Per split folder: (speaker archives, JSON archives), sorted by name."""
    out = {}
    for split in sorted(_dirs(download), key=lambda e: e.name):
        tars = sorted(p for p in Path(split.path).glob("*.tar") if p.is_file())
        if tars:
            json_tars = [p for p in tars if p.name.lower().endswith("json.tar")]
            out[split.name] = ([p for p in tars if p not in json_tars], json_tars)
    return out


def unpack(download: str | os.PathLike, out_dir: str | os.PathLike, report_path: str | os.PathLike) -> dict[str, Any]:
    """Unpack a SAP download (layout c) into ``out_dir/<Split>/<speaker>/`` and write the report (also when
    this fails part-way); returns it. Raises DataError when ``download`` is no download or no speaker came out."""
    layout = locate(download)
    if layout.kind != DOWNLOAD:
        raise DataError(f"{download} holds speaker folders already ({layout.path}); use it as dataset_root "
                        f"directly, there is nothing to unpack")
    download, out_dir = layout.path.resolve(), Path(out_dir).resolve()
    work = out_dir if out_dir.is_dir() else out_dir.with_name(out_dir.name + ".partial")
    report = UnpackReport(download, out_dir)
    archives = _archives(download)
    try:
        with tqdm(total=0, unit="tar", desc="speaker tars", mininterval=5) as bar:
            for split, (speaker_tars, json_tars) in archives.items():
                (work / split).mkdir(parents=True, exist_ok=True)
                _clean_stale(work / split)
                for path in speaker_tars + json_tars:
                    _unpack_once(path, split, work, report, bar, is_json=path in json_tars)
        for split in archives:
            report.data["speakers"][split] = sum(1 for _ in _dirs(work / split))
        if not sum(report.data["speakers"].values()):
            raise DataError(f"no speaker could be unpacked from {download} (skipped: {report.summary()}); "
                            f"re-download the tars named there")
        if work != out_dir:
            os.replace(work, out_dir)
    finally:
        write_json(report_path, report.data)
    return report.data


def _unpack_once(path: Path, split: str, work: Path, report: UnpackReport, bar: tqdm, is_json: bool) -> None:
    """One archive of the download, unless its marker says an earlier run finished it."""
    report.data["archives"] += 1
    marker = _marker(work, split, path.name)
    if marker.is_file():
        done = json.loads(marker.read_text())
        bar.total += done.get("total", 0)
        bar.update(done.get("total", 0))
        report.data["tars"]["already_unpacked"] += done.get("tars", 0)
        report.data["manifests_from_json_tar"] += done.get("filled", 0)
        _restore_skips(report, done)
        return
    try:
        if is_json:
            report.data["manifests_from_json_tar"] += _fill_manifests(path, split, work)
        else:
            _unpack_archive(path, split, work, report, bar)
    except (tarfile.ReadError, EOFError) as e:
        report.skip(_read_error(e), str(path), str(e))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download", type=Path, required=True, help="DatasetDownload (or the folder above it)")
    parser.add_argument("--out", type=Path, required=True, help="folder for <Split>/<speaker>/; topped up if it exists")
    parser.add_argument("--report", type=Path, required=True, help="JSON: tars unpacked, skipped, speakers per split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = unpack(args.download, args.out, args.report)
    log.info("unpacked %d speaker tars (%d already), %d skipped; speakers per split %s", report["tars"]["unpacked"],
             report["tars"]["already_unpacked"], sum(v["count"] for v in report["skipped"].values()),
             report["speakers"])


if __name__ == "__main__":
    main()
