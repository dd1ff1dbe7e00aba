"""main_finetune against the faults of issue 13: two runs on one --output_dir, Ctrl-C during training (mid-save),
a read-only or full output disk, and damaged training-state files on --resume."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

import main_finetune
from tests.finetune_env import REPO, make_env, wait_until_paused
from util import output_dir as out_lock
from util.cli import run
from util.train import SAVE_PAUSE_ENV


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("faults_env"))


def _error_line(capsys, argv) -> str:
    assert run(lambda: main_finetune.main(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def interrupted(env, tmp_path_factory):
    """A real run paused in the save of iteration 4 (checkpoints every 2 steps): meanwhile a second run on the same
    --output_dir is started; then the first gets Ctrl-C (SIGINT) while still saving."""
    out = tmp_path_factory.mktemp("interrupted")
    argv = env.argv(out, "--quant", "4bit", "--max_iters", "8", "--save_iteration_interval", "2")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "main_finetune.py"), *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, SAVE_PAUSE_ENV: "4:300", "PYTHONPATH": str(REPO)},
    )
    try:
        wait_until_paused(proc, timeout=120)
        second = subprocess.run(
            [sys.executable, "main_finetune.py", *env.argv(out, "--quant", "4bit", "--max_iters", "2")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        os.kill(proc.pid, signal.SIGINT)  # still inside the save of iteration 4
        rc = proc.wait(timeout=120)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    return out, proc.pid, second, rc, stderr, argv


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(interrupted):
    out, pid, second, *_ = interrupted
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"output directory {out} is in use by another run (pid {pid} on " in errors[0]
    assert "main_finetune.py" in errors[0] and "choose another --output_dir" in errors[0]


def test_the_first_runs_save_survives_and_its_log_is_its_own(interrupted):
    out, *_ = interrupted
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-0000002",
        "checkpoint-0000004",
    ]
    assert not list(out.glob(".tmp-*"))
    logged = [json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # only the first run wrote it


def test_ctrl_c_mid_save_finishes_the_save_and_names_the_resume_command(interrupted, tmp_path):
    out, _, _, rc, stderr, argv = interrupted
    assert rc == 130 and "Traceback" not in stderr and "unexpected pos" not in stderr, stderr[-3000:]
    assert "finishing the checkpoint save first" in stderr
    ckpt = out / "checkpoint-0000004"
    assert f"interrupted at iteration 4 of 8; the last checkpoint is {ckpt}; continue with:" in stderr
    command = stderr[stderr.index("continue with:") :].splitlines()[1].strip()
    assert command.startswith("python main_finetune.py ") and command.endswith(f"--resume {ckpt}")
    resumed = main_finetune.main(shlex.split(command)[2:])  # the printed command continues the run
    assert len(resumed.losses) == 8 and (out / "final" / "params.json").is_file()


def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(env, tmp_path, capsys, monkeypatch):
    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_finetune.Trainer, "fit", interrupt)
    assert main_finetune.main(env.argv(tmp_path, "--quant", "4bit", "--max_iters", "2")) == 130
    assert "interrupted at iteration 0 of 2; no checkpoint was saved" in capsys.readouterr().err


def _not_built(*args, **kwargs):
    raise AssertionError("the model was built")


def test_a_full_output_disk_is_reported_before_the_model_is_built(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main_finetune, "build_model", _not_built)
    monkeypatch.setattr(out_lock.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    error = _error_line(capsys, env.argv(tmp_path / "out", "--quant", "4bit", "--max_iters", "1"))
    assert f"output directory {tmp_path / 'out'}: 1000 B free on its disk" in error and "need about" in error


def test_an_output_dir_that_cannot_be_written_is_reported_before_the_model_is_built(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main_finetune, "build_model", _not_built)
    (tmp_path / "file").write_text("in the way")
    error = _error_line(capsys, env.argv(tmp_path / "file" / "out", "--quant", "4bit", "--max_iters", "1"))
    assert f"{tmp_path / 'file' / 'out'}" in error and "not" in error


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_dir_is_reported_before_the_model_is_built(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main_finetune, "build_model", _not_built)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        error = _error_line(capsys, env.argv(out, "--quant", "4bit", "--max_iters", "1"))
    finally:
        out.chmod(0o755)
    assert f"output directory {out} is not writable" in error


def test_a_truncated_optimizer_file_on_resume_is_one_error_line(interrupted, env, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-0000002"
    shutil.copytree(interrupted[0] / "checkpoint-0000002", ckpt)
    data = (ckpt / "optimizer.mp00.pt").read_bytes()
    (ckpt / "optimizer.mp00.pt").write_bytes(data[:100])
    argv = env.argv(tmp_path / "out", "--quant", "4bit", "--max_iters", "4", "--resume", str(ckpt))
    error = _error_line(capsys, argv)
    assert f"{ckpt / 'optimizer.mp00.pt'}: truncated or corrupt" in error
