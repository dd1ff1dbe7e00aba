"""Launch scripts: valid bash, a usage message and a non-zero exit without arguments, and the command they run
(PYTHON / srun replaced by echo)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["finetune.sh", "finetune_multinode.sh", "finetune_slurm.sh", "qlora_7b.sh", "qlora_13b.sh", "qlora_70b.sh"]


def _run(script, *args, **env):
    # not the launcher variables another test's process group left in os.environ
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NGPUS", "MP", "QUANT")}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**base, **env},
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_usage_without_arguments(script):
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / script)]).returncode == 0
    proc = _run(script)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: ") and "CKPT CONFIG TOKENIZER" in proc.stderr
    assert _run(script, "--help", "b", "c").returncode == 2


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "lora.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    return str(tmp_path / "ckpt"), str(tmp_path / "lora.json"), str(tmp_path / "tokenizer.model")


def test_missing_paths_are_named(inputs, tmp_path):
    proc = _run("finetune.sh", inputs[0], str(tmp_path / "nope.json"), inputs[2])
    assert proc.returncode == 2 and f"config not found: {tmp_path / 'nope.json'}" in proc.stderr


def test_qlora_70b_runs_model_parallel_4_and_user_options_win(inputs):
    proc = _run("qlora_70b.sh", *inputs, NGPUS="6", PYTHON="/bin/echo")
    assert proc.returncode == 2 and "multiple of 4 GPUs" in proc.stderr
    proc = _run("qlora_70b.sh", *inputs, "--lr", "1e-4", NGPUS="8", PYTHON="/bin/echo")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[:4] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"] and cmd[4] == "8"
    assert cmd[cmd.index("--model_parallel_size") + 1] == "4" and cmd[cmd.index("--quant") + 1] == "4bit"
    assert cmd[cmd.index("--pretrained_path") + 1] == inputs[0] and cmd[cmd.index("--tokenizer_path") + 1] == inputs[2]
    lrs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--lr"]
    assert lrs == ["2e-4", "1e-4"]  # argparse: the last one (the user's) wins


def test_multinode_and_slurm_commands(inputs, tmp_path):
    proc = _run("finetune_multinode.sh", *inputs, NGPUS="4", PYTHON="/bin/echo")
    assert proc.returncode == 2 and "MASTER_ADDR" in proc.stderr
    proc = _run("finetune_multinode.sh", *inputs, NGPUS="4", PYTHON="/bin/echo", MASTER_ADDR="node0", NNODES="3")
    assert proc.returncode == 0 and "--nnodes 3 --nproc_per_node 4 --rdzv_backend c10d" in proc.stdout
    assert "--rdzv_endpoint node0:29500" in proc.stdout

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\necho srun "$@"\n')
    (fake / "srun").chmod(0o755)
    path = f"{fake}:{os.environ['PATH']}"
    proc = _run("finetune_slurm.sh", *inputs, PATH=path, SLURM_JOB_ID="7", PYTHON="/bin/echo")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("srun --kill-on-bad-exit=1 /bin/echo") and "main_finetune.py" in proc.stdout
