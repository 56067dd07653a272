"""Read Speech Accessibility Project (SAP) speaker manifests into utterance records.

Layout of a SAP release, which the synthetic corpus (workflow_scripts/demo_corpus.py) copies::

    <root>/<Split>/<ContributorID>/<ContributorID>.json
    <root>/<Split>/<ContributorID>/<ContributorID>_<n1>_<n2>_16kHz.wav

Each manifest has top-level ``"Contributor ID"``, ``"Etiology"`` and ``"Files"`` (a list of
``{"Filename", "Prompt": {"Transcript", "Category Description", ...}, ...}``). Other keys are ignored
because real releases add survey fields over time.

Bad input never disappears silently. Problems with the layout itself (a missing or empty split
folder, nothing usable at all) raise :class:`DataError`; problems with single manifests or files are
skipped and counted in a :class:`DataReport` under one of :data:`SKIP_REASONS`. Manifest-level
reasons (``missing_manifest``, ``malformed_manifest``, ``manifest_missing_keys``,
``unknown_etiology``) count manifests; the others count utterances. Audio that is not 16 kHz mono is
kept and counted as ``resampled`` / ``downmixed``; :func:`load_audio` converts it when it is read.

With ``as_kit`` a split is read as the SAP challenge kit's manifest (``utils/manifest.py`` in
xiuwenz2/SAPC-template) lists it, for a Dev WER comparable to the challenge's: every readable wav with
a transcript entry, of any length (``over_30s`` counts the clips eval decodes in 30 s chunks), empty
transcripts included, and etiologies outside the run's list labelled :data:`OTHER_ETIOLOGY`.

Durations come from the WAV header (workflow_scripts/wav_header.py), so reading ~320k Train utterances
decodes no audio; speakers are read in parallel processes. On a generated tree of SAP's size (833
speakers, 320,705 utterances; bench/read_manifests.py) that took 12.6 s on 2 busy cores, against 24 s
for one process calling ``soundfile.info`` per wav.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from workflow_scripts.atomic import write_text
from workflow_scripts.wav_header import wav_info
from workflow_scripts.whisper_audio import NATIVE_WINDOW_S, SAMPLE_RATE

log = logging.getLogger(__name__)

# The etiologies SAP labels; config/schema.yaml's `etiologies` default lists the same (tests check it).
ETIOLOGIES = ("Parkinson's Disease", "ALS", "Cerebral Palsy", "Down Syndrome", "Stroke")
MANIFEST_KEYS = ("Contributor ID", "Etiology", "Files")
SKIP_REASONS = (
    "missing_manifest",
    "malformed_manifest",
    "manifest_missing_keys",
    "unknown_etiology",
    "file_entry_missing_keys",
    "duplicate_id",
    "empty_transcript",
    "missing_wav",
    "unreadable_wav",
    "too_long",
)
CONVERSIONS = ("resampled", "downmixed", "over_30s")
# The label of a kit-read utterance whose etiology the run does not list.
OTHER_ETIOLOGY = "other"
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
        # Log only the first few per reason: a broken release could otherwise flood the job log.
        if self._count(self._split(split)["skipped"][reason], str(path)):
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
    existing = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise DataError(
        f"split folder {split_dir} does not exist (splits found under {root}: {existing or 'none'}); "
        "fix the split name or dataset_root"
    )


def _load_manifest(manifest: Path, required: tuple[str, ...]) -> tuple[dict[str, Any] | None, tuple[str, str]]:
    """The manifest's JSON, or None and (skip reason, detail)."""
    if not manifest.is_file():
        return None, ("missing_manifest", f"expected {manifest.name} in the speaker folder")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, ("malformed_manifest", str(e))
    if not isinstance(data, dict):
        return None, ("malformed_manifest", "top level is not a JSON object")
    missing = [k for k in required if k not in data]
    if missing or not isinstance(data["Files"], list):
        return None, ("manifest_missing_keys", f"missing {missing or ['Files (list)']}")
    return data, ("", "")


def clean_transcript(text: str) -> str:
    """A transcript as the kit reads it: stripped, a leading `#dis` line (a marker, not speech) and newlines
    removed."""
    text = re.sub(r"^#dis\s*\n", "", text.strip(), count=1)
    return text.replace("\n", "")


