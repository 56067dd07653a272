"""Read Speech Accessibility Project (SAP) speaker manifests into utterance records.

Layout of a SAP release, which the synthetic corpus (workflow_scripts/demo_corpus.py) copies::

    <root>/<Split>/<ContributorID>/<ContributorID>.json
    <root>/<Split>/<ContributorID>/<ContributorID>_<n1>_<n2>_16kHz.wav

Each manifest has top-level ``"Contributor ID"``, ``"Etiology"`` and ``"Files"`` (a list of
``{"Filename", "Prompt": {"Transcript", "Category Description", ...}, ...}``). Other keys are ignored
because real releases add survey fields over time.

Bad input never disappears silently. Problems with the layout itself (a missing, empty or unlistable split
folder, a dataset root whose path is not UTF-8, nothing usable at all) raise :class:`DataError`; problems with
single folders, manifests or files are skipped and counted in a :class:`DataReport` under one of
:data:`SKIP_REASONS` (each listed in data_report.json, count 0 if none), with up to five example paths:

- ``missing_manifest``: a speaker folder without ``<folder>.json``.
- ``malformed_manifest``: not JSON, not UTF-8, nested too deeply for the parser, over 16 MiB
  (``sap_speaker.MAX_MANIFEST_BYTES``), not an object, a "Contributor ID" that is not valid Unicode,
  unreadable (permissions), or not a regular file.
- ``manifest_missing_keys``: no "Contributor ID", "Etiology" or "Files" (a list).
- ``unknown_etiology``: an etiology the run does not list.
- ``outside_root``: a speaker folder, manifest or wav that is a link resolving outside the dataset root
  (never followed), or a ``Filename`` that is not a plain name in its speaker folder (``/``, ``\\``, ``..``,
  absolute); the example names the manifest entry.
- ``bad_filename``: a folder name or ``Filename`` that is not valid UTF-8 (shown with ``\\x`` escapes) or holds
  a NUL.
- ``file_entry_missing_keys``: a Files entry without a Filename or Prompt.Transcript.
- ``bad_text``: a transcript or category that is not valid Unicode (a lone ``\\udXXX`` escape).
- ``duplicate_id``: a wav name already read from another entry or speaker.
- ``empty_transcript``: an empty transcript (kept with ``as_kit``).
- ``missing_wav``: the listed wav does not exist.
- ``unreadable_wav``: not audio, no frames, cut to nothing, unreadable (permissions), or not a regular file (a
  folder or FIFO named .wav, never opened).
- ``unsupported_rate``: a sample rate outside 8-192 kHz (``sap_speaker.MIN_RATE``, ``MAX_RATE``); a 1 Hz
  header would make a 4 KB file 128 MB after resampling.
- ``non_finite_audio``: a NaN or infinite sample (float WAVs); it would poison the model's activations.
- ``silent_audio``: every sample zero (digital silence); nothing to learn from or transcribe. Also skipped with
  ``as_kit``, where the kit would score it: the count shows how many.
- ``too_long``: over ``max_duration_s`` (not with ``as_kit``).

Manifest-level reasons (``missing_manifest``, ``malformed_manifest``, ``manifest_missing_keys``,
``unknown_etiology``, and ``outside_root`` / ``bad_filename`` for folders and manifests) count manifests or
folders; the others count utterances. Audio that is not 16 kHz mono is kept and counted as ``resampled`` /
``downmixed``; :func:`load_audio` converts it when it is read, and refuses (DataError naming the file) what the
data stage would skip as unreadable, ``unsupported_rate`` or ``non_finite_audio``.

With ``as_kit`` a split is read as the SAP challenge kit's manifest (``utils/manifest.py`` in
xiuwenz2/SAPC-template) lists it, for a Dev WER comparable to the challenge's: every readable wav with
a transcript entry, of any length (``over_30s`` counts the clips eval decodes in 30 s chunks), empty
transcripts included, and etiologies outside the run's list labelled ``other`` (``sap_speaker.OTHER_ETIOLOGY``).
Clips the kit scores but no model can decode (no frames, an unsupported rate, NaN/inf or all-zero samples)
are kept too and counted as ``kept_for_kit``: eval scores an empty prediction for those it cannot decode.

Durations come from the WAV header and the sample checks read only up to the first non-zero sample of a PCM
clip (workflow_scripts/wav_header.py), so reading ~320k Train utterances decodes no audio; speakers are read in
parallel processes. On a generated tree of SAP's size (833 speakers, 320,705 utterances;
bench/read_manifests.py) that took 12.6 s on 2 busy cores, against 24 s for one process calling
``soundfile.info`` per wav. The sample checks cost nothing measurable there (read_split 9.3 s against 10.6 s
without them, medians of 3 alternating rounds on 2 busy cores); decoding every clip instead took 3.5x as long,
and those were 0.1 s clips: SAP's last seconds, which makes decoding dearer still while the scan still stops at
the first non-zero sample.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from workflow_scripts.atomic import write_text
from workflow_scripts.safe_files import inside, is_text, shown
from workflow_scripts.sap_speaker import MAX_RATE, MIN_RATE, speaker_events
from workflow_scripts.whisper_audio import NATIVE_WINDOW_S, SAMPLE_RATE

log = logging.getLogger(__name__)

# The etiologies SAP labels; config/schema.yaml's `etiologies` default lists the same (tests check it).
ETIOLOGIES = ("Parkinson's Disease", "ALS", "Cerebral Palsy", "Down Syndrome", "Stroke")
SKIP_REASONS = (
    "missing_manifest",
    "malformed_manifest",
    "manifest_missing_keys",
    "unknown_etiology",
    "outside_root",
    "bad_filename",
    "file_entry_missing_keys",
    "bad_text",
    "duplicate_id",
    "empty_transcript",
    "missing_wav",
    "unreadable_wav",
    "unsupported_rate",
    "non_finite_audio",
    "silent_audio",
    "too_long",
)
CONVERSIONS = ("resampled", "downmixed", "over_30s", "kept_for_kit")
MAX_EXAMPLES = 5


class DataError(ValueError):
    """Input data cannot be used; the message names the file or folder and what to do."""


@dataclass(frozen=True)
class Utterance:
    id: str  # wav filename stem, unique across the corpus
    speaker: str  # "Contributor ID"
    etiology: str
    wav: str  # absolute path
    transcript: str  # raw Prompt.Transcript, SAP markup kept (scoring needs it)
    category: str  # Prompt "Category Description" ("" if absent)
    split: str
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Utterance:
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise DataError(f"utterance record {d!r} lacks keys {missing}; regenerate it with read_split")
        kwargs = {f.name: d[f.name] for f in fields(cls)}
        kwargs["duration_s"] = float(kwargs["duration_s"])
        return cls(**kwargs)


def write_utterances(path: str | os.PathLike, utts: list[Utterance]) -> None:
    """Write utterances as a JSON list of dicts (atomic)."""
    write_text(path, json.dumps([u.to_dict() for u in utts], indent=1, ensure_ascii=False) + "\n")


def read_utterances(path: str | os.PathLike) -> list[Utterance]:
    """Read a list written by :func:`write_utterances`."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read utterance list {path}: {e}; rerun the stage that writes it") from e
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of utterance records; rerun the stage that writes it")
    return [Utterance.from_dict(r) for r in records]


