#!/usr/bin/env bash
# Joint-training throughput of a large-v2-shaped Whisper with 8 LoRA experts on one CUDA GPU, offline
# (bench/gpu_check.py): bf16 and fp16, bucketed and 30 s windows. `--dry-run`: tiny config on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec timeout 480 "$PY" bench/gpu_check.py "$@"
