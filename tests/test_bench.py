"""The benchmark scripts run: the GPU check's dry run on the CPU (it is run for real only when a GPU is lent)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _speed_module():
    spec = importlib.util.spec_from_file_location("bench_speed", REPO / "bench" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval_dir(root: Path, run: str, hyps: list[str], utts: list) -> None:
    from workflow_scripts.eval import write_results

    write_results(utts, [0] * len(utts), hyps, root / "results" / run / "eval", {})


def test_window_wer_cost_reads_both_demo_runs_with_a_speaker_interval(tmp_path, monkeypatch):
    from workflow_scripts.sap_data import Utterance

    speed = _speed_module()
    monkeypatch.setattr(speed, "REPO", tmp_path)
    assert speed.demo_wer_cost()["dev_wer"] is None  # neither run yet: says how to run them

    refs = ["turn on the light", "call my sister", "set a timer", "play some music"] * 3
    utts = [Utterance(f"u{i}", f"spk{i % 6}", "ALS", "", r, "", "Dev", 2.0) for i, r in enumerate(refs)]
    _eval_dir(tmp_path, "demo_window30", refs, utts)
    assert speed.demo_wer_cost()["dev_wer"] is None  # one run is not a comparison
    # 39 reference words: bucketed drops a word in 2 utterances, 30 s in 1: 2/39 against 1/39.
    hyps = list(refs)
    hyps[0], hyps[5] = "turn on the", "call my"
    _eval_dir(tmp_path, "demo_bucketed", hyps, utts)
    _eval_dir(tmp_path, "demo_window30", [h if i != 7 else "play music" for i, h in enumerate(refs)], utts)
    cost = speed.demo_wer_cost()
    assert cost["dev_wer"] == {"demo_bucketed": round(2 / 39, 6), "demo_window30": round(1 / 39, 6)}
    assert cost["relative_wer_cost"] == 1.0 and cost["met"] is False and cost["dev_n"] == 12
    low, high = cost["wer_diff_ci95"]
    assert low <= 1 / 39 <= high and low < high

    # --wer-cost-only writes the cost into the existing results, keeping their timings
    out = tmp_path / "results.json"
    out.write_text(json.dumps(json.loads((REPO / "bench" / "results.json").read_text()) | {"date": "then"}))
    speed.main(["--wer-cost-only", "--out", str(out)])
    updated = json.loads(out.read_text())
    assert updated["window_speedup"]["wer_cost"] == cost and updated["date"] == "then"
    assert "+100.0% (WER 5.13% vs 2.56%" in out.with_suffix(".md").read_text()

    _eval_dir(tmp_path, "demo_window30", refs[:-1], utts[:-1])  # one Dev clip dropped at 30 s
    with pytest.raises(SystemExit, match="scored different Dev utterances"):
        speed.demo_wer_cost()