class DataReport:
    """Counts of kept, skipped and converted utterances per split (written as data_report.json).

    Every skip reason and conversion kind is always listed (count 0 if none), so a reader sees
    which checks ran.
    """

    def __init__(self) -> None:
        self._splits: dict[str, dict[str, Any]] = {}

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self._splits:
            self._splits[split] = {
                "kept": {},
                "skipped": {r: {"count": 0, "examples": []} for r in SKIP_REASONS},
                "converted": {c: {"count": 0, "examples": []} for c in CONVERSIONS},
            }
        return self._splits[split]

    def keep(self, split: str, etiology: str) -> None:
        kept = self._split(split)["kept"]
        kept[etiology] = kept.get(etiology, 0) + 1

    @staticmethod
    def _count(entry: dict[str, Any], path: str) -> bool:
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(path)
            return True
        return False

    def skip(self, split: str, reason: str, path: str | os.PathLike, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        path, detail = shown(path), shown(detail)  # a name that is not UTF-8 must not break the JSON report
        # Log only the first few per reason: a broken release could otherwise flood the job log.
        if self._count(self._split(split)["skipped"][reason], path):
            log.warning("%s: skipped %s (%s)%s", split, path, reason, f": {detail}" if detail else "")

    def convert(self, split: str, kind: str, path: str | os.PathLike) -> None:
        if kind not in CONVERSIONS:
            raise ValueError(f"unknown conversion {kind!r}; expected one of {CONVERSIONS}")
        self._count(self._split(split)["converted"][kind], str(path))

    def kept_total(self, split: str) -> int:
        return sum(self._split(split)["kept"].values())

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._splits))  # deep copy; callers cannot mutate the report

    def write(self, path: str | os.PathLike) -> None:
        write_text(path, json.dumps(self._splits, indent=2, ensure_ascii=False) + "\n")