def _entry_fields(entry: Any) -> tuple[str, str, str] | None:
    """(Filename, cleaned Transcript, Category Description) of a Files entry, None if a required key lacks."""
    if not isinstance(entry, dict) or not isinstance(entry.get("Filename"), str) or not entry["Filename"]:
        return None
    prompt = entry.get("Prompt")
    if not isinstance(prompt, dict) or not isinstance(prompt.get("Transcript"), str):
        return None
    category = prompt.get("Category Description")
    return entry["Filename"], clean_transcript(prompt["Transcript"]), category if isinstance(category, str) else ""


# Reading a release's manifests and headers is spread over processes above this many speakers (SAP has
# 833 in Train); below it the pool would cost more than it saves.
PARALLEL_SPEAKERS = 64


def _speaker_events(speaker_dir: Path, allowed: frozenset[str], as_kit: bool,
                    max_duration_s: float) -> tuple[str, str, list[tuple]]:
    """What one speaker folder holds: (speaker, etiology, events in manifest order), the events being what
    read_split replays into its report: ("skip", reason, path, detail) or ("utterance", id, wav,
    transcript, category, outcome), outcome being ("skip", reason, detail) or ("keep", duration,
    conversions). Whether an id repeats another speaker's is decided there. Plain strings and tuples:
    they cross from worker processes, and pickled paths would cost more than reading them."""
    manifest = speaker_dir / f"{speaker_dir.name}.json"
    # The kit needs only "Files": a speaker without an etiology or ID still counts in its Dev WER.
    data, (reason, detail) = _load_manifest(manifest, ("Files",) if as_kit else MANIFEST_KEYS)
    if data is None:
        return "", "", [("skip", reason, str(manifest), detail)]
    etiology = str(data.get("Etiology") or "").strip()
    if etiology not in allowed and as_kit:
        etiology = OTHER_ETIOLOGY
    elif etiology not in allowed:
        return "", "", [("skip", "unknown_etiology", str(manifest), f"{etiology!r} not in {sorted(allowed)}")]
    events: list[tuple] = []
    for i, entry in enumerate(data["Files"]):
        parsed = _entry_fields(entry)
        if parsed is None:
            events.append(("skip", "file_entry_missing_keys", f"{manifest}#Files[{i}]",
                           "needs Filename and Prompt.Transcript"))
            continue
        filename, transcript, category = parsed
        wav = speaker_dir / filename
        events.append(("utterance", wav.stem, str(wav), transcript, category,
                       _utterance_outcome(wav, transcript, as_kit, max_duration_s)))
    return str(data.get("Contributor ID") or speaker_dir.name), etiology, events


def _utterance_outcome(wav: Path, transcript: str, as_kit: bool, max_duration_s: float) -> tuple:
    if not transcript and not as_kit:
        return ("skip", "empty_transcript", "")
    if not wav.is_file():
        return ("skip", "missing_wav", "")
    try:
        frames, rate, channels = wav_info(wav)  # header only: no decoding at read time
    except (RuntimeError, OSError) as e:  # libsndfile errors subclass RuntimeError
        return ("skip", "unreadable_wav", str(e))
    if frames <= 0 or rate <= 0:
        return ("skip", "unreadable_wav", "no audio frames")
    duration = frames / rate
    if duration > max_duration_s and not as_kit:
        return ("skip", "too_long", f"{duration:.1f} s > {max_duration_s} s")
    conversions = tuple(kind for kind, applies in (("over_30s", duration > NATIVE_WINDOW_S),
                                                   ("resampled", rate != SAMPLE_RATE), ("downmixed", channels > 1))
                        if applies)
    return ("keep", duration, conversions)


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
    """
    root = Path(root).resolve()
    split_dir = _split_dir(root, split)
    speaker_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not speaker_dirs:
        raise DataError(
            f"split folder {split_dir} holds no speaker folders; expected <Speaker>/<Speaker>.json inside"
        )
    read = functools.partial(_speaker_events, allowed=frozenset(etiologies), as_kit=as_kit,
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
    """Decode a WAV as float32 mono at 16 kHz (mean downmix, polyphase resampling)."""
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot decode audio {path}: {e}; replace or remove the file") from e
    return np.ascontiguousarray(resample(audio.mean(axis=1), rate), dtype=np.float32)


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    """Mono `audio` recorded at `rate` Hz, at SAMPLE_RATE (polyphase filter, exact ratio)."""
    if rate == SAMPLE_RATE:
        return audio
    g = math.gcd(SAMPLE_RATE, rate)
    return resample_poly(audio, SAMPLE_RATE // g, rate // g)
