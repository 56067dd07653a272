"""Speech synthesis with espeak-ng through ctypes (library and data from the `espeakng-loader` wheel).

The library keeps wave-generator state between calls, so identical output across runs needs a fresh
process per utterance plus `espeak_ng_SetRandSeed`. `synthesize` therefore refuses to run twice in one
process; callers use a process pool with `maxtasksperchild=1` (see demo_corpus.py).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from workflow_scripts.sap_data import resample

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_SSML = 0x10
_POS_CHARACTER = 1
# espeak_PARAMETER enum values
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_used_in_pid: int | None = None


class EspeakError(RuntimeError):
    pass


@dataclass(frozen=True)
class Voice:
    """espeak-ng voice settings; `rate` in words per minute, the others on espeak's 0-100 scales."""

    name: str = "en-us"
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    volume: int = 100
    word_gap_10ms: int = 0


def synthesize(text: str, voice: Voice, seed: int, ssml: bool = False) -> np.ndarray:
    """Synthesise `text` and return float32 mono audio at the corpus rate (sap_data.SAMPLE_RATE) in [-1, 1].

    May be called once per process (see module docstring); a second call raises EspeakError.
    """
    global _used_in_pid
    if _used_in_pid == os.getpid():
        raise EspeakError("espeak-ng keeps state between calls: synthesise each utterance in a fresh process")
    _used_in_pid = os.getpid()

    import espeakng_loader  # imported here so the parent process never loads the library

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    data_path = espeakng_loader.get_data_path().encode()
    rate_hz = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, ctypes.c_char_p(data_path), 0)
    if rate_hz <= 0:
        raise EspeakError(f"espeak_Initialize failed with data path {data_path!r}")
    lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))

    chunks: list[np.ndarray] = []

    def collect(wav: ctypes.POINTER(ctypes.c_short), n: int, _events: ctypes.c_void_p) -> int:
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    callback = _CALLBACK(collect)  # kept referenced until synthesis ends
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(ctypes.c_char_p(voice.name.encode())) != 0:
        raise EspeakError(f"espeak-ng rejected voice {voice.name!r} (try e.g. 'en-us', 'en-us+f3')")
    for param, value in ((_RATE, voice.rate), (_VOLUME, voice.volume), (_PITCH, voice.pitch),
                         (_RANGE, voice.pitch_range), (_WORDGAP, voice.word_gap_10ms)):
        lib.espeak_SetParameter(param, int(value), 0)

    encoded = text.encode("utf-8") + b"\0"
    flags = _CHARS_UTF8 | (_SSML if ssml else 0)
    err = lib.espeak_Synth(ctypes.c_char_p(encoded), ctypes.c_size_t(len(encoded)), 0, _POS_CHARACTER,
                           0, flags, None, None)
    if err != 0:
        raise EspeakError(f"espeak_Synth failed ({err}) for text {text!r}")
    lib.espeak_Synchronize()
    if not chunks:
        raise EspeakError(f"espeak-ng produced no audio for text {text!r}")
    audio = np.concatenate(chunks).astype(np.float32) / 32768.0
    return resample(audio, rate_hz).astype(np.float32)  # espeak-ng speaks at 22050 Hz
