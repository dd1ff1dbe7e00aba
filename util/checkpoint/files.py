"""File safety for everything this project writes: one atomic file write, one fsync (file and directory), one
atomic directory publish, and the JSON read/write the checkpoint formats share.

A reader (or a crash) sees either the old file/directory or the complete new one, never a partial write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from util.checkpoint.errors import CheckpointError


def fsync_file(path: Path) -> None:
    """Make a written file's contents durable (before a rename publishes it)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable. Best effort: some platforms cannot open or fsync directories
    (Windows), and the rename is still atomic there."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_write(path: Path) -> Iterator[IO[bytes]]:
    """Write `path` via a temp file in the same directory, fsync, and os.replace: readers (and a crash) see
    either the old file or the complete new one. On an exception the temp file is removed and `path` is
    untouched.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with 0o666 honours the umask, unlike tempfile.mkstemp's 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make `tmp` appear as `final` in one rename (replacing an older `final`)."""
    # file contents (and subdirectories' entries: FSDP's optimizer/ shards) durable before the rename publishes them
    for path in sorted(tmp.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_config(path: Path) -> dict[str, Any] | None:
    """A model config file (params.json, config.json) as a dict; None if there is none."""
    if not path.is_file():
        return None
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config fields, got {type(cfg).__name__}")
    return cfg
