"""The benchmark scripts run: the GPU check's dry run on the CPU (it is run for real only when a GPU is lent)."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


# Installed here but not on the GPU machine (DESIGN §8): the GPU check must not import them.
NOT_ON_THE_GPU_MACHINE = ("soundfile", "jsonschema", "hdbscan", "umap", "snakemake", "whisper_normalizer", "jiwer")


def test_gpu_check_dry_run_covers_both_precisions_and_window_settings(tmp_path):
    # None in sys.modules: `import x` raises ImportError and find_spec says not installed, as it would there.
    blocked = f"import sys\nsys.modules.update(dict.fromkeys({NOT_ON_THE_GPU_MACHINE!r}))\n"
    (tmp_path / "sitecustomize.py").write_text(blocked)
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=300, env=env)
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


class FakeClock:
    """perf_counter that moves only when a fake workload runs, by the seconds that workload says it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_interleaved_times_a_and_b_alternately_after_an_uncounted_warm_up_of_each(monkeypatch):
    speed = _speed_module()
    clock = FakeClock()
    monkeypatch.setattr(speed, "time", clock)
    calls: list[str] = []
    durations = {"a": iter([100.0, 3.0, 3.5, 2.5, 4.0, 3.0]), "b": iter([50.0, 1.0, 2.0, 1.5, 1.0, 3.0])}

    def workload(side: str):
        def run() -> None:
            calls.append(side)
            clock.now += next(durations[side])
        return run

    a_s, b_s = speed.interleaved(workload("a"), workload("b"), 5)
    assert calls == ["a", "b"] * 6  # one warm-up pair, then five timed pairs, never two runs of one side in a row
    assert a_s == [3.0, 3.5, 2.5, 4.0, 3.0] and b_s == [1.0, 2.0, 1.5, 1.0, 3.0]  # the slow warm-ups are not counted


def test_paired_entry_judges_the_goal_on_the_median_of_the_pair_ratios_not_the_best_pair():
    speed = _speed_module()
    b_s = [2.0, 1.6, 2.2, 2.0, 2.5]
    ratios = [1.5, 1.2, 1.1, 1.25, 1.4]  # the best pair (1.5) and one more meet ">= 1.3"; the median does not
    a_s = [r * b for r, b in zip(ratios, b_s, strict=True)]
    e = speed.paired_entry("demo", "slow_s", a_s, "fast_s", b_s, ">= 1.3")
    median = statistics.median(ratios)
    assert e["ratio"] == round(median, 3) and e["met"] is False
    assert e["ratio_range"] == [min(ratios), max(ratios)] and e["ratios"] == ratios and e["pairs"] == 5
    assert e["slow_s"] == round(statistics.median(a_s), 3) and e["fast_s"] == round(statistics.median(b_s), 3)
    assert e["goal"] == ">= 1.3" and e["what"] == "demo"

    # An upper goal on the same pairs is met on the median though the worst pair (1.5) misses it.
    assert speed.paired_entry("demo", "slow_s", a_s, "fast_s", b_s, "<= 1.3")["met"] is True
    # The median of the pair ratios, not the ratio of the two sides' medians: here they fall either side of 1.3.
    b_s = [2.0, 1.6, 2.2, 2.0, 2.0]
    a_s = [3.0, 2.4, 2.2, 2.5, 2.8]
    pair_median = statistics.median(a / b for a, b in zip(a_s, b_s, strict=True))
    assert pair_median > 1.3 > statistics.median(a_s) / statistics.median(b_s)
    e = speed.paired_entry("demo", "slow_s", a_s, "fast_s", b_s, ">= 1.3")
    assert e["ratio"] == round(pair_median, 3) and e["met"] is True


def test_noop_rerun_is_judged_on_the_median_of_its_runs(monkeypatch):
    speed = _speed_module()
    clock = FakeClock()
    monkeypatch.setattr(speed, "time", clock)
    seconds = [9.0, 1.0, 2.0, 3.0, 4.0]  # one slow call alone does not miss the 5 s goal
    outputs = ["Nothing to be done (all requested files are present and up to date)."] * 5
    runs = iter(zip(seconds, outputs, strict=True))

    def fake_run(*args, **kwargs):
        took, stdout = next(runs)
        clock.now += took
        return SimpleNamespace(stdout=stdout, stderr="")

    monkeypatch.setattr(speed.subprocess, "run", fake_run)
    e = speed.noop_rerun(5)
    assert e["seconds"] == statistics.median(seconds) and e["seconds_range"] == [min(seconds), max(seconds)]
    assert e["runs"] == 5 and e["nothing_to_do"] is True and e["met"] is True

    outputs[2] = "Job stats: eval 1"  # one call that would rerun a job fails the entry, whatever the time
    runs = iter(zip(seconds, outputs, strict=True))
    e = speed.noop_rerun(5)
    assert e["nothing_to_do"] is False and e["met"] is False


def test_a_fresh_bench_keeps_the_recorded_wer_cost_when_the_demo_runs_are_absent(tmp_path, monkeypatch, capsys):
    speed = _speed_module()
    monkeypatch.setattr(speed, "REPO", tmp_path)  # no results/demo_* here
    previous = tmp_path / "results.json"
    assert speed.kept_wer_cost(previous)["dev_wer"] is None  # nothing recorded: says how to run them

    recorded = {"dev_wer": {"demo_bucketed": 0.05, "demo_window30": 0.06}, "relative_wer_cost": -0.1667, "met": True}
    previous.write_text(json.dumps({"window_speedup": {"wer_cost": recorded}}))
    kept = speed.kept_wer_cost(previous)
    assert {k: kept[k] for k in recorded} == recorded and "not on this machine" in kept["source"]

    with pytest.raises(SystemExit):
        speed.main(["--pairs", "4", "--out", str(previous)])
    assert "--pairs must be at least 5" in capsys.readouterr().err
