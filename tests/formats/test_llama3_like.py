"""The newcomer's path from the README: scripts/make_llama3_like.py writes a Llama 3.x-shaped Hugging Face
directory that transformers loads; convert.py exports it to HF and GGUF. Parity with transformers on this directory
needs llama3 RoPE scaling and tied embeddings read from config.json (util/hf_config.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import gguf as gguf
import pytest
import torch
import transformers as transformers

from util.build import build_model
from util.export import convert
from util.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import make_llama3_like  # noqa: E402

SHAPE = [
    "--dim",
    "64",
    "--n_layers",
    "2",
    "--n_heads",
    "4",
    "--n_kv_heads",
    "2",
    "--head_dim",
    "16",
    "--intermediate_size",
    "160",
    "--vocab_size",
    "400",
    "--max_seq_len",
    "256",
]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("l3") / "llama3-like"
    assert make_llama3_like.main(["--out", str(out), *SHAPE]) == 0
    return out


def _tokens() -> torch.Tensor:
    return torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))


def _hf(path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(_tokens()).logits


def test_the_directory_is_what_a_llama3_release_looks_like(llama3_dir):
    config = json.loads((llama3_dir / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 500000.0
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    hf_config = transformers.AutoConfig.from_pretrained(llama3_dir)
    assert hf_config.tie_word_embeddings
    tok = transformers.AutoTokenizer.from_pretrained(llama3_dir)
    ours = Tokenizer(llama3_dir / "tokenizer.model")
    for s in ["What is the opposite of hot?", "Line one\nLine two", "ünïcode 🙂"]:
        assert tok(s)["input_ids"] == ours.encode(s, bos=True)


def test_exports_to_hf_and_gguf(llama3_dir, tmp_path):
    hf = convert([llama3_dir], to="hf", out=tmp_path / "hf", dtype="float32")
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    out = convert([llama3_dir], to="gguf", out=tmp_path / "gguf", quant="q8_0")
    reader = gguf.GGUFReader(out / "model.gguf")
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp uses token_embd
    assert reader.fields["llama.rope.freq_base"].contents() == 500000.0


def test_our_model_and_the_exports_match_transformers_on_it(llama3_dir, tmp_path):
    reference = _hf(llama3_dir)
    model, _ = build_model(None, [llama3_dir], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()), reference, rtol=0, atol=2e-5)
    hf = convert([llama3_dir], to="hf", out=tmp_path / "hf", dtype="float32")
    assert json.loads((hf / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    torch.testing.assert_close(_hf(hf), reference, rtol=0, atol=2e-5)
    out = convert([llama3_dir], to="gguf", out=tmp_path / "gguf", quant="f32")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(out / "model.gguf").tensors}


def _walkthrough_commands() -> list[list[str]]:
    """The README's "From a Llama 3.x-shaped directory to llama.cpp" commands, as argv lists (continuations joined,
    comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split("### From a Llama 3.x-shaped directory to llama.cpp", 1)[1].split("```bash\n", 1)[1]
    block = block.split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    """A newcomer's path, with the README's own commands in a fresh directory: make the Llama 3.x-shaped directory,
    QLoRA fine-tune it (2 steps here), chat with base + delta, export to Hugging Face and GGUF; the HF export loads
    in transformers and the GGUF file in gguf's reader."""
    for d in ("configs", "data"):
        (tmp_path / d).symlink_to(REPO / d)
    tiny_run = "--max_iters 2 --batch_size 2 --max_words 64 --num_workers 0 --save_interval 0 --no_tensorboard"
    extra = {"main_finetune.py": shlex.split(tiny_run), "demo.py": ["--prompt", "Name a colour.", "--temperature", "0"]}
    commands = _walkthrough_commands()
    assert [c[1] for c in commands] == [
        "scripts/make_llama3_like.py",
        "main_finetune.py",
        "demo.py",
        "scripts/convert.py",
        "scripts/convert.py",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in commands:
        assert argv[0] == "python"
        script = argv[1]
        cmd = [sys.executable, str(REPO / script), *argv[2:], *extra.get(Path(script).name, [])]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, (argv, r.stderr[-3000:])
        if script == "demo.py":
            assert r.stdout.strip(), r.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "llama3-hf")
    assert model.config.rope_scaling["rope_type"] == "llama3" and model.config.tie_word_embeddings
    reader = gguf.GGUFReader(tmp_path / "out" / "llama3-gguf" / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
