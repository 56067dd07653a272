"""Frames, sample rate and channels of a WAV file from its RIFF header, without soundfile's per-file cost; and
whether its samples are all zero or hold NaN/inf, read as cheaply as the format allows.

The data stage reads the header of every utterance of a release (~370k files for SAP), and
`soundfile.info` spends most of its time in Python around libsndfile: on the generated 833-speaker
tree (bench/read_manifests.py) it was two thirds of reading the manifests. Plain PCM and float WAVs,
which SAP ships, are parsed here; anything else (other codecs, RF64, FLAC, a header this does not
understand or libsndfile would refuse) goes to soundfile, which also raises for files that are not audio.

Sample checks (:func:`sample_problem`): integer PCM cannot hold NaN, and a clip is silent only if every sample
byte is the format's zero, so the scan stops at the first other byte, most often within the first 4 KiB
that the header read already brought into the page cache. Float WAVs are read whole (NaN can hide anywhere),
other formats decoded by soundfile, both a block at a time.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import soundfile as sf

HEADER_BYTES = 4096  # the fmt and data chunks of a plain WAV lie well within this
SCAN_BYTES = 1 << 20  # the largest read while looking for a non-zero sample
# WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, and WAVE_FORMAT_EXTENSIBLE (whose sub-format is checked)
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
# Sample widths libsndfile reads for each: anything else (a width of 0 would divide by zero) goes to soundfile.
_BITS = {_PCM: (8, 16, 24, 32), _FLOAT: (32, 64)}
_MAX_CHANNELS = 1024  # libsndfile's limit: it refuses a header with more
NON_FINITE, SILENT = "non_finite", "silent"


@dataclass(frozen=True)
class WavHeader:
    frames: int
    rate: int
    channels: int
    # Of a plain WAV: (offset of the samples, their length in bytes, sample kind: "u8", "int", "<f4" or "<f8");
    # None when soundfile read the header.
    samples: tuple[int, int, str] | None = None
    # The sample bytes the header read brought in: most clips show sound there, and need no second read.
    first: bytes = field(default=b"", repr=False, compare=False)


def _plain_wav(head: bytes, file_size: int) -> WavHeader | None:
    """The header of a plain RIFF/WAVE file, or None when it is anything else."""
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
            if (bits not in _BITS.get(tag, ()) or not 0 < channels <= _MAX_CHANNELS or rate <= 0
                    or align != channels * bits // 8):
                return None
            kind = {8: "u8"}.get(bits, "int") if tag == _PCM else f"<f{bits // 8}"
            fmt = (channels, rate, align, kind)
        elif chunk == b"data":
            if fmt is None:
                return None
            channels, rate, align, kind = fmt
            # A cut-short file holds fewer frames than its header says; libsndfile counts what is there.
            frames = min(size, max(file_size - body, 0)) // align
            return WavHeader(frames, rate, channels, (body, frames * align, kind), head[body:body + frames * align])
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return None


def read_header(f: BinaryIO) -> WavHeader:
    """The header of the WAV open in `f` (read from its start); raises as soundfile does for non-audio."""
    f.seek(0)
    head = f.read(HEADER_BYTES)
    parsed = _plain_wav(head, os.fstat(f.fileno()).st_size)
    if parsed is not None:
        return parsed
    f.seek(0)
    info = sf.info(f)
    return WavHeader(info.frames, info.samplerate, info.channels)


def _all_bytes(f: BinaryIO, start: int, length: int, zero: bytes) -> bool:
    """Whether `length` bytes of `f` from `start` are all `zero`, read in growing blocks up to the first other."""
    f.seek(start)
    block = HEADER_BYTES
    while length > 0:
        data = f.read(min(block, length))
        if not data:
            return True  # cut short under us: what was there was silent
        if data.strip(zero):
            return False
        length -= len(data)
        block = min(2 * block, SCAN_BYTES)
    return True


def _float_blocks(f: BinaryIO, header: WavHeader) -> Iterator[np.ndarray]:
    """The samples of a float WAV, or of a format soundfile decodes, a block at a time (memory stays bounded)."""
    if header.samples is None:
        f.seek(0)
        yield from sf.blocks(f, blocksize=SCAN_BYTES // 4, dtype="float32")
        return
    start, length, kind = header.samples
    size = np.dtype(kind).itemsize
    f.seek(start)
    while length > 0:
        data = f.read(min(SCAN_BYTES, length))  # whole samples: SCAN_BYTES is a multiple of every size
        if not data:
            return
        length -= len(data)
        yield np.frombuffer(data, dtype=kind, count=len(data) // size)


def sample_problem(f: BinaryIO, header: WavHeader) -> str:
    """NON_FINITE (a NaN or infinite sample), SILENT (every sample zero) or "" for the WAV open in `f`."""
    if header.samples is not None and header.samples[2] in ("u8", "int"):
        start, length, kind = header.samples
        # Integers hold no NaN. 8-bit WAV samples are unsigned, silent at 0x80; wider ones are signed.
        zero, seen = b"\x80" if kind == "u8" else b"\x00", len(header.first)
        if header.first.strip(zero):
            return ""
        return SILENT if _all_bytes(f, start + seen, length - seen, zero) else ""
    sound = False
    for block in _float_blocks(f, header):
        if not np.isfinite(block).all():
            return NON_FINITE
        sound = sound or bool(block.any())
    return "" if sound else SILENT
