import json

import pytest

from model.args import PRESETS, ModelArgs, preset


def test_presets_have_llama_shapes():
    assert preset("7B").hidden_dim == 11008
    assert preset("13B").hidden_dim == 13824
    assert preset("70B").hidden_dim == 28672 and preset("70B").n_kv_heads == 8
    assert preset("1.1B").hidden_dim == 5632
    assert PRESETS["tiny"].n_kv_heads < PRESETS["tiny"].n_heads  # tiny exercises grouped-query attention


def test_from_json_merges_later_files_win(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1}))
    (tmp_path / "lora.json").write_text(json.dumps({"lora_rank": 8, "n_layers": 3}))
    args = ModelArgs.from_json(tmp_path / "params.json", tmp_path / "lora.json")
    assert (args.dim, args.n_layers, args.lora_rank, args.vocab_size) == (64, 3, 8, -1)
    assert args.n_kv_heads == 4  # defaults to n_heads
    assert args.with_vocab_size(100, source="tok").vocab_size == 100


def test_unknown_key_names_key_and_file(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4}))
    (tmp_path / "extra.json").write_text(json.dumps({"lora_rnak": 8}))
    with pytest.raises(ValueError, match=r"extra\.json.*lora_rnak"):
        ModelArgs.from_json(tmp_path / "params.json", tmp_path / "extra.json")


def test_bad_json_and_missing_file(tmp_path):
    (tmp_path / "bad.json").write_text("{dim: 64")
    with pytest.raises(ValueError, match="bad.json"):
        ModelArgs.from_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ModelArgs.from_json(tmp_path / "nope.json")


def test_inconsistent_shapes_are_rejected():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size=100"):
        ModelArgs(dim=64, n_heads=4, vocab_size=100).with_vocab_size(200, source="tokenizer.model")
