"""bench/qlora_step.py: the saved-for-backward tally, and the torchtune flows' own interpreter (harness.spawn's
python=) and their "not installed" record where torchtune is missing."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402
import qlora_step  # noqa: E402


def test_saved_tensors_counts_each_activation_storage_once_and_leaves_parameters_out():
    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(8, 32, requires_grad=True)

    def step():
        h = x @ w.t()  # saves x and w (a view of the parameter: left out)
        y = h * h  # saves h twice over: one storage
        y.float().sum().backward()

    r = qlora_step._saved_tensors(step, rows=5)
    assert r["saved_bytes"] == x.nbytes + 8 * 64 * 4
    assert r["saved_tensors"] == 2
    assert r["saved_params_skipped"] == 1
    assert r["saved_by_dtype"] == {"float32": x.nbytes + 8 * 64 * 4}
    assert sorted(row[0] for row in r["saved_top"]) == [[8, 32], [8, 64]]


def test_spawn_runs_the_child_with_the_given_interpreter(tmp_path):
    # a wrapper "interpreter" that records that it ran, then runs the real one: the child must come through it
    marker = tmp_path / "ran"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\necho yes > {marker}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    script = tmp_path / "child.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(BENCH)!r})\nimport harness\nharness.emit('x', {{}})\n")
    session = harness.Session("test", str(script), results_dir=str(tmp_path / "results"), timeout=60)
    assert session.spawn("x", [], python=str(wrapper))["status"] == "ok"
    assert marker.read_text().strip() == "yes"
    os.remove(marker)
    assert session.spawn("x", [])["status"] == "ok" and not marker.exists()  # default: this interpreter


@pytest.mark.skipif(importlib.util.find_spec("torchtune") is not None, reason="torchtune is installed here")
def test_the_torchtune_flow_says_not_installed_and_how_to_fix_it(tmp_path):
    session = harness.Session("test", str(BENCH / "qlora_step.py"), results_dir=str(tmp_path / "results"), timeout=120)
    r = session.spawn("torchtune", ["--shape", "tiny", "--steps", "1"])
    assert r["status"] == "not installed", r
    assert "--torchtune-python" in r["error"] and "bench/README.md" in r["error"]
