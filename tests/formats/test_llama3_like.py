"""The newcomer's path from the README: scripts/make_llama3_like.py writes a Llama 3.x-shaped Hugging Face
directory that transformers loads; convert.py exports it to HF and GGUF. Parity with transformers on this directory
needs llama3 RoPE scaling and tied embeddings read from config.json (util/hf_config.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from util.build import build_model
from util.export import convert
from util.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import make_llama3_like  # noqa: E402

HAS_HF_CONFIG = importlib.util.find_spec("util.hf_config") is not None
needs_hf_config = pytest.mark.skipif(not HAS_HF_CONFIG, reason="llama3 RoPE scaling from config.json: util/hf_config")
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


@needs_hf_config
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
