"""scripts/convert.py and util.export.convert: --to lazyllama (pre-quantized), the command line, and bad inputs
(named, nothing half-written)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.formats.conftest import our_logits
from util.build import build_model
from util.export import convert

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
import convert as convert_script  # noqa: E402


def test_lazyllama_prequantized_export_loads_without_quantizing(base, delta, export):
    out = export("lazy-4bit", [base[2], delta[1]], to="lazyllama", quant="4bit", dtype="bfloat16")
    model, report = build_model(None, [out], quant="4bit", dtype=torch.bfloat16)
    assert report.prequantized == 14 and report.quantized == 0
    torch.testing.assert_close(
        our_logits([out], quant="4bit", dtype=torch.bfloat16),
        our_logits([base[2], delta[1]], quant="4bit", dtype=torch.bfloat16),
        rtol=0,
        atol=0,
    )


def test_lazyllama_full_export_reloads_exactly(base, delta, export):
    out = export("lazy-full", [base[2], delta[1]], to="lazyllama", dtype="float32")
    torch.testing.assert_close(our_logits([out]), our_logits([base[2], delta[1]]), rtol=0, atol=0)


def test_command_line_writes_gguf(base, tmp_path):
    out = tmp_path / "cli-gguf"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "convert.py"),
            str(base[2]),
            "--to",
            "gguf",
            "--quant",
            "q8_0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and (out / "model.gguf").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{delta}", "--to", "hf"], "are in none of the checkpoints"),
        (["{base}", "--to", "hf", "--quant", "q8_0"], "--quant 'q8_0' is not available for --to hf"),
        (["{base}", "--to", "hf", "--tokenizer_path", "{missing}"], "tokenizer not found"),
        (["{missing}", "--to", "meta"], "no such file or directory"),
        (["{base}", "--to", "gguf", "--shards", "2"], "--shards applies to --to meta"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(base, delta, tmp_path, capsys, argv, message):
    subs = {"base": str(base[2]), "delta": str(delta[1]), "missing": str(tmp_path / "nope")}
    out = tmp_path / "out"
    assert convert_script.main([a.format(**subs) for a in argv] + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # no output, no temp directory left behind


def test_hf_export_needs_a_tokenizer(fmt_dir, base, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in base[2].glob("*"):
        if f.name != "tokenizer.model":
            (bare / f.name).symlink_to(f)
    with pytest.raises(ValueError, match="--tokenizer_path"):
        convert([bare], to="hf", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def finetune_env(tmp_path_factory):
    from tests.finetune_env import make_env

    return make_env(tmp_path_factory.mktemp("ft"))


def test_main_finetune_exports_after_training(finetune_env, tmp_path):
    import main_finetune

    out = tmp_path / "run"
    res = main_finetune.main(finetune_env.argv(out, "--max_iters", "2", "--export", "peft", "meta"))
    assert (out / "export-peft" / "adapter_model.safetensors").is_file()
    exported, trained = our_logits([out / "export-meta"]), our_logits([finetune_env.base, res.final_dir])
    assert (exported - trained).abs().max() < 0.01 * trained.abs().max()  # bf16 weights (convert's default dtype)


def test_main_finetune_refuses_an_unexportable_tokenizer_before_training(finetune_env, tmp_path):
    import main_finetune

    # util.tokenizer.train_tokenizer's models normalize text (sentencepiece's default): not for hf / gguf
    with pytest.raises(ValueError, match="normalizes text"):
        main_finetune.main(finetune_env.argv(tmp_path / "run", "--max_iters", "2", "--export", "hf"))
    assert not (tmp_path / "run" / "final").exists()
