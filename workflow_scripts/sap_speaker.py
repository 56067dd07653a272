"""One SAP speaker folder read into the events :func:`workflow_scripts.sap_data.read_split` replays: its manifest
loaded within limits, each Files entry checked, each wav's header and samples checked. Runs in worker
processes for a large release, so everything here returns plain tuples and raises nothing for bad input; the
skip reasons are documented with :data:`workflow_scripts.sap_data.SKIP_REASONS`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from workflow_scripts.safe_files import (
    MISSING,
    NOT_REGULAR,
    OUTSIDE,
    file_kind,
    is_text,
    open_regular,
    plain_name,
    shown,
)
from workflow_scripts.wav_header import NON_FINITE, read_header, sample_problem
from workflow_scripts.whisper_audio import NATIVE_WINDOW_S, SAMPLE_RATE

MANIFEST_KEYS = ("Contributor ID", "Etiology", "Files")
# The label of a kit-read utterance whose etiology the run does not list.
OTHER_ETIOLOGY = "other"
# Sample rates read: telephone band up to studio rates. Outside them a header is broken or hostile (a 1 Hz clip
# resampled to 16 kHz grows 16,000-fold).
MIN_RATE, MAX_RATE = 8_000, 192_000
# A real speaker's manifest is well under 1 MiB (385 entries with ratings: ~0.2 MiB, bench/read_manifests.py);
# the cap bounds what a hostile one costs each reader process to parse.
MAX_MANIFEST_BYTES = 16 << 20


def _load_manifest(manifest: str, bounds: tuple[str, ...],
                   required: tuple[str, ...]) -> tuple[dict[str, Any] | None, tuple[str, str]]:
    """The manifest's JSON, or None and (skip reason, detail)."""
    try:
        kind = file_kind(manifest, bounds)
        if kind == MISSING:
            return None, ("missing_manifest", f"expected {os.path.basename(manifest)} in the speaker folder")
        if kind == OUTSIDE:
            return None, ("outside_root", "a link leaving the dataset root; not followed")
        if kind == NOT_REGULAR:
            return None, ("malformed_manifest", "not a regular file (a folder, FIFO or device)")
        with open_regular(manifest) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            return None, ("malformed_manifest", f"too large: over {MAX_MANIFEST_BYTES >> 20} MiB")
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        return None, ("malformed_manifest", "nested too deeply to parse")
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


def _entry_problem(filename: str, transcript: str, category: str) -> tuple[str, str] | None:
    """(skip reason, detail) for a Files entry whose names or text cannot be used as they are."""
    if not is_text(filename) or "\0" in filename:
        return "bad_filename", f"Filename {shown(filename)!r} is not valid UTF-8 or holds a NUL"
    if not plain_name(filename):
        return "outside_root", f"Filename {filename!r} is not a plain name in the speaker folder"
    if not (is_text(transcript) and is_text(category)):
        return "bad_text", "the transcript or category is not valid Unicode (a lone \\udXXX escape)"
    return None


def speaker_events(speaker_dir: str, bounds: tuple[str, ...], allowed: frozenset[str], as_kit: bool,
                   max_duration_s: float) -> tuple[str, str, list[tuple]]:
    """What one speaker folder holds: (speaker, etiology, events in manifest order), the events being what
    read_split replays into its report: ("skip", reason, path, detail) or ("utterance", id, wav,
    transcript, category, outcome), outcome being ("skip", reason, detail) or ("keep", duration,
    conversions). Whether an id repeats another speaker's is decided there. Plain strings and tuples:
    they cross from worker processes, and pickled paths would cost more than reading them."""
    manifest = os.path.join(speaker_dir, os.path.basename(speaker_dir) + ".json")
    # The kit needs only "Files": a speaker without an etiology or ID still counts in its Dev WER.
    data, (reason, detail) = _load_manifest(manifest, bounds, ("Files",) if as_kit else MANIFEST_KEYS)
    if data is None:
        return "", "", [("skip", reason, manifest, detail)]
    speaker = str(data.get("Contributor ID") or os.path.basename(speaker_dir))
    if not is_text(speaker):
        return "", "", [("skip", "malformed_manifest", manifest, "Contributor ID is not valid Unicode")]
    etiology = str(data.get("Etiology") or "").strip()
    if etiology not in allowed and as_kit:
        etiology = OTHER_ETIOLOGY
    elif etiology not in allowed:
        return "", "", [("skip", "unknown_etiology", manifest, f"{etiology!r} not in {sorted(allowed)}")]
    events: list[tuple] = []
    for i, entry in enumerate(data["Files"]):
        parsed = _entry_fields(entry)
        if parsed is None:
            events.append(("skip", "file_entry_missing_keys", f"{manifest}#Files[{i}]",
                           "needs Filename and Prompt.Transcript"))
            continue
        filename, transcript, category = parsed
        problem = _entry_problem(filename, transcript, category)
        if problem is not None:
            events.append(("skip", problem[0], f"{manifest}#Files[{i}]", problem[1]))
            continue
        wav = os.path.join(speaker_dir, filename)
        events.append(("utterance", os.path.splitext(filename)[0], wav, transcript, category,
                       _utterance_outcome(wav, bounds, transcript, as_kit, max_duration_s)))
    return speaker, etiology, events


def _utterance_outcome(wav: str, bounds: tuple[str, ...], transcript: str, as_kit: bool,
                       max_duration_s: float) -> tuple:
    if not transcript and not as_kit:
        return ("skip", "empty_transcript", "")
    try:
        kind = file_kind(wav, bounds)
        if kind == MISSING:
            return ("skip", "missing_wav", "")
        if kind == OUTSIDE:
            return ("skip", "outside_root", "a link leaving the dataset root; not followed")
        if kind == NOT_REGULAR:
            return ("skip", "unreadable_wav", "not a regular file (a folder, FIFO or device); not opened")
        with open_regular(wav) as f:
            header = read_header(f)  # header only: durations need no decoding
            # The challenge kit scores every wav whose header it can read, so its selection keeps these too:
            # eval cannot decode them and scores an empty prediction, as the kit scores a missing one.
            kit_only = ""
            if header.frames <= 0:
                kit_only = "no audio frames"
            elif not MIN_RATE <= header.rate <= MAX_RATE:
                kit_only = f"{header.rate} Hz, outside {MIN_RATE}-{MAX_RATE} Hz"
            if kit_only and not as_kit:
                return ("skip", "unreadable_wav" if header.frames <= 0 else "unsupported_rate", kit_only)
            duration = header.frames / header.rate if header.rate > 0 else 0.0
            if duration > max_duration_s and not as_kit:
                return ("skip", "too_long", f"{duration:.1f} s > {max_duration_s} s")
            problem = "" if kit_only else sample_problem(f, header)
    except (RuntimeError, OSError) as e:  # libsndfile errors subclass RuntimeError
        return ("skip", "unreadable_wav", str(e))
    if problem and not as_kit:
        return ("skip", "non_finite_audio" if problem == NON_FINITE else "silent_audio", "")
    conversions = tuple(kind for kind, applies in (("over_30s", duration > NATIVE_WINDOW_S),
                                                   ("resampled", header.rate != SAMPLE_RATE),
                                                   ("downmixed", header.channels > 1),
                                                   ("kept_for_kit", bool(kit_only or problem)))
                        if applies)
    return ("keep", duration, conversions)
