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


def test_window_wer_cost_pools_the_seeds_where_both_settings_ran(tmp_path, monkeypatch):
    from workflow_scripts.sap_data import Utterance

    speed = _speed_module()
    monkeypatch.setattr(speed, "REPO", tmp_path)
    assert speed.demo_wer_cost()["dev_wer"] is None  # neither run yet: says how to run them

    refs = ["turn on the light", "call my sister", "set a timer", "play some music"] * 3
    utts = [Utterance(f"u{i}", f"spk{i % 6}", "ALS", "", r, "", "Dev", 2.0) for i, r in enumerate(refs)]

    def errors_at(*positions: int) -> list[str]:  # one word dropped from each of these utterances
        return [" ".join(r.split()[:-1]) if i in positions else r for i, r in enumerate(refs)]

    _eval_dir(tmp_path, "demo_window30", refs, utts)
    assert speed.demo_wer_cost()["dev_wer"] is None  # one run is not a comparison
    # 39 reference words. Seed 42: bucketed drops a word in 2 utterances, 30 s in 1: 2/39 against 1/39.
    _eval_dir(tmp_path, "demo_bucketed", errors_at(0, 5), utts)
    _eval_dir(tmp_path, "demo_window30", errors_at(7), utts)
    cost = speed.demo_wer_cost()
    assert cost["dev_wer"] == {"demo_bucketed": round(2 / 39, 6), "demo_window30": round(1 / 39, 6)}
    assert cost["relative_wer_cost"] == 1.0 and cost["met"] is False and cost["dev_n"] == 12
    assert cost["seeds_paired"] == [42] and cost["per_seed"]["42"]["relative_wer_cost"] == 1.0
    low, high = cost["wer_diff_ci95"]
    assert low <= 1 / 39 <= high and low < high

    # Seed 43 goes the other way (0 against 1 error) and a bucketed seed 44 alone (3 errors) only
    # widens the bucketed range: the means over seeds 42 and 43 are equal, a cost of zero.
    _eval_dir(tmp_path, "demo_bucketed_seed43", refs, utts)
    _eval_dir(tmp_path, "demo_window30_seed43", errors_at(3), utts)
    _eval_dir(tmp_path, "demo_bucketed_seed44", errors_at(1, 2, 3), utts)
    cost = speed.demo_wer_cost()
    assert cost["seeds_paired"] == [42, 43] and len(cost["dev_wer"]) == 5
    assert cost["mean_dev_wer"] == {"bucketed": round(1 / 39, 6), "window30": round(1 / 39, 6)}
    assert cost["relative_wer_cost"] == 0.0 and cost["met"] is True
    assert cost["per_seed"]["43"]["relative_wer_cost"] == -1.0
    assert cost["bucketed_wer_range"] == [0.0, round(3 / 39, 6)]
    low, high = cost["wer_diff_ci95"]
    assert low <= 0 <= high

    # --wer-cost-only writes the cost into the existing results, keeping their timings
    out = tmp_path / "results.json"
    out.write_text(json.dumps(json.loads((REPO / "bench" / "results.json").read_text()) | {"date": "then"}))
    speed.main(["--wer-cost-only", "--out", str(out)])
    updated = json.loads(out.read_text())
    assert updated["window_speedup"]["wer_cost"] == cost and updated["date"] == "then"
    table = out.with_suffix(".md").read_text()
    assert "+0.0% (mean WER 2.56% vs 2.56% over seeds 42, 43" in table and "every bucketed seed: 0.00%–7.69%" in table

    _eval_dir(tmp_path, "demo_window30_seed43", refs[:-1], utts[:-1])  # one Dev clip dropped at 30 s
    with pytest.raises(SystemExit, match="scored different Dev utterances"):
        speed.demo_wer_cost()
