"""Configs as the real libraries write them: transformers 5 (rope_parameters), transformers 4 (top-level
rope_theta / rope_scaling) and Meta's params.json (use_scaled_rope). Each tiny model is made and saved by
transformers itself, loaded with build_model(None, [dir]) in fp32, and its logits and greedy tokens compared
with transformers' own on the same files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as transformers
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from model.args import ModelArgs  # noqa: E402
from model.layers.rope import inv_frequencies  # noqa: E402
from util.build import build_model  # noqa: E402
from util.checkpoint import CheckpointError, open_checkpoint, write_meta_checkpoint  # noqa: E402
from util.hf_config import hf_config_to_params, params_to_hf_fields  # noqa: E402

VOCAB, MAX_POS = 128, 32
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def hf_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def save_hf(path: Path, config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A random LlamaForCausalLM with norms that are not all ones (a model ignoring them would differ) and q/k
    weights large enough that attention depends visibly on positions (transformers' init is std 0.02)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)
    model.save_pretrained(path)
    return model


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(path: Path, toks: torch.Tensor) -> torch.Tensor:
    # a fresh model per call: transformers' dynamic RoPE keeps state between forwards (see rope.py)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(toks).logits.float()


def ours(path: Path, **changes):
    if not changes:
        model, _ = build_model(None, [path], dtype=torch.float32)
    else:
        with open_checkpoint(path) as reader:
            args = ModelArgs.from_dict(reader.config, source=str(path)).replace(**changes)
        model, _ = build_model(args, [path], dtype=torch.float32)
    return model.eval()


def greedy_ours(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with the KV cache (one new token per step, as transformers' generate does)."""
    model.setup_cache(prompt.shape[0], prompt.shape[1] + steps)
    out = prompt
    with torch.no_grad():
        logits = model(prompt, start_pos=0)
        for i in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            if i + 1 < steps:
                logits = model(nxt, start_pos=out.shape[1] - 1)
    return out


