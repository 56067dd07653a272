"""What Whisper's encoder takes as audio: 16 kHz mono, at most 30 s per window.

Plain constants with no imports, so every module that handles audio (the SAP reader, the window
ladder, Whisper I/O) and the GPU check, which runs where soundfile is not installed, share them.
"""

SAMPLE_RATE = 16000
NATIVE_WINDOW_S = 30.0
