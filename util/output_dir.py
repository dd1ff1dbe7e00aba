"""One run per output directory: an exclusive lock held for the run, and a check that the directory can take the
checkpoints before anything expensive happens.

Two runs writing one --output_dir would delete each other's saves in progress (the stale-temp cleanup) and mix
their logs. The lock is an advisory `flock` on `<dir>/.lock`, which the kernel releases when the process ends
however it ends (kill -9 included), so a crashed run never leaves the directory locked. The file names the holder
(pid, host, start time, command) for the error the next run prints. Within one process the lock is re-entrant:
the entry script and the Trainer it creates share it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from util.memory import fmt_bytes

LOCK_NAME = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected from each other
    fcntl = None

_held: dict[Path, tuple[int, int]] = {}  # resolved directory -> (file descriptor, holders in this process)


class OutputDirInUse(OSError):
    """Another process holds the output directory's lock."""


def _key(path: str | Path) -> Path:
    return Path(path).resolve()


def held(path: str | Path) -> bool:
    """Whether this process holds the lock on `path` (so no other run writes there)."""
    return _key(path) in _held


def acquire(path: str | Path) -> None:
    """Take the lock on directory `path` (created if needed), or raise OutputDirInUse naming the holder."""
    key = _key(path)
    if key in _held:
        fd, count = _held[key]
        _held[key] = (fd, count + 1)
        return
    key.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        _held[key] = (-1, 1)
        return
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise OutputDirInUse(
            f"output directory {key} is in use by another run ({holder}); wait for it to end, or choose another "
            "--output_dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    started = datetime.datetime.now().isoformat(timespec="seconds")
    command = " ".join(sys.argv) or sys.executable
    info = f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _held[key] = (fd, 1)


def release(path: str | Path) -> None:
    key = _key(path)
    if key not in _held:
        return
    fd, count = _held.pop(key)
    if count > 1:
        _held[key] = (fd, count - 1)
    elif fd >= 0:
        os.close(fd)  # releases the flock; the file stays (removing it would race with a run about to lock it)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold the lock on `path` for the block."""
    acquire(path)
    try:
        yield
    finally:
        release(path)


def check_writable(path: str | Path, need_bytes: int = 0) -> None:
    """`path` (created if needed) takes a file, and its disk has `need_bytes` free; else an OSError that says
    what to do. Before the model is built: a read-only or full disk otherwise shows only at the first save."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"output directory {path} is not writable ({e.strerror or e}); choose another --output_dir"
        ) from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OSError(
            f"output directory {path}: {fmt_bytes(free)} free on its disk, the checkpoints of this run need about "
            f"{fmt_bytes(need_bytes)}; free space or choose another --output_dir"
        )
