"""The quick pipeline through a real SLURM cluster, compared with a local run of the same settings.

Needs the one-node cluster that .ci/slurm_setup.sh starts (slurmctld, slurmd, slurmdbd + MariaDB, munge)
and MOE_SLURM_TEST=1; `make test-slurm` does both. A plain `pytest tests` leaves this folder out
(tests/slurm/conftest.py).

The SLURM run uses profiles/slurm as a user would after filling it in (partition, account), with only
what a GPU-less CI node and an exact comparison need changed (ci_profile says what and why). Its
`results/quick/eval/metrics.json` and `per_utterance.tsv` must equal those of a local run with
profiles/cpu (run at the same time, from scratch as well), apart from timing fields; every one of its jobs
but base_model (a local rule: the one job allowed to reach the model hub) must be a SLURM job that sacct
lists (sbatch is the only way in), one per expert for the expert rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(
    os.environ.get("MOE_SLURM_TEST") != "1",
    reason="needs the local SLURM cluster of .ci/slurm_setup.sh: run `make test-slurm`",
)

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
TARGET = "results/quick/eval/metrics.json"
# What .ci/slurm_setup.sh creates (same environment variables).
PARTITION = os.environ.get("MOE_SLURM_PARTITION", "ci")
ACCOUNT = os.environ.get("MOE_SLURM_ACCOUNT", "moe_ci")
GPU_RULES = ("embeddings", "expert_assignment", "expert", "asr", "eval", "compare_train", "compare_eval")
# Enough for every quick-run stage with tiny.en; the profile's GPU-node values exceed the CI node.
CI_MEM_MB = 2000
TIMEOUT_S = 1200


def ci_profile(dest: Path) -> Path:
    """profiles/slurm, filled in for the CI cluster, with these changes only:

    - slurm_partition / slurm_account: the placeholders filled in, as docs/slurm.md tells a user to;
    - gpu: 0 for the GPU rules and no gpu_model: the CI node has no GPU (everything runs on its CPUs);
    - mem_mb: CI_MEM_MB everywhere: the profile asks for a GPU node's memory, which sbatch refuses here;
    - cpus_per_task: 1 for every job: the profile's 8 CPUs do not exist on a 2-CPU node, and with one each,
      independent jobs (the two experts) run side by side as on a real cluster. The stages keep their
      rules' threads (the node binds no CPUs: TaskPlugin=task/none), as in the local run;
    - hardware file and threads as profiles/cpu has them, so both runs compute the same thing (batch sizes,
      precision and thread counts are stage settings; GPU batch sizes and bf16 would differ by design);
    - the first status check 1 s after a job ends (the plugin adds 10 s per check after that) and SLURM
      logs kept: a quicker test that can be debugged.
    Everything else (executor, jobs, retries, runtime, latency-wait, ...) is the profile's own.
    """
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    profile["config"] = [
        "hardware=profiles/cpu/hardware.yaml" if str(item).startswith("hardware=") else item
        for item in profile["config"]
    ]
    profile.pop("set-threads", None)
    defaults = profile.setdefault("default-resources", {})
    defaults.update({"slurm_partition": PARTITION, "slurm_account": ACCOUNT, "mem_mb": CI_MEM_MB, "cpus_per_task": 1})
    per_rule = profile.setdefault("set-resources", {})
    for rule in GPU_RULES:
        per_rule.setdefault(rule, {})["gpu"] = 0
    for resources in per_rule.values():
        resources.pop("gpu_model", None)
        for name, value in (("mem_mb", CI_MEM_MB), ("cpus_per_task", 1)):
            if name in resources:
                resources[name] = value
    profile["slurm-init-seconds-before-status-checks"] = 1
    profile["slurm-keep-successful-logs"] = True
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


class Run:
    """One workflow run in workdir, started in the background; its combined output goes to workdir/<name>.log."""

    def __init__(self, workdir: Path, *args: str, name: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.name, self.log_path = workdir, name, workdir / f"{name}.log"
        self.cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args, TARGET]
        self.start = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, text=True)

    def wait(self) -> str:
        """The run's output once it finished; a failed run raises with its last lines and SLURM logs."""
        try:
            code = self.proc.wait(timeout=TIMEOUT_S - (time.monotonic() - self.start))
        except subprocess.TimeoutExpired:
            self.stop()
            code = "timeout"
        text = self.log_path.read_text()
        print(f"{self.name} run: {time.monotonic() - self.start:.0f}s: {' '.join(self.cmd)}")
        if code != 0:
            slurm_logs = sorted((self.workdir / ".snakemake" / "slurm_logs").rglob("*.log"), key=os.path.getmtime)
            tails = "".join(f"\n--- {p}\n{p.read_text()[-1500:]}" for p in slurm_logs[-3:])
            raise AssertionError(f"{' '.join(self.cmd)} failed ({code}):\n{text[-6000:]}{tails}")
        return text

    def stop(self) -> None:
        """Interrupt the run (Snakemake then cancels its SLURM jobs with scancel)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def finished_rules(log: str) -> dict[int, str]:
    """Snakemake job id -> rule, for every job the run finished."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"Finished jobid: (\d+) \(Rule: (\w+)\)", log)}


def sacct_jobs(run_id: str) -> list[dict[str, str]]:
    """The SLURM jobs of one workflow run (the plugin names every job after the run's id)."""
    fields = ("JobIDRaw", "JobName", "Comment", "State", "Account", "Partition", "ExitCode", "Start", "End")
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--name", run_id, "-S", "now-1days", "-E", "now", "-o", ",".join(fields)],
        capture_output=True, text=True, check=True,
    ).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line.strip()]


