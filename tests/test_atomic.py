"""One way to write a file: nothing half-written under a result's name, a full disk said as such, and
resume checkpoints that are checked before they are loaded."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from workflow_scripts import atomic, training
from workflow_scripts.atomic import DiskFullError, atomic_dir, atomic_file, write_json


class Interrupted(RuntimeError):
    pass


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_an_interrupted_file_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"wer": 0.1})
    before = target.read_bytes()
    with pytest.raises(Interrupted), atomic_file(target, "w") as f:
        f.write('{"wer": 0.')
        raise Interrupted
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_an_interrupted_folder_write_leaves_the_old_folder_and_no_temp(tmp_path):
    out = tmp_path / "asr_best"
    with atomic_dir(out) as tmp:
        (tmp / "adapter.bin").write_bytes(b"old")
    with pytest.raises(Interrupted), atomic_dir(out) as tmp:
        (tmp / "adapter.bin").write_bytes(b"new, half")
        raise Interrupted
    assert [p.name for p in out.iterdir()] == ["adapter.bin"]
    assert (out / "adapter.bin").read_bytes() == b"old"
    assert leftovers(tmp_path) == []
    with atomic_dir(out) as tmp:
        (tmp / "other.bin").write_bytes(b"new")
    assert [p.name for p in out.iterdir()] == ["other.bin"]  # replaced whole, not merged
    assert oct(out.stat().st_mode & 0o777) == oct(atomic.DIR_MODE)


def test_written_files_are_readable_by_others(tmp_path):
    write_json(tmp_path / "a.json", {})
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(atomic.FILE_MODE)


def identity() -> dict:
    return {"asr.lr": 0.001, "seed": 1}


def state_at(step: int) -> dict:
    return {"identity": identity(), "trainable": {"w": torch.full((4,), float(step))},
            "loop": {"epoch": 1, "global_step": step}}


def saved_twice(work: Path) -> Path:
    path = work / "resume.pt"
    training.save_resume(path, state_at(1))
    training.save_resume(path, state_at(2))
    return path


def test_resume_checkpoint_keeps_the_previous_one(tmp_path):
    path = saved_twice(tmp_path)
    assert training.read_checkpoint(path)["loop"]["global_step"] == 2
    assert training.read_checkpoint(training.previous_checkpoint(path))["loop"]["global_step"] == 1
    assert training.load_resume(path, identity())["loop"]["global_step"] == 2


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte], ids=["truncated", "corrupted"])
def test_a_damaged_resume_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, damage):
    path = saved_twice(tmp_path)
    damage(path)
    with caplog.at_level(logging.INFO, logger="training"):
        state = training.load_resume(path, identity())
    assert state["loop"]["global_step"] == 1
    assert torch.equal(state["trainable"]["w"], torch.full((4,), 1.0))
    assert f"resume checkpoint {path} is damaged" in caplog.text
    assert f"resuming from {training.previous_checkpoint(path)}" in caplog.text


def test_no_undamaged_checkpoint_starts_fresh_and_says_so(tmp_path, caplog):
    path = saved_twice(tmp_path)
    truncate(path)
    flip_a_byte(training.previous_checkpoint(path))
    with caplog.at_level(logging.INFO, logger="training"):
        assert training.load_resume(path, identity()) is None
    assert caplog.text.count("is damaged") == 2 and "starting fresh" in caplog.text


def test_a_write_error_of_a_full_disk_keeps_the_last_checkpoint_and_says_disk_full(tmp_path, monkeypatch):
    """A write hook: the filesystem reports ENOSPC when the data is flushed (as NFS and quotas do)."""
    path = saved_twice(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(DiskFullError, match="disk full while writing .*resume.pt"):
        training.save_resume(path, state_at(3))
    monkeypatch.undo()
    assert training.load_resume(path, identity())["loop"]["global_step"] == 2
    assert leftovers(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root, as in CI); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; the write-hook test covers the same path")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_that_fills_up_during_a_checkpoint_write_keeps_the_last_checkpoint(small_disk):
    path = small_disk / "work" / "resume.pt"
    big = {**state_at(1), "trainable": {"w": torch.zeros(100_000)}}  # about 400 kB
    training.save_resume(path, big)
    with open(small_disk / "filler", "wb") as f:  # leave less room than a checkpoint needs
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        f.write(b"\0" * (free - 100_000))
    with pytest.raises(DiskFullError, match="disk full"):
        training.save_resume(path, {**big, "loop": {"epoch": 1, "global_step": 2}})
    assert training.load_resume(path, identity())["loop"]["global_step"] == 1
    assert leftovers(path.parent) == []