def greedy_hf(path: Path, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The same loop on transformers' model and its own KV cache (generate() would stop or mask at eos)."""
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = prompt
    with torch.no_grad():
        step = hf(prompt, use_cache=True)
        for _ in range(steps):
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            step = hf(nxt, cache=step.cache, use_cache=True)
    return out


def check_parity(path: Path, seq: int, *, model=None, atol: float = 1e-5) -> float:
    model = model if model is not None else ours(path)
    toks = tokens(seq)
    with torch.no_grad():
        got = model(toks)
    want = hf_logits(path, toks)
    err = (got - want).abs().max().item()
    assert err <= atol, f"max |logit difference| {err:.2e} > {atol:.0e}"
    prompt = tokens(max(seq - 8, 4), seed=2)
    assert torch.equal(greedy_ours(model, prompt, 8), greedy_hf(path, prompt, 8))
    return err


# ---------------------------------------------------------------------------------------------------------
# transformers 5 layout (what save_pretrained writes today)
# ---------------------------------------------------------------------------------------------------------

ROPES = {
    "theta5e5": {"rope_type": "default", "rope_theta": 5e5},
    "llama3": {**LLAMA3, "rope_theta": 5e5, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 5e5},
}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_transformers5_checkpoint_gives_transformers_logits_and_tokens(tmp_path, rope, tied):
    save_hf(tmp_path, hf_config(rope_parameters=dict(ROPES[rope]), tie_word_embeddings=tied))
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written  # the layout this test is about
    model = ours(tmp_path)
    assert model.args.rope_theta == ROPES[rope]["rope_theta"]
    assert model.args.tie_word_embeddings is tied and (model.output is None) is tied
    assert (model.args.bos_token_id, model.args.eos_token_id) == (1, 2)
    check_parity(tmp_path, 24)


def test_dynamic_scaling_past_max_position_embeddings(tmp_path):
    save_hf(tmp_path, hf_config(rope_parameters=dict(ROPES["dynamic"])))
    model = ours(tmp_path, max_seq_len=4 * MAX_POS)  # the tables and cache go past the original context
    assert model.args.rope_scaling["original_max_position_embeddings"] == MAX_POS  # scaling still counts from it
    err = check_parity(tmp_path, 2 * MAX_POS - 7, model=model)
    # past the original context the scaling is what makes the answer right
    plain = ours(tmp_path, max_seq_len=4 * MAX_POS, rope_scaling=None)
    toks = tokens(2 * MAX_POS - 7)
    with torch.no_grad():
        off = (plain(toks) - hf_logits(tmp_path, toks)).abs().max().item()
    assert off > 100 * max(err, 1e-7)


@pytest.mark.parametrize("rope", ["theta5e5", "llama3", "linear"])
def test_rope_settings_change_the_logits(tmp_path, rope):
    """The parity above could not pass with the rope settings ignored: the plain theta-10000 model is far off."""
    save_hf(tmp_path, hf_config(rope_parameters=dict(ROPES[rope])))
    toks = tokens(24)
    with torch.no_grad():
        off = (ours(tmp_path, rope_theta=10000.0, rope_scaling=None)(toks) - hf_logits(tmp_path, toks)).abs().max()
    assert off > 1e-3


def test_head_dim_that_is_not_hidden_over_heads(tmp_path):
    save_hf(tmp_path, hf_config(head_dim=24))  # 4 heads of 24 on a width of 64
    model = ours(tmp_path)
    assert model.args.head_dim == 24 and model.layers[0].attention.wq.weight.shape == (96, 64)
    check_parity(tmp_path, 20)


def test_sharded_checkpoint_with_index(tmp_path):
    config = hf_config(rope_parameters=dict(ROPES["llama3"]), tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    check_parity(tmp_path, 16)


# ---------------------------------------------------------------------------------------------------------
# transformers 4 layout (top-level rope_theta, rope_scaling with "type" or "rope_type") and Meta's params.json
# ---------------------------------------------------------------------------------------------------------


def as_transformers4(path: Path, rope_scaling: dict | None, key: str = "rope_type") -> None:
    """Rewrite config.json as transformers 4.4x wrote it, for the same weights."""
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params["rope_theta"]
    cfg["rope_scaling"] = (
        None
        if rope_scaling is None
        else {key: rope_scaling["rope_type"]} | {k: v for k, v in rope_scaling.items() if k != "rope_type"}
    )
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.44.2"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_transformers4_layout_gives_the_same_logits(tmp_path, rope):
    ref, old = tmp_path / "t5", tmp_path / "t4"
    save_hf(ref, hf_config(rope_parameters=dict(ROPES[rope])))
    save_hf(old, hf_config(rope_parameters=dict(ROPES[rope])))  # same seed: the same weights
    scaling = {k: v for k, v in ROPES[rope].items() if k != "rope_theta"}
    as_transformers4(
        old, None if scaling["rope_type"] == "default" else scaling, key="type" if rope == "linear" else "rope_type"
    )
    toks = tokens(24)
    with torch.no_grad():
        err = (ours(old)(toks) - hf_logits(ref, toks)).abs().max().item()
    assert err <= 1e-5
    # and transformers itself reads the rewritten file the same way (the rewrite is a faithful transformers 4 file)
    assert (hf_logits(old, toks) - hf_logits(ref, toks)).abs().max().item() <= 1e-6


def test_llama31_meta_params_with_use_scaled_rope(tmp_path):
    """Meta's params.json says only use_scaled_rope: true; Meta's reference applies llama3 scaling with factor 8,
    low/high frequency factors 1/4 and an original context of 8192 - equal to transformers' llama3 settings."""
    hf_dir, meta_dir = tmp_path / "hf", tmp_path / "meta"
    llama3 = {**LLAMA3, "rope_theta": 5e5, "original_max_position_embeddings": 8192}
    save_hf(hf_dir, hf_config(rope_parameters=llama3, max_position_embeddings=16384))
    with open_checkpoint(hf_dir) as reader:
        state = {k: reader.read(k).clone() for k in reader.keys()}
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": VOCAB,
        "multiple_of": 32,
        "ffn_dim_multiplier": None,
        "ffn_hidden_dim": 96,
        "norm_eps": 1e-5,
        "rope_theta": 5e5,
        "use_scaled_rope": True,
        "max_seq_len": 512,
    }
    write_meta_checkpoint(meta_dir, state, params=params)
    model = ours(meta_dir)
    assert model.args.rope_scaling_params == {**LLAMA3, "original_max_position_embeddings": 8192}
    check_parity(hf_dir, 400, model=model)
    # without the flag the wavelengths past 8192/4 are not interpolated: different logits at these lengths
    toks = tokens(400)
    with torch.no_grad():
        assert (ours(meta_dir, use_scaled_rope=False)(toks) - model(toks)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# The frequencies themselves, against transformers' functions on the same config
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("seq_len", [MAX_POS, 3 * MAX_POS])
def test_inverse_frequencies_equal_transformers(rope, seq_len):
    config = hf_config(rope_parameters=dict(ROPES[rope]), head_dim=32)
    kind = ROPES[rope]["rope_type"]
    fn = LlamaForCausalLM(hf_config(num_hidden_layers=1)).model.rotary_emb.compute_default_rope_parameters
    want, scale = fn(config) if kind == "default" else ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    assert scale == 1.0
    args = ModelArgs.from_dict(hf_config_to_params(config.to_diff_dict()))
    got = inv_frequencies(args.head_dim, args.rope_theta, args.rope_scaling_params, seq_len=seq_len)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-6, atol=0)


def test_llama3_bands():
    """Short wavelengths kept, long ones divided by the factor, the band between blended (monotone)."""
    scaling = {**LLAMA3, "original_max_position_embeddings": 8192}
    plain = inv_frequencies(128, 5e5)
    scaled = inv_frequencies(128, 5e5, scaling)
    wavelen = 2 * math.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192
    assert torch.equal(scaled[short], plain[short]) and short.any()
    torch.testing.assert_close(scaled[long], plain[long] / 8) and long.any()
    mid = ~short & ~long
    ratio = scaled[mid] / plain[mid]
    assert mid.any() and (ratio < 1).all() and (ratio > 1 / 8).all() and (ratio.diff() <= 0).all()


# ---------------------------------------------------------------------------------------------------------
# Refusals: a field that is not implemented or not known names itself and the file
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"model_type": "mistral"}, "model_type"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type='yarn'"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "beta": 1}}, "beta"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
    ],
)
def test_unimplemented_config_field_is_an_error_naming_it_and_the_file(tmp_path, change, field):
    save_hf(tmp_path, hf_config())
    cfg = json.loads((tmp_path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        build_model(None, [tmp_path], dtype=torch.float32)
    assert field in str(err.value) and str(tmp_path / "config.json") in str(err.value)


def test_fields_without_effect_are_accepted():
    cfg = hf_config().to_diff_dict() | {"torch_dtype": "bfloat16", "pretraining_tp": 2, "_name_or_path": "x"}
    params = hf_config_to_params(cfg, source="c.json")
    assert params["rope_theta"] == 5e5 and "rope_scaling" not in params
    assert params["max_seq_len"] == MAX_POS and params["n_kv_heads"] == 2


# ---------------------------------------------------------------------------------------------------------
# Model parallel 2: a tied, llama3-scaled transformers checkpoint, each rank holding half the embedding
# ---------------------------------------------------------------------------------------------------------

MP_TOKENS = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))