def without_timing(value):
    """metrics.json minus wall-clock fields (decode_seconds, ...), which differ between any two runs."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    assert shutil.which("sbatch") and shutil.which("sacct"), "SLURM client commands missing: run .ci/slurm_setup.sh"
    root = tmp_path_factory.mktemp("slurm_quick")
    profile = ci_profile(root / "profile")
    slurm_dir, local_dir = root / "slurm", root / "local"
    # Both at once: the SLURM run mostly waits (job start-up, the plugin's status polling), so the local
    # run fits in its gaps. Each generates its own corpus and model (byte-identical for one seed).
    slurm = Run(slurm_dir, "--profile", str(profile), name="slurm")
    try:
        local_log = Run(local_dir, "--profile", str(REPO / "profiles" / "cpu"), "--cores", "2", name="local").wait()
    except BaseException:
        slurm.stop()
        raise
    slurm_log = slurm.wait()
    run_id = re.search(r"SLURM run ID: (\S+)", slurm_log).group(1)
    return {"slurm_dir": slurm_dir, "local_dir": local_dir, "slurm_log": slurm_log, "local_log": local_log,
            "run_id": run_id, "sacct": sacct_jobs(run_id)}


def test_every_job_was_a_slurm_job(runs):
    log = runs["slurm_log"]
    jobs = finished_rules(log)
    submitted = {int(j): s for j, s in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)}
    # Snakemake announces a job it runs itself as "localrule"/"localcheckpoint", one it submits as "rule". Only
    # base_model runs on the submitting host: the one job allowed to reach the model hub (compute nodes may
    # have no internet); every other job goes through sbatch.
    local = re.findall(r"^local(?:rule|checkpoint) (\w+):", log, re.MULTILINE)
    assert jobs and local == ["base_model"], local
    assert set(submitted) == {j for j, rule in jobs.items() if rule != "base_model"}, (sorted(submitted), jobs)
    assert len(set(submitted.values())) == len(submitted), "two Snakemake jobs shared one SLURM job"
    # Every SLURM job of this run is in the accounting database, finished, in the filled-in partition and
    # account, labelled by the plugin with its rule (and wildcards).
    by_id = {row["JobIDRaw"]: row for row in runs["sacct"]}
    assert set(by_id) == set(submitted.values()), (sorted(by_id), sorted(submitted.values()))
    for jobid, slurm_id in submitted.items():
        row = by_id[slurm_id]
        assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", row
        assert (row["Partition"], row["Account"]) == (PARTITION, ACCOUNT), row
        assert re.fullmatch(rf"rule_{jobs[jobid]}(_wildcards_.+)?", row["Comment"]), (jobs[jobid], row)
    # The whole pipeline, generated corpus and converted model included.
    rules = Counter(jobs.values())
    for rule in ("demo_corpus", "base_model", "prepare_data", "embeddings", "clustering", "gating",
                 "expert_assignment", "experts_manifest", "asr", "eval"):
        assert rules[rule] == 1, (rule, rules)


def test_each_expert_is_its_own_slurm_job(runs):
    clusters = json.loads((runs["slurm_dir"] / "results" / "quick" / "clusters.json").read_text())
    expert_rows = [row for row in runs["sacct"] if row["Comment"].startswith("rule_expert_wildcards_")]
    assert clusters["num_clusters"] >= 2
    assert len(expert_rows) == clusters["num_clusters"], expert_rows
    assert len({row["JobIDRaw"] for row in expert_rows}) == len(expert_rows)
    # The plugin's comment is rule_<rule>_wildcards_<wildcard values joined by _>: run, expert.
    assert sorted(re.fullmatch(r"rule_expert_wildcards_quick_(\d+)", row["Comment"]).group(1)
                  for row in expert_rows) == [str(k) for k in range(clusters["num_clusters"])]
    # Fanned out: every expert job was submitted before the first of them finished (whether they also run
    # at once is up to the cluster's free resources; on the CI node, one CPU each, they do).
    log = runs["slurm_log"]
    expert_jobs = [j for j, rule in finished_rules(log).items() if rule == "expert"]
    first_done = min(log.index(f"Finished jobid: {j} (Rule: expert)") for j in expert_jobs)
    for j in expert_jobs:
        assert log.index(f"Job {j} has been submitted with SLURM jobid") < first_done, j


def test_same_jobs_as_the_local_run(runs):
    slurm = Counter(finished_rules(runs["slurm_log"]).values())
    local = Counter(finished_rules(runs["local_log"]).values())
    assert local == slurm, (local, slurm)


def test_metrics_match_the_local_run(runs):
    slurm_eval = runs["slurm_dir"] / "results" / "quick" / "eval"
    local_eval = runs["local_dir"] / "results" / "quick" / "eval"
    slurm_metrics = json.loads((slurm_eval / "metrics.json").read_text())
    local_metrics = json.loads((local_eval / "metrics.json").read_text())
    assert without_timing(slurm_metrics) == without_timing(local_metrics)
    assert slurm_metrics["overall"]["n"] > 0 and slurm_metrics["experts_used"] >= 1
    # The same hypothesis for every utterance, not just the same totals.
    assert (slurm_eval / "per_utterance.tsv").read_text() == (local_eval / "per_utterance.tsv").read_text()
