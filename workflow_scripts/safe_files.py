"""Opening files of a dataset someone else made: paths kept inside the dataset, names that JSON can hold, and
nothing but regular files opened.

A SAP tree may come from anywhere, and the data report lists what was skipped. If the reader followed a manifest
`Filename` of `../../etc/shadow` or a speaker folder linked to `/root`, the report would tell its reader whether
arbitrary files exist (and a training list could point at them). A FIFO named `.wav` would hang the reader
forever, and a file name that is not UTF-8 (Linux allows any bytes) cannot be written to a JSON report.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

# What file_kind says of a path.
MISSING, OUTSIDE, NOT_REGULAR, REGULAR = "missing", "outside", "not_regular", "regular"


def shown(path: str | os.PathLike) -> str:
    """`path` as text any JSON or log can hold: bytes that are not UTF-8 shown as `\\xff` escapes."""
    text = os.fspath(path)
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate from a JSON `\\ud800` escape, which has no bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_text(value: str) -> bool:
    """Whether `value` is valid Unicode text (no lone surrogates from undecodable bytes or JSON escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def plain_name(name: str) -> bool:
    """Whether `name` names an entry of its own folder: no separator (a Windows one either), not `.` or `..`."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def inside(real_path: str, bounds: tuple[str, ...]) -> bool:
    """Whether a resolved path lies in one of the resolved folders `bounds`."""
    return any(real_path == b or real_path.startswith(b.rstrip(os.sep) + os.sep) for b in bounds)


def file_kind(path: str, bounds: tuple[str, ...]) -> str:
    """MISSING, OUTSIDE (a link resolving outside `bounds`: not followed further), NOT_REGULAR (a folder, FIFO,
    socket or device) or REGULAR; OSError for what cannot be looked at (permissions, a link loop). Never opens
    `path`. `path` itself is expected inside `bounds` (its folder was checked); only a link can leave."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if not inside(os.path.realpath(path), bounds):
                return OUTSIDE
            st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return MISSING
    return REGULAR if stat.S_ISREG(st.st_mode) else NOT_REGULAR


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading, or OSError when it is not a regular file. Opened non-blocking, so a
    FIFO put in its place after a check cannot hang the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{shown(path)} is not a regular file (a folder, FIFO or device)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