def _split_dir(root: Path, split: str) -> Path:
    split_dir = root / split
    if split_dir.is_dir():
        return split_dir
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist; set dataset_root to the folder with Train/Dev")
    try:
        existing = sorted(shown(p.name) for p in root.iterdir() if p.is_dir())
    except OSError as e:
        raise DataError(f"cannot list dataset root {shown(root)}: {e.strerror}; make it readable") from e
    raise DataError(
        f"split folder {split_dir} does not exist (splits found under {root}: {existing or 'none'}); "
        "fix the split name or dataset_root"
    )


def _speaker_dirs(split_dir: Path, bounds: tuple[str, ...], split: str, report: DataReport) -> list[str]:
    """The speaker folders of a split, sorted; links leaving the root and names that are not UTF-8 counted."""
    try:
        entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list split folder {shown(split_dir)}: {e.strerror}; make it readable") from e
    folders, skipped = [], 0
    for entry in entries:
        if entry.is_symlink() and not inside(os.path.realpath(entry.path), bounds):
            report.skip(split, "outside_root", entry.path, "a link leaving the dataset root; not followed")
            skipped += 1
            continue
        try:
            if not entry.is_dir():
                continue  # loose files next to the speakers (a README, the Json tar) are not speakers
        except OSError:  # a link loop
            continue
        if not is_text(entry.name):
            report.skip(split, "bad_filename", entry.path, "the folder name is not valid UTF-8; rename it")
            skipped += 1
        else:
            folders.append(entry.path)
    if not folders and not skipped:
        raise DataError(
            f"split folder {split_dir} holds no speaker folders; expected <Speaker>/<Speaker>.json inside"
        )
    return folders


# Reading a release's manifests and headers is spread over processes above this many speakers (SAP has
# 833 in Train); below it the pool would cost more than it saves.
PARALLEL_SPEAKERS = 64