def _mp_worker(rank: int, path: str):
    from util.dist import init_distributed

    init_distributed(model_parallel_size=2)
    model, _ = build_model(None, [path], dtype=torch.float32)
    logits = model(MP_TOKENS)
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), model.tok_embeddings.weight.grad.clone()


def test_tied_scaled_checkpoint_under_model_parallel_2(tmp_path):
    from tests.multiprocess import run_multiprocess

    save_hf(tmp_path, hf_config(rope_parameters=dict(ROPES["llama3"]), tie_word_embeddings=True))
    (l0, g0), (l1, g1) = run_multiprocess(_mp_worker, 2, str(tmp_path))
    assert torch.equal(l0, l1)
    assert (l0 - hf_logits(tmp_path, MP_TOKENS)).abs().max().item() <= 1e-5
    model = ours(tmp_path)
    model(MP_TOKENS).logsumexp(-1).mean().backward()
    # each rank's gradient is its half of the embedding's width, equal to the single-process gradient's half
    torch.testing.assert_close(torch.cat([g0, g1], dim=1), model.tok_embeddings.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_fields_for_export_read_back_by_transformers_and_by_us(tmp_path, rope):
    """params_to_hf_fields writes what transformers needs for the same math, and reading it back is lossless."""
    src, out = tmp_path / "src", tmp_path / "out"
    save_hf(src, hf_config(rope_parameters=dict(ROPES[rope]), tie_word_embeddings=True, eos_token_id=[2, 5]))
    model = ours(src, max_seq_len=4 * MAX_POS)
    save_hf(out, hf_config(rope_parameters=dict(ROPES[rope]), tie_word_embeddings=True))  # same weights
    cfg = json.loads((out / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg |= params_to_hf_fields(model.args.to_dict())
    (out / "config.json").write_text(json.dumps(cfg))
    assert ModelArgs.from_dict(hf_config_to_params(cfg)) == model.args.replace(
        max_seq_len=cfg["max_position_embeddings"]
    )
    toks = tokens(2 * MAX_POS - 7)  # past the original context for "dynamic"
    with torch.no_grad():
        assert (model(toks) - hf_logits(out, toks)).abs().max().item() <= 1e-5
