"""One run at a time per work folder, and the work folder gone once the stage's output is published.

Two training jobs on one --work-dir (a stage started by hand while Snakemake runs it, or twice by hand)
would overwrite each other's resume checkpoints and interleave metrics.jsonl. Snakemake's own lock does
not see a job started by hand, so each training stage takes an exclusive `flock` on
`<work-dir>/.lock` for as long as it runs; a second one stops at once, naming the holder's PID and host.
The kernel drops the lock when the holder's last descriptor closes, on any exit, SIGKILL included, so
a crashed run never leaves a stale lock behind (the file stays; only the lock on it counts). Forked
children (DataLoader workers) share the lock until they exit, which they do when their parent dies. On NFS,
Linux emulates flock with byte-range locks, which the server arbitrates between hosts.

The stage removes its work folder (lock file included) once its output is published, while it still
holds the lock; a run that opened the lock file just before that removal finds the file it locked no
longer at that path, and locks the new one instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class WorkDirBusy(RuntimeError):
    """Another process holds the work folder's lock."""


def _holder(fd: int) -> str:
    """Who wrote the lock file last: "PID n on host h" (the holder writes it right after locking)."""
    text = os.pread(fd, 200, 0).decode(errors="replace").split()
    return f"PID {text[0]} on host {text[1]}" if len(text) >= 2 else "a process that has not yet written its PID"


def _lock_current_file(path: Path) -> int:
    """A descriptor holding the exclusive lock on the file now at `path`; WorkDirBusy if another process has it."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise WorkDirBusy(f"{path.parent} is in use by another run ({holder}, lock file {path}): wait for it "
                              "to finish or stop that process, or give this run another --work-dir") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed the folder after publishing: lock what is there now


@contextlib.contextmanager
def work_dir_lock(work_dir: str | os.PathLike, stage: str | None = None) -> Iterator[Path]:
    """Hold `work_dir`'s lock inside the block (the folder is created if needed). If another process holds
    it: WorkDirBusy at once, or with `stage` (a stage's CLI) the process ends with that one line, no traceback."""
    work_dir = Path(work_dir)
    try:
        fd = _lock_current_file(work_dir / LOCK_NAME)
    except WorkDirBusy as err:
        if stage is None:
            raise
        raise SystemExit(f"{stage}: {err}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield work_dir
    finally:
        os.close(fd)


def remove_work_dir(work_dir: str | os.PathLike, keep: bool) -> None:
    """Remove a stage's work folder (resume checkpoints, epoch saves, caches) after its output is published,
    unless `keep` (training.keep_work). Call it while holding the folder's lock.

    The folder is first renamed away in one step: a kill halfway through deleting it in place could leave a
    final resume checkpoint beside a half-deleted best/, which a rerun would publish as its output. Renamed,
    the rerun finds no folder and trains afresh; what a kill left under the temporary name goes next time."""
    if keep:
        return
    work_dir = Path(work_dir)
    for left in work_dir.parent.glob(f".{work_dir.name}.removing-*"):
        shutil.rmtree(left, ignore_errors=True)
    doomed = work_dir.with_name(f".{work_dir.name}.removing-{os.getpid()}")
    try:
        os.replace(work_dir, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)
