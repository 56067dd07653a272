"""How long reading the manifests of a full-size SAP Train split takes (`workflow_scripts.sap_data.read_split`).

Generates, once, an SAP-format tree at the real corpus's scale: 833 speakers x 385 utterances (~320k, the
real Train split), each speaker's JSON with the survey fields, prompts and a share of ratings, each wav a
valid 0.1 s 16 kHz tone (3.2 kB, so the tree is ~1.3 GB on disk with 4 kB blocks; a tone, not zeros, which
read_split now skips as digital silence). Cached under results/_bench/ (git-ignored) and reused, rebuilt when
its clips are not these; built in a temp folder and renamed, so a killed build is redone.

Then times, interleaved over --repeats rounds, every other one in reverse order (median and range of wall time):
- read_split: as it is (speakers over processes, WAV headers parsed by workflow_scripts/wav_header.py, each
  clip checked for NaN/inf and digital silence by reading up to its first non-zero sample);
- headers_only: the same without the sample checks (what those checks cost);
- full_decode: the sample checks by decoding every clip with soundfile (the alternative to the scan);
- before: read_split in one process with a `soundfile.info` (libsndfile) per wav and no sample checks.
All must return exactly the same utterances. With --cold (root only) the page cache is dropped before each
timing, as on a first read of a real corpus; otherwise the files are cached.

    .venv/bin/python bench/read_manifests.py [--root results/_bench/sap_833] [--repeats 3] [--cold]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from workflow_scripts import sap_data, sap_speaker
from workflow_scripts.sap_data import ETIOLOGIES, SAMPLE_RATE, DataReport, read_split
from workflow_scripts.wav_header import NON_FINITE, SILENT, WavHeader

SPEAKERS, PER_SPEAKER = 833, 385
CLIP_S = 0.1
# Real Train speakers per etiology (DESIGN.md: Parkinson's 129k, ALS 85k, CP 59k, DS 29k, Stroke 18k
# utterances), as shares of the 833 speakers.
SHARES = (0.40, 0.27, 0.18, 0.09, 0.06)
DONE = ".complete"
TREE = {"speakers": SPEAKERS, "per_speaker": PER_SPEAKER, "clip": "tone"}  # what DONE records of a usable tree


def wav_bytes(seconds: float = CLIP_S) -> bytes:
    frames = round(seconds * SAMPLE_RATE)
    data = np.round(3000 * np.sin(2 * np.pi * 440 * np.arange(frames) / SAMPLE_RATE)).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


def speaker_manifest(speaker: str, etiology: str, n: int) -> dict:
    files = []
    for i in range(n):
        entry = {
            "Filename": f"{speaker}_{1000 + i}_{i % 7}_16kHz.wav",
            "Created": "2023-07-13 18:15:53", "CreatedOrModified": "2023-07-16 15:46:08", "Comment": "",
            "Prompt": {"Prompt Text": f"Set a timer for {i} minutes.", "Transcript": f"Set a timer for {i} minutes.",
                       "Category Description": "Digital Assistant Commands",
                       "Sub Category Description": "Everyday Tasks and Planning"},
        }
        if i % 10 == 0:  # a share of files carries clinician ratings, as in the release
            entry["Ratings"] = [{"Level": "2", "Comment": "", "Dimension Description": d,
                                 "Dimension Category Description": etiology, "RatingDate": "2023-10-03 09:08:11"}
                                for d in ("Intelligibility", "Naturalness", "Monopitch", "Imprecise consonants")]
        files.append(entry)
    return {"Contributor ID": speaker, "Do you consider U.S. English to be your first language": "Yes",
            "What language(s) do you speak": "No Response Supplied", "Etiology": etiology, "BlockNumber": 5,
            "Files": files}


def _write_speaker(args: tuple[Path, int]) -> None:
    split_dir, index = args
    bounds = [round(SPEAKERS * sum(SHARES[: k + 1])) for k in range(len(SHARES))]
    etiology = ETIOLOGIES[next(k for k, b in enumerate(bounds) if index < b)]
    speaker = f"{index:08x}-0000-4000-8000-{index:012x}"
    folder = split_dir / speaker
    folder.mkdir()
    manifest = speaker_manifest(speaker, etiology, PER_SPEAKER)
    (folder / f"{speaker}.json").write_text(json.dumps(manifest, indent=2))
    audio = wav_bytes()
    for entry in manifest["Files"]:
        (folder / entry["Filename"]).write_bytes(audio)


def build(root: Path, jobs: int) -> None:
    """The tree at `root` (Train only), unless a complete one is there."""
    if (root / DONE).is_file() and json.loads((root / DONE).read_text()) == TREE:
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        (tmp / "Train").mkdir()
        start = time.perf_counter()
        with mp.Pool(jobs) as pool:
            pool.map(_write_speaker, [(tmp / "Train", i) for i in range(SPEAKERS)], chunksize=8)
        (tmp / DONE).write_text(json.dumps(TREE))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
        print(f"generated {SPEAKERS * PER_SPEAKER} utterances in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _patched(root: Path, parallel: int = sap_data.PARALLEL_SPEAKERS, **attrs) -> list:
    """read_split with sap_speaker's header and sample functions replaced (forked workers inherit them)."""
    saved = {name: getattr(sap_speaker, name) for name in attrs}
    saved_parallel, sap_data.PARALLEL_SPEAKERS = sap_data.PARALLEL_SPEAKERS, parallel
    for name, value in attrs.items():
        setattr(sap_speaker, name, value)
    try:
        return read_split(root, "Train", DataReport())
    finally:
        sap_data.PARALLEL_SPEAKERS = saved_parallel
        for name, value in saved.items():
            setattr(sap_speaker, name, value)


