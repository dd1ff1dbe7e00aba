"""bench/harness.py: children run, watched and reported; cached folders reused only while their marker matches."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402

CHILD = f"""
import sys, time
sys.path.insert(0, {str(BENCH)!r})
import harness
mode = sys.argv[sys.argv.index("--child") + 1]
if mode == "ok":
    harness.emit("ok", {{"answer": int(sys.argv[-1]), "wall_s": 0.5}})
elif mode == "raise":
    raise RuntimeError("boom from the child")
elif mode == "grow":
    held = b"x" * (600 << 20)
    time.sleep(60)
elif mode == "sleep":
    time.sleep(60)
elif mode == "reset":  # a stage that resets VmHWM after a peak (what keep_peak_counter prevents in the builds)
    held = b"x" * (300 << 20)
    time.sleep(0.5)
    del held
    harness.reset_hwm()
    harness.emit("reset", {{}})
elif mode == "later":  # the build peak comes first, a bigger one later (a build child's test forward pass)
    peak = harness.hwm()
    held = b"x" * (300 << 20)
    time.sleep(0.5)
    harness.emit("later", {{"peak_rss": peak, "peak_rss_with_forward": harness.hwm()}})
"""


@pytest.fixture
def session(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return harness.Session("test", str(script), results_dir=str(tmp_path / "results"), timeout=30)


def test_a_child_record_comes_back_with_its_peak_and_logs(session, capsys):
    rec = session.spawn("ok", harness.cli_args(value=42))
    assert rec["status"] == "ok" and rec["flow"] == "ok" and rec["answer"] == 42 and rec["rc"] == 0
    assert rec["peak_rss"] > 1 << 20 and rec["sources_sha256"] == harness.sources_digest()
    assert (session.log_dir / "ok.stdout").read_text().startswith(harness.RESULT_TAG)
    assert "[ok] peak RSS" in capsys.readouterr().out


def test_a_child_whose_peak_counter_was_reset_is_flagged(session):
    rec = session.spawn("reset", [])
    assert rec["status"] == "ok" and rec["sampled_peak_rss"] > rec["peak_rss"] + (200 << 20)
    assert "VmHWM was reset" in rec["warning"]
    assert "warning" not in session.spawn("ok", ["7"])
    later = session.spawn("later", [])  # a later peak the child reports itself is no reset
    assert later["sampled_peak_rss"] > later["peak_rss"] + (200 << 20) and "warning" not in later


def test_a_failing_child_is_reported_with_its_exception(session):
    rec = session.spawn("raise", [])
    assert rec["status"] == "failed" and rec["rc"] == 1
    assert rec["error"] == "exit status 1: RuntimeError: boom from the child"
    assert "Traceback" in rec["stderr_tail"]


def test_a_child_past_the_cap_or_the_timeout_is_killed(session):
    session.cap = 300 << 20
    rec = session.spawn("grow", [])
    assert rec["status"] == "failed" and rec["error"].startswith("killed by the bench at RSS"), rec["error"]
    session.cap, session.timeout = 1 << 40, 1
    rec = session.spawn("sleep", [])
    assert rec["error"] == "killed after --timeout 1 s (exit status -9)"


def test_save_writes_the_table_and_the_json_with_the_code_measured(session):
    md, js = session.save("a title", "| a |\n|---|", {"rows": [1]}, argv=["--shape", "tiny"])
    assert md.read_text().startswith("# a title\n\ncommand: `python ") and md.read_text().endswith("| a |\n|---|\n")
    raw = json.loads(js.read_text())
    assert raw["rows"] == [1] and raw["argv"] == ["--shape", "tiny"] and "commit" in raw["code"]


def test_a_marker_is_trusted_only_while_fields_and_file_sizes_match(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"12345")
    harness.write_marker(tmp_path, {"version": 1, "shape": "tiny"})
    assert harness.read_marker(tmp_path, version=1, shape="tiny")["files"] == {"a.safetensors": 5}
    assert harness.read_marker(tmp_path, version=1, shape="7B") is None
    (tmp_path / "a.safetensors").write_bytes(b"123")  # truncated by an interrupted rewrite
    assert harness.read_marker(tmp_path, version=1, shape="tiny") is None


def test_prepare_dir_clears_our_leftovers_and_refuses_foreign_files(tmp_path):
    (tmp_path / "model.safetensors.tmp").write_bytes(b"")
    harness.prepare_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="notes.txt"):
        harness.prepare_dir(tmp_path)


def test_the_synthetic_checkpoint_is_written_once_then_reused(session, tmp_path, capsys):
    from util.checkpoint import open_checkpoint

    ckpt, written = session.synthetic_checkpoint("tiny", tmp_path / "ckpt", seed=3)
    assert written["status"] == "ok"
    shapes = dict(harness.tensor_shapes(harness.preset("tiny")))
    with open_checkpoint(ckpt) as reader:
        assert {k: tuple(reader.read(k).shape) for k in reader.keys()} == shapes
    assert session.synthetic_checkpoint("tiny", ckpt, seed=3) == (ckpt, None)
    assert "reusing" in capsys.readouterr().out
    assert not harness.synthetic_checkpoint_is_complete(ckpt, "tiny", seed=4)


def test_cli_args_and_median_range():
    args = harness.cli_args(shape="tiny", ckpt_dir=Path("/x"), trace=True, cold=False, out=None)
    assert args == ["--shape", "tiny", "--ckpt-dir", "/x", "--trace"]
    assert harness.median_range([3.0, 1.0, 2.0], ".1f") == "2.0 (1.0-3.0)"
    assert harness.median_range([1.25], ".2f") == "1.25" and harness.median_range([], ".1f") == "-"


def test_llama3_presets_have_the_published_parameter_counts():
    """The bench shapes are the real models' (Meta-Llama-3-8B: 8,030,261,248 parameters with its untied head;
    Llama-3.2-1B: 1,235,814,400 with the head tied to the embedding)."""
    assert harness.n_params(harness.preset("llama3-8B")) == 8_030_261_248
    assert harness.n_params(harness.preset("llama3.2-1B")) == 1_235_814_400
