"""One way to write a result: into a temp name next to it, flushed to disk, then renamed into place.

A job killed mid-write (pre-emption, SIGKILL, power loss) must never leave a half-written file or folder
that a rerun takes as complete. `os.replace` is atomic on POSIX filesystems; the fsync of the data
before the rename and of the directory after it make the new name survive a crash of the machine too,
not only of the process.

A full disk stops the write with :class:`DiskFullError`, which says so; the previous version of the
file or folder is left untouched, because nothing is renamed until the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# Results are meant to be shared (mkstemp/mkdtemp create 0600/0700).
FILE_MODE, DIR_MODE = 0o644, 0o755


class DiskFullError(OSError):
    """The filesystem ran out of space (or quota) while a result was being written."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(err: BaseException) -> bool:
    # Libraries re-raise OSError as their own errors (torch: RuntimeError), so look down the chain.
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _raise_if_disk_full(err: BaseException, path: Path) -> None:
    if _disk_full(err):
        raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}: nothing was replaced, the previous "
                            f"version (if any) is intact. Free space on that filesystem, then rerun the same "
                            f"command to continue from the last checkpoint") from err


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", keep_previous: str | os.PathLike | None = None,
                ) -> Iterator[IO]:
    """Open a temp file next to `path` for writing; on success flush, fsync and rename it to `path`.

    The temp name keeps `path`'s suffix, for libraries that pick a format from the name. With
    `keep_previous`, an existing `path` is first renamed there, so the last good version survives even
    if the new one is later found damaged. On an error nothing is renamed and the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(err, path)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Indented, keys sorted, so the same result gives the same bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temp folder next to `out_dir` to fill; on success every file in it is fsynced and the folder
    replaces `out_dir` (an existing one is moved aside first and removed after). On an error the temp
    folder is removed and `out_dir` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(Path(root))
        os.chmod(tmp, DIR_MODE)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)  # left over from an interrupted earlier save
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        _raise_if_disk_full(err, out_dir)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