def _decoded_problem(f, header: WavHeader) -> str:
    f.seek(0)
    audio, _ = sf.read(f, dtype="float32")
    return NON_FINITE if not np.isfinite(audio).all() else "" if audio.any() else SILENT


def _soundfile_header(f) -> WavHeader:
    info = sf.info(f.name)  # by path, as before: f is opened by the builtin open (below), which keeps it
    return WavHeader(info.frames, info.samplerate, info.channels)


VARIANTS = {
    "read_split": lambda root: read_split(root, "Train", DataReport()),
    "headers_only": lambda root: _patched(root, sample_problem=lambda f, header: ""),
    "full_decode": lambda root: _patched(root, sample_problem=_decoded_problem),
    "before": lambda root: _patched(root, sys.maxsize, open_regular=lambda path: open(path, "rb"),
                                    read_header=_soundfile_header, sample_problem=lambda f, header: ""),
}


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("results/_bench/sap_833"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="processes generating the tree")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each timing (root)")
    args = parser.parse_args(argv)
    build(args.root, args.jobs)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    reference = None
    for round_ in range(args.repeats):
        # Every other round in reverse: on a shared machine the first variant of a round fared differently.
        for name, run in list(VARIANTS.items())[:: 1 if round_ % 2 == 0 else -1]:
            if args.cold:
                drop_caches()
            start, start_cpu = time.perf_counter(), time.process_time()
            utts = run(args.root)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            reference = reference or utts
            if utts != reference:
                raise SystemExit(f"{name} read different utterances than read_split")
    n = len(reference)
    print(f"{n} utterances, {SPEAKERS} speakers, {'cold' if args.cold else 'warm'} page cache, "
          f"{args.repeats} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:14s} {med:7.2f} s (range {min(ts):.2f}-{max(ts):.2f}), CPU of this process "
              f"{statistics.median(cpu[name]):6.2f} s  {n / med:9.0f} utterances/s")
    for name in ("headers_only", "full_decode", "before"):
        ratio = statistics.median(b / a for a, b in zip(times["read_split"], times[name], strict=True))
        print(f"{name} takes {ratio:.2f}x the time of read_split (median of the rounds' ratios)")


if __name__ == "__main__":
    main()
