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


def test_rope_scaling_is_validated_by_type():
    ok = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert ModelArgs(dim=64, n_heads=4, rope_scaling=ok).rope_scaling_params == ok
    for bad, message in [
        ({"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn' is not implemented"),
        ({"rope_type": "linear"}, r"needs \['factor'\]"),
        ({"rope_type": "dynamic", "factor": 2.0}, "original_max_position_embeddings"),
        ({"rope_type": "linear", "factor": 2.0, "beta": 1}, r"does not take \['beta'\]"),
        ({"rope_type": "linear", "factor": -2.0}, "factor=-2.0 must be a positive number"),
        (ok | {"high_freq_factor": 0.5}, "high_freq_factor must be greater"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelArgs(dim=64, n_heads=4, rope_scaling=bad)
    with pytest.raises(ValueError, match="use_scaled_rope.*both set"):
        ModelArgs(dim=64, n_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}, use_scaled_rope=True)


def test_meta_use_scaled_rope_means_llama3_with_metas_constants(tmp_path):
    (tmp_path / "params.json").write_text(
        json.dumps({"dim": 64, "n_heads": 4, "rope_theta": 5e5, "use_scaled_rope": True})
    )
    args = ModelArgs.from_json(tmp_path / "params.json")
    assert args.rope_scaling is None and args.rope_scaling_params == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert args.replace(use_scaled_rope=False).rope_scaling_params is None


def test_head_size_overrides_dim_over_heads():
    assert ModelArgs(dim=64, n_heads=4).head_dim == 16
    assert ModelArgs(dim=64, n_heads=4, head_size=24).head_dim == 24
    assert ModelArgs(dim=60, n_heads=8, head_size=8).head_dim == 8  # dim need not divide when it is given
    with pytest.raises(ValueError, match="head_dim=7 must be even"):
        ModelArgs(dim=64, n_heads=4, head_size=7)
    with pytest.raises(ValueError, match="not divisible by n_heads=8"):
        ModelArgs(dim=60, n_heads=8)


def test_new_fields_survive_to_dict_and_from_dict():
    args = ModelArgs(
        dim=64,
        n_heads=4,
        head_size=24,
        tie_word_embeddings=True,
        eos_token_id=[2, 5],
        bos_token_id=1,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32},
    )
    again = ModelArgs.from_dict(json.loads(json.dumps(args.to_dict())))
    assert again == args and again.rope_scaling is not args.rope_scaling


def test_llama32_meta_params_take_hf_factor_from_an_extra_config(tmp_path):
    """Meta's params.json cannot say factor 32 (Llama 3.2 1B/3B): a later config replaces Meta's constants."""
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4, "use_scaled_rope": True}))
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    (tmp_path / "rope.json").write_text(json.dumps({"use_scaled_rope": False, "rope_scaling": scaling}))
    assert ModelArgs.from_json(tmp_path / "params.json", tmp_path / "rope.json").rope_scaling_params == scaling
