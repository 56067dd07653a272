"""One GPU per job: `python -m workflow_scripts.gpu_pool` on a fake pool of three ids (MOE_GPU_POOL=0,1,2).

Each job here is a real process started through the wrapper, as a rule's shell command starts it; it
prints the CUDA_VISIBLE_DEVICES it got and holds its GPU until its stdin closes. On the CPU nothing reads
the ids, so the same pool also runs the real workflow: concurrent expert jobs get distinct ids.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_workflow import CPU_PROFILE, REPO, TEST_RUN, snakemake, write_runs

# Prints its CUDA_VISIBLE_DEVICES ("unset" without one), then runs until its stdin closes.
JOB = "import os, sys; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'), flush=True); sys.stdin.read()"
START_S = 30  # a job's start under load: two Python start-ups


@pytest.fixture
def pool(tmp_path, monkeypatch) -> Path:
    """A fake pool of three GPU ids with its own lock folder, on a machine that is not a SLURM job."""
    for var in ("SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MOE_GPU_POOL", "0,1,2")
    monkeypatch.setenv("MOE_GPU_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


@pytest.fixture
def jobs():
    """Starts wrapped jobs; whatever is still running at the end is killed."""
    started: list[subprocess.Popen] = []

    def start(gpus: int = 1, **env: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "workflow_scripts.gpu_pool", "--gpus", str(gpus), "--", sys.executable, "-c", JOB]
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def visible(proc: subprocess.Popen, timeout: float = START_S) -> str | None:
    """The CUDA_VISIBLE_DEVICES the job started with, or None if it has not started within `timeout`."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    return proc.stdout.readline().strip()


def finish(proc: subprocess.Popen) -> str:
    """Lets a job end; its stderr (the wrapper's lines)."""
    _, stderr = proc.communicate(input="", timeout=START_S)
    return stderr


def test_concurrent_jobs_get_distinct_gpus_and_a_fourth_waits_for_one(pool, jobs):
    first = {visible(p): p for p in [jobs() for _ in range(3)]}
    assert sorted(first) == ["0", "1", "2"]

    fourth = jobs()
    assert visible(fourth, timeout=3) is None  # all three taken: it waits rather than share one
    finish(first["1"])
    assert visible(fourth) == "1"
    assert re.search(r"waiting for 1 free GPU\(s\) of 0,1,2; busy: 0 \(pid \d+\), 1 \(pid \d+\), 2", finish(fourth))


def test_a_killed_jobs_gpu_returns_to_the_pool_at_once(pool, jobs):
    victim = {visible(p): p for p in [jobs() for _ in range(3)]}["1"]
    # The wrapper execs the job, so the PID Snakemake would kill is the one holding the GPU.
    assert (pool / "gpu-1.lock").read_text().strip() == str(victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    after = jobs()
    assert visible(after, timeout=START_S) == "1"
    assert "waiting" not in finish(after)


def test_a_multi_gpu_job_takes_several_ids_all_or_none(pool, jobs):
    single = jobs()
    assert visible(single) == "0"
    pair = jobs(gpus=2)
    assert visible(pair) == "1,2"
    another_pair = jobs(gpus=2)
    assert visible(another_pair, timeout=3) is None  # only id 0 free: it takes nothing and waits
    finish(single)
    assert visible(another_pair, timeout=3) is None  # 0 free, 1 and 2 still held
    finish(pair)
    assert visible(another_pair) == "0,1"


def test_a_job_needing_more_gpus_than_the_pool_fails_with_a_reason(pool, jobs):
    proc = jobs(gpus=4)
    _, stderr = proc.communicate(timeout=START_S)
    assert proc.returncode != 0
    assert "needs 4 GPUs, the pool has 3" in stderr


def test_slurm_assignment_is_kept_and_takes_no_lock(pool, jobs):
    scheduler = {"SLURM_JOB_ID": "4242", "SLURM_STEP_GPUS": "5", "CUDA_VISIBLE_DEVICES": "0"}
    a, b = jobs(**scheduler), jobs(**scheduler)
    # Two jobs on one node each see their own GPU as 0 (cgroups renumber): both keep it, neither waits.
    assert visible(a) == "0" and visible(b) == "0"
    assert "assigned by SLURM, no lock taken" in finish(a)
    assert not pool.exists()


def test_a_slurm_allocation_with_more_gpus_is_shared_one_per_job(pool, jobs):
    """Snakemake started inside `salloc --gpus=2` runs its jobs in that allocation: one of its GPUs each."""
    allocation = {"SLURM_JOB_ID": "77", "SLURM_JOB_GPUS": "4,6", "CUDA_VISIBLE_DEVICES": "0,1"}
    a, b = jobs(**allocation), jobs(**allocation)
    assert sorted([visible(a), visible(b)]) == ["0", "1"]
    assert (pool / "slurm-77").is_dir()


@pytest.mark.parametrize(("gpus", "env"), [(1, {"MOE_GPU_POOL": ""}), (0, {})])
def test_no_pool_or_no_gpu_leaves_the_environment_alone(pool, jobs, gpus, env):
    proc = jobs(gpus=gpus, **env)
    assert visible(proc) == "unset"
    finish(proc)


def test_concurrent_expert_jobs_of_the_workflow_get_distinct_gpus(tmp_path, pool, tiny_corpus):
    """The real Snakefile through expert pretraining, two expert jobs at once (one thread each on two cores).
    The corpus is the session's (the rule would generate the same one again)."""
    write_runs(tmp_path, {"t": {**TEST_RUN, "dataset_root": str(tiny_corpus)}})
    proc = snakemake(tmp_path, *CPU_PROFILE, "results/t/experts/manifest.json", "--set-threads", "expert=1")
    out = proc.stdout + proc.stderr
    starts = [m.start() for m in re.finditer(r"rule expert:", out)]
    finishes = [m.start() for m in re.finditer(r"Finished jobid: \d+ \(Rule: expert\)", out)]
    assert len(starts) == 2 and max(starts) < min(finishes), "the two expert jobs did not run at the same time"

    logs = sorted((tmp_path / "results" / "t" / "logs").glob("expert_[0-9]*.log"))
    ids = [re.search(r"^gpu_pool: CUDA_VISIBLE_DEVICES=(\S+)", log.read_text(), re.MULTILINE).group(1) for log in logs]
    assert len(ids) == 2 and len(set(ids)) == 2, ids
    # Every GPU rule of the run goes through the pool, not only the experts.
    for stage in ("embeddings", "expert_assignment"):
        assert "gpu_pool: CUDA_VISIBLE_DEVICES=" in (tmp_path / "results" / "t" / "logs" / f"{stage}.log").read_text()
