"""A training stage's work folder: one run at a time (a second one stops at once, naming the holder), free
again as soon as the holder dies, even by SIGKILL; removed once the output is published unless keep_work;
only the newest epoch saves kept while it runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_scripts import asr
from workflow_scripts.settings import default_run
from workflow_scripts.work_lock import LOCK_NAME, WorkDirBusy, work_dir_lock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HOLD = ("import sys; from workflow_scripts.work_lock import work_dir_lock\n"
        "with work_dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n")


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/work's lock until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "work")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline() == "locked\n"
    yield proc
    proc.kill()
    proc.wait()


# Each stage's command line as the rules give it (the files need not exist: the lock comes first).
STAGE_COMMANDS = {
    "asr": ["workflow_scripts.asr", "--train", "t.json", "--val", "v.json", "--base-model", "m", "--out", "out",
            "--settings", "{}"],
    "experts train": ["workflow_scripts.experts", "train", "--expert", "0", "--assignment", "a.json",
                      "--base-model", "m", "--out", "out", "--settings", "{}"],
    "compare train": ["workflow_scripts.compare", "train", "--variant", "lora_same_params", "--train", "t.json",
                      "--val", "v.json", "--base-model", "m", "--out", "out", "--settings", "{}"],
    "embeddings": ["workflow_scripts.embeddings", "--utterances", "u.json", "--base-model", "m", "--out-dir", "out",
                   "--settings", "{}"],
}


@pytest.mark.parametrize("stage", list(STAGE_COMMANDS))
def test_a_second_run_on_a_work_dir_stops_at_once_naming_the_holder(stage, holder, tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", *STAGE_COMMANDS[stage], "--work-dir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
    assert proc.returncode == 1
    # One line, no traceback: the stage, the folder, who holds it and what to do.
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{stage}: {work} is in use by another run (PID {holder.pid} on host {socket.gethostname()}, lock file "
        f"{work / LOCK_NAME}): wait for it to finish or stop that process, or give this run another --work-dir")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in work.iterdir()) == [LOCK_NAME]


def test_the_lock_is_free_once_its_holder_is_killed(holder, tmp_path):
    with pytest.raises(WorkDirBusy, match=f"PID {holder.pid} "):
        with work_dir_lock(tmp_path / "work"):
            pass
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock with the process
    holder.wait()
    with work_dir_lock(tmp_path / "work"):
        assert (tmp_path / "work" / LOCK_NAME).read_text().split()[0] == str(os.getpid())


def test_a_published_stage_removes_its_work_dir_unless_kept(utterance_files, tiny_random, tmp_path):
    s = default_run()
    s.update(base_model="tiny-random", encoder_window_s=10, num_experts=2, skip_pretraining=True, seed=3)
    s["lora"].update(r=4, alpha=8)
    s["asr"].update(epochs=3, batch_size=4)
    s["training"].update(select_best_by="loss", save_every_n_epochs=1, keep_epoch_saves=2, keep_work=True)
    train, val = utterance_files / "train.json", utterance_files / "val.json"
    kept = tmp_path / "kept_work"
    (kept / "epoch_9").mkdir(parents=True)  # left by an abandoned run with other settings
    asr.train(train, val, str(tiny_random), tmp_path / "kept", kept, s)
    # While it ran, each new save removed the oldest: the last two are left, with the resume checkpoint.
    assert sorted(p.name for p in kept.glob("epoch_*")) == ["epoch_2", "epoch_3"]
    assert (kept / "resume.pt").is_file() and (kept / "metrics.jsonl").is_file()

    s["asr"]["epochs"] = 1
    s["training"]["keep_work"] = False
    (tmp_path / ".work.removing-999" / "best").mkdir(parents=True)  # a removal that a kill cut short
    asr.train(train, val, str(tiny_random), tmp_path / "out", tmp_path / "work", s)
    assert not (tmp_path / "work").exists() and not list(tmp_path.glob(".work.removing-*"))
    # What a user looks at after the run was published with the model before the folder went.
    out = tmp_path / "out"
    assert json.loads((out / "training.json").read_text())["best_epoch"] == 1
    assert (out / "metrics.jsonl").is_file() and list((out / "tensorboard").glob("events.out.tfevents*"))
