"""The benchmark scripts run: the GPU check's dry run on the CPU (it is run for real only when a GPU is lent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_covers_both_precisions_and_window_settings():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PY": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    runs = [x for x in lines if "precision" in x]
    assert {(r["precision"], len(r["windows"]) > 1) for r in runs} == {(p, b) for p in ("bf16", "fp16")
                                                                        for b in (True, False)}
    assert all(r["utterances_per_s"] > 0 and r["steps"] == 1 for r in runs)
    assert set(lines[-1]["bucketed_over_30s"]) == {"bf16", "fp16"}
