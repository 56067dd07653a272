"""Frames, sample rate and channels of a WAV file from its RIFF header, without soundfile's per-file cost.

The data stage reads the header of every utterance of a release (~370k files for SAP), and
`soundfile.info` spends most of its time in Python around libsndfile: on the generated 833-speaker
tree (bench/read_manifests.py) it was two thirds of reading the manifests. Plain PCM and float WAVs,
which SAP ships, are parsed here; anything else (other codecs, RF64, FLAC, a header this does not
understand) goes to `soundfile.info`, which also raises for files that are not audio.
"""

from __future__ import annotations

import os
import struct

import soundfile as sf

HEADER_BYTES = 4096  # the fmt and data chunks of a plain WAV lie well within this
# WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, and WAVE_FORMAT_EXTENSIBLE (whose sub-format is checked)
_PLAIN = (1, 3)
_EXTENSIBLE = 0xFFFE


def _plain_wav(head: bytes, file_size: int) -> tuple[int, int, int] | None:
    """(frames, rate, channels) of a plain RIFF/WAVE header, or None when it is anything else."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt " and size >= 16 and body + 16 <= len(head):
            tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", head, body)
            if tag == _EXTENSIBLE and size >= 40 and body + 26 <= len(head):
                tag = struct.unpack_from("<H", head, body + 24)[0]  # the sub-format GUID's first two bytes
            plain = tag in _PLAIN and channels > 0 and rate > 0 and bits % 8 == 0 and align == channels * bits // 8
            fmt = (channels, rate, align) if plain else None
            if not plain:
                return None
        elif chunk == b"data":
            if fmt is None:
                return None
            channels, rate, align = fmt
            # A cut-short file holds fewer frames than its header says; libsndfile counts what is there.
            return min(size, max(file_size - body, 0)) // align, rate, channels
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return None


def wav_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frames, sample rate, channels) as `soundfile.info` gives them; raises as it does for non-audio."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
    parsed = _plain_wav(head, size)
    if parsed is not None:
        return parsed
    info = sf.info(str(path))
    return info.frames, info.samplerate, info.channels
