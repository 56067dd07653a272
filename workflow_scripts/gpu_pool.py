"""One GPU per job on a multi-GPU node: `python -m workflow_scripts.gpu_pool --gpus N -- CMD ARGS...`.

Snakemake's `gpu` resource only counts GPUs; it sets no `CUDA_VISIBLE_DEVICES`, so every job on a node
would use GPU 0. This wrapper takes N free ids of the node's pool, sets `CUDA_VISIBLE_DEVICES` to them
and execs CMD. Each id is an `flock` on one file in a lock folder shared by every workflow of the user on
the machine. The lock file descriptors survive the exec, so the job process itself (same PID, the one
Snakemake kills) holds the locks, and the kernel drops them when it exits, SIGKILL included; forked
children (DataLoader workers, torchrun ranks) hold them too, which keeps a GPU taken while anything of
the job still runs on it. When too few ids are free the wrapper waits (Snakemake's `--resources gpu=N`
normally prevents that), saying on stderr which ids are busy and by which PID.

The pool, first match wins:
  - SLURM gave the job GPUs: its `CUDA_VISIBLE_DEVICES`. With at most N of them they are the job's own
    and are kept as they are, without locks (another SLURM job on the node may see the same numbers for
    other GPUs). With more (Snakemake running several jobs inside one allocation) they are shared
    through locks private to that allocation.
  - `MOE_GPU_POOL`: comma-separated ids (empty: no GPUs, CMD runs unchanged);
  - the `CUDA_VISIBLE_DEVICES` the workflow was started with;
  - the GPUs `nvidia-smi -L` lists (no torch import: the wrapper runs before every GPU job);
  - none: a CPU machine, CMD runs unchanged.
Lock folder: `MOE_GPU_LOCK_DIR`, else `${TMPDIR:-/tmp}/moe-whisper-gpus-<uid>`.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Variables slurmd sets for a job or step it allocated GPUs to.
SLURM_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
POLL_S = 0.5
# A job waiting for a GPU says so again after this long, so a stuck queue shows in its log.
REPEAT_WAIT_LOG_S = 600


def say(message: str) -> None:
    print(f"gpu_pool: {message}", file=sys.stderr, flush=True)


def split_ids(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def nvidia_smi_ids() -> list[str]:
    """Indices of the GPUs `nvidia-smi -L` lists ("GPU 0: NVIDIA H200 (UUID: ...)"); none without a driver."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)


@dataclass(frozen=True)
class Pool:
    ids: list[str]
    lock_dir: Path | None  # None: use the ids as they are, take no locks
    origin: str
    # nvidia-smi numbers GPUs by PCI bus; CUDA's default order may differ, and the ids must mean the same GPUs.
    pci_order: bool = False


def find_pool(gpus: int, env: Mapping[str, str]) -> Pool:
    uid = os.getuid()
    lock_root = Path(env.get("MOE_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"moe-whisper-gpus-{uid}")
    if env.get("SLURM_JOB_ID") and any(env.get(var) for var in SLURM_GPU_VARS):
        ids = split_ids(env.get("CUDA_VISIBLE_DEVICES", ""))
        if len(ids) <= gpus:
            return Pool(ids, None, "SLURM")
        return Pool(ids, lock_root / f"slurm-{env['SLURM_JOB_ID']}", "SLURM allocation")
    if "MOE_GPU_POOL" in env:
        return Pool(split_ids(env["MOE_GPU_POOL"]), lock_root, "MOE_GPU_POOL")
    if "CUDA_VISIBLE_DEVICES" in env:
        return Pool(split_ids(env["CUDA_VISIBLE_DEVICES"]), lock_root, "CUDA_VISIBLE_DEVICES")
    return Pool(nvidia_smi_ids(), lock_root, "nvidia-smi", pci_order=True)


def lock_path(lock_dir: Path, gpu: str) -> Path:
    return lock_dir / f"gpu-{gpu.replace('/', '_')}.lock"


def try_take(pool: Pool, gpus: int) -> tuple[list[tuple[str, int]], list[str]]:
    """(id, locked fd) for `gpus` free ids of the pool, lowest first, or none when fewer are free (all or
    nothing: holding some ids while waiting for more could deadlock two multi-GPU jobs); and the busy ids."""
    taken, busy = [], []
    for gpu in pool.ids:
        fd = os.open(lock_path(pool.lock_dir, gpu), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            busy.append(gpu)
            continue
        taken.append((gpu, fd))
        if len(taken) == gpus:
            return taken, busy
    for _, fd in taken:
        os.close(fd)
    return [], busy


def holder(pool: Pool, gpu: str) -> str:
    """The PID that holds an id, as its holder wrote it into the lock file (for the wait message)."""
    try:
        return lock_path(pool.lock_dir, gpu).read_text().strip() or "?"
    except OSError:
        return "?"


def acquire(pool: Pool, gpus: int) -> list[tuple[str, int]]:
    """Wait until `gpus` ids are free and lock them; the fds stay open and are inherited across exec."""
    pool.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    started = last_said = None
    while True:
        taken, busy = try_take(pool, gpus)
        if taken:
            break
        now = time.monotonic()
        if last_said is None or now - last_said >= REPEAT_WAIT_LOG_S:
            said = ", ".join(f"{gpu} (pid {holder(pool, gpu)})" for gpu in busy)
            say(f"waiting for {gpus} free GPU(s) of {','.join(pool.ids)}; busy: {said}")
            last_said = now
            started = now if started is None else started
        time.sleep(POLL_S)
    if started is not None:
        say(f"waited {time.monotonic() - started:.0f} s")
    for _, fd in taken:
        # exec keeps the PID, so this names the job process for as long as it holds the id.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.set_inheritable(fd, True)
    return taken


def prepare(gpus: int, env: dict[str, str]) -> list[tuple[str, int]]:
    """Set `env`'s CUDA_VISIBLE_DEVICES for a job of `gpus` GPUs; returns the locks it took (held open)."""
    if gpus <= 0:
        return []
    pool = find_pool(gpus, env)
    if not pool.ids:
        say(f"no GPUs found ({pool.origin}); running unchanged")
        return []
    if len(pool.ids) < gpus and pool.lock_dir is not None:
        raise SystemExit(f"gpu_pool: the job needs {gpus} GPUs, the pool has {len(pool.ids)}: {','.join(pool.ids)}")
    if pool.lock_dir is None:
        if len(pool.ids) < gpus:  # snakemake-executor-plugin-slurm issue #459: fewer GPUs visible than asked
            say(f"warning: the job asked for {gpus} GPUs, SLURM shows {len(pool.ids)}")
        say(f"CUDA_VISIBLE_DEVICES={','.join(pool.ids)} (assigned by SLURM, no lock taken)")
        return []
    taken = acquire(pool, gpus)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu for gpu, _ in taken)
    if pool.pci_order:
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    say(f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} (pool {','.join(pool.ids)} from {pool.origin}, "
        f"locks in {pool.lock_dir})")
    return taken


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the job needs (its Snakemake `gpu` resource)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...: run with the GPUs taken")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run (give it after --)")
    env = dict(os.environ)
    prepare(args.gpus, env)
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        raise SystemExit(f"gpu_pool: cannot run {command[0]}: {e}") from e


if __name__ == "__main__":
    main()