def read_split(
    root: str | os.PathLike,
    split: str,
    report: DataReport,
    *,
    etiologies: tuple[str, ...] | list[str] = ETIOLOGIES,
    max_duration_s: float = NATIVE_WINDOW_S,
    as_kit: bool = False,
) -> list[Utterance]:
    """Read every usable utterance of ``<root>/<split>``, sorted by id; count the rest in ``report``.

    Clips longer than ``max_duration_s`` (by default Whisper's 30 s window) are skipped (``too_long``)
    rather than silently truncated. ``as_kit``: the challenge kit's selection (module docstring); no
    duration limit, empty transcripts kept, unlisted etiologies kept as OTHER_ETIOLOGY. Speakers are read
    in parallel processes for a large release; the result and the report are the same either way.
    Nothing outside ``root`` is read: links leaving it are counted as ``outside_root``, except that a split
    folder which is itself a link (the user's own layout) may lie elsewhere.
    """
    root = Path(root).resolve()
    if not is_text(str(root)):
        raise DataError(f"dataset root {shown(root)} is not valid UTF-8, which the JSON outputs cannot hold; "
                        "rename it or link to it from a UTF-8 path")
    split_dir = _split_dir(root, split)
    bounds = (str(root), os.path.realpath(split_dir))
    speaker_dirs = _speaker_dirs(split_dir, bounds, split, report)
    read = functools.partial(speaker_events, bounds=bounds, allowed=frozenset(etiologies), as_kit=as_kit,
                             max_duration_s=max_duration_s)
    if len(speaker_dirs) >= PARALLEL_SPEAKERS and (os.cpu_count() or 1) > 1:
        with ProcessPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
            per_speaker = list(pool.map(read, speaker_dirs, chunksize=8))
    else:
        per_speaker = map(read, speaker_dirs)
    seen: set[str] = set()
    utts: list[Utterance] = []
    for speaker, etiology, events in per_speaker:
        for kind, *rest in events:
            if kind == "skip":
                report.skip(split, *rest)
                continue
            uid, wav, transcript, category, outcome = rest
            if uid in seen:
                report.skip(split, "duplicate_id", wav, f"utterance id {uid} already read")
            elif outcome[0] == "skip":
                report.skip(split, outcome[1], wav, outcome[2])
            else:
                _, duration, conversions = outcome
                for conversion in conversions:
                    report.convert(split, conversion, wav)
                seen.add(uid)
                report.keep(split, etiology)
                utts.append(Utterance(uid, speaker, etiology, wav, transcript, category, split, duration))
    if not utts:
        skipped = {r: v["count"] for r, v in report.to_dict()[split]["skipped"].items() if v["count"]}
        raise DataError(
            f"no usable utterances in {split_dir} (skipped per reason: {skipped or 'none'}); "
            "see the examples in the data report and fix those manifests or files"
        )
    return sorted(utts, key=lambda u: u.id)


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Decode a WAV as float32 mono at 16 kHz (mean downmix, polyphase resampling). DataError naming the file for
    what the model must never see: not a regular file (a FIFO would hang), not decodable, a rate outside
    MIN_RATE..MAX_RATE (checked before decoding or resampling), NaN or infinite samples."""
    try:
        # Checked first: libsndfile would block opening a FIFO.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DataError(f"audio {shown(path)} is not a regular file (a folder, FIFO or device); "
                            "replace or remove it")
        with sf.SoundFile(str(path)) as snd:
            rate = snd.samplerate
            if not MIN_RATE <= rate <= MAX_RATE:
                raise DataError(f"audio {shown(path)} is recorded at {rate} Hz, outside {MIN_RATE}-{MAX_RATE} Hz; "
                                "resample it to 16 kHz or remove it")
            audio = snd.read(dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot decode audio {shown(path)}: {shown(str(e))}; replace or remove the file") from e
    if not len(audio):
        raise DataError(f"audio {shown(path)} holds no samples; replace or remove the file")
    if not np.isfinite(audio).all():
        raise DataError(f"audio {shown(path)} holds NaN or infinite samples; replace or remove the file")
    return np.ascontiguousarray(resample(audio.mean(axis=1), rate), dtype=np.float32)


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    """Mono `audio` recorded at `rate` Hz, at SAMPLE_RATE (polyphase filter, exact ratio)."""
    if rate == SAMPLE_RATE:
        return audio
    g = math.gcd(SAMPLE_RATE, rate)
    return resample_poly(audio, SAMPLE_RATE // g, rate // g)
