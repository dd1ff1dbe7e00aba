"""util.output_dir: one run per output directory (a real flock between real processes), and the checks made before
a run writes anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.finetune_env import REPO
from util import output_dir as out_lock

HOLD = (
    "import sys, time; from util import output_dir as o\n"
    "o.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)"
)


def _try_in_another_process(path) -> subprocess.CompletedProcess:
    code = "import sys; from util import output_dir as o; o.acquire(sys.argv[1]); print('acquired')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=60)


def test_the_lock_is_exclusive_between_processes_and_names_the_holder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            out_lock.OutputDirInUse, match=f"{tmp_path} is in use by another run \\(pid {holder.pid} on"
        ):
            out_lock.acquire(tmp_path)
        assert not out_lock.held(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    out_lock.acquire(tmp_path)  # the kernel released it with the process (kill -9 included)
    out_lock.release(tmp_path)


def test_the_lock_is_reentrant_in_one_process_and_released_with_the_last_holder(tmp_path):
    with out_lock.locked(tmp_path):
        with out_lock.locked(tmp_path / "."):  # the same directory, spelled differently
            assert out_lock.held(tmp_path)
        assert out_lock.held(tmp_path) and "in use by another run" in _try_in_another_process(tmp_path).stderr
    assert not out_lock.held(tmp_path)
    assert _try_in_another_process(tmp_path).stdout.strip() == "acquired"


def test_check_writable_names_the_directory_and_the_space_needed(tmp_path, monkeypatch):
    out_lock.check_writable(tmp_path / "new" / "dir", need_bytes=1)
    assert (tmp_path / "new" / "dir").is_dir() and not list((tmp_path / "new" / "dir").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=f"output directory {tmp_path / 'file' / 'o'} is not writable"):
        out_lock.check_writable(tmp_path / "file" / "o")
    with pytest.raises(OSError, match=r"free on its disk, the checkpoints of this run need about 1024.00 GiB"):
        out_lock.check_writable(tmp_path, need_bytes=1 << 40)
