"""LLaMA2-Accessory checkpoints (util/checkpoint/accessory.py), written by a helper that follows Accessory's own save
code (tests/formats/accessory_layout.py), against the same weights in Meta's format and a float64 reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.formats.accessory_layout import COLUMN, ROW, accessory_config, write_accessory
from tests.helpers import params_of, random_state_dict, reference_forward, tiny_args
from tests.multiprocess import run_multiprocess
from util.build import build_model
from util.checkpoint import CheckpointError, open_checkpoint, write_meta_checkpoint

ARGS = tiny_args(rope_theta=500000.0)  # grouped-query attention: 4 query heads, 2 key/value heads
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
PROJ = COLUMN + ROW


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, dict[int, Path]]:
    sd = random_state_dict(ARGS, seed=1)
    meta = write_meta_checkpoint(tmp_path_factory.mktemp("meta"), sd, params=params_of(ARGS))
    acc = {
        mp: write_accessory(tmp_path_factory.mktemp(f"acc{mp}"), sd, config=accessory_config(ARGS, "llama"), mp=mp)
        for mp in (1, 2)
    }
    return sd, meta, acc


def _logits(paths, **kw) -> torch.Tensor:
    model, _ = build_model(None, paths, dtype=torch.float32, **kw)
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize("mp", [1, 2])
def test_a_full_accessory_checkpoint_gives_the_logits_of_the_same_weights_in_meta_format(base, mp: int) -> None:
    sd, meta, acc = base
    reader = open_checkpoint(acc[mp])
    assert reader.format == "accessory" and reader.config["rope_theta"] == 500000.0 and reader.config["n_kv_heads"] == 2
    assert reader.keys() == set(sd)
    reader.close()
    model, report = build_model(None, [acc[mp]], dtype=torch.float32)
    assert model.args.rope_theta == 500000.0 and report.loaded == len(sd)
    with torch.no_grad():
        got = model(TOKENS)
    assert torch.equal(got, _logits([meta]))
    torch.testing.assert_close(got, reference_forward(sd, ARGS, TOKENS).float(), rtol=1e-5, atol=1e-5)


def _lora_delta(args, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "attention.wq": (args.dim, args.dim),
        "attention.wk": (args.n_kv_heads * args.head_dim, args.dim),
        "attention.wv": (args.n_kv_heads * args.head_dim, args.dim),
        "attention.wo": (args.dim, args.dim),
        "feed_forward.w1": (args.hidden_dim, args.dim),
        "feed_forward.w3": (args.hidden_dim, args.dim),
        "feed_forward.w2": (args.dim, args.hidden_dim),
    }
    delta = {}
    for i in range(args.n_layers):
        for proj, (out, inp) in shapes.items():
            delta[f"layers.{i}.{proj}.lora.lora_a"] = torch.randn(rank, inp, generator=g) * 0.1
            delta[f"layers.{i}.{proj}.lora.lora_b"] = torch.randn(out, rank, generator=g) * 0.1
        for norm in ("attention_norm", "ffn_norm"):
            delta[f"layers.{i}.{norm}.weight"] = 1 + 0.2 * torch.randn(args.dim, generator=g)
    delta["norm.weight"] = 1 + 0.2 * torch.randn(args.dim, generator=g)
    return delta


@pytest.mark.parametrize(("base_mp", "delta_mp"), [(1, 1), (2, 2), (1, 2), (2, 1)])
def test_a_lora_and_norm_delta_adds_b_times_a_unscaled_like_accessory(base, tmp_path, base_mp, delta_mp) -> None:
    sd, _, acc = base
    delta = _lora_delta(ARGS, rank=4, seed=2)
    config = accessory_config(ARGS, "llama_peft", lora_rank=4, bias_tuning=False)
    d = write_accessory(tmp_path / "delta", delta, config=config, llama_type="llama_peft", mp=delta_mp)
    model, report = build_model(None, [acc[base_mp], d], dtype=torch.float32)
    assert (model.args.lora_rank, model.layers[0].attention.wq.lora.scale) == (4, 1.0)
    assert report.missing_keys == [] and report.unexpected_keys == []
    merged = dict(sd)  # what Accessory computes: W x + lora_b(lora_a(x)) with the tuned norms
    for key, value in delta.items():
        if key.endswith(".lora.lora_b"):
            proj = key.removesuffix(".lora.lora_b")
            merged[proj + ".weight"] = sd[proj + ".weight"] + value @ delta[proj + ".lora.lora_a"]
        elif not key.endswith(".lora.lora_a"):
            merged[key] = value
    with torch.no_grad():
        got = model(TOKENS)
    torch.testing.assert_close(got, reference_forward(merged, ARGS, TOKENS).float(), rtol=1e-5, atol=1e-5)
    assert (got - reference_forward(sd, ARGS, TOKENS).float()).abs().max() > 0.1  # the delta matters


def _bias_delta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "attention.wq": ARGS.dim,
        "attention.wk": 32,
        "attention.wv": 32,
        "attention.wo": ARGS.dim,
        "feed_forward.w1": ARGS.hidden_dim,
        "feed_forward.w3": ARGS.hidden_dim,
        "feed_forward.w2": ARGS.dim,
    }
    delta = {
        f"layers.{i}.{p}.bias_tune.bias": 0.3 * torch.randn(n, generator=g) for i in range(2) for p, n in out.items()
    }
    return delta | {"norm.weight": 1 + 0.2 * torch.randn(ARGS.dim, generator=g)}


def test_a_bias_tuning_delta_saved_at_mp2_lands_on_each_projection(base, tmp_path) -> None:
    sd, meta, acc = base
    delta = _bias_delta(seed=3)
    d = write_accessory(
        tmp_path / "bias", delta, config=accessory_config(ARGS, "llama_peft"), llama_type="llama_peft", mp=2
    )
    model, report = build_model(None, [acc[1], d], dtype=torch.float32)
    assert model.args.bias_tuning and model.args.norm_tuning and model.args.lora_rank == 0
    # the same tensors put in by name: the column-parallel biases merged from both ranks, row-parallel ones from one
    ref, _ = build_model(ARGS.replace(bias_tuning=True, norm_tuning=True), [meta], dtype=torch.float32)
    with torch.no_grad():
        for key, value in delta.items():
            ref.get_parameter(key).copy_(value)
        assert torch.equal(model(TOKENS), ref(TOKENS))
        assert (ref(TOKENS) - _logits([meta])).abs().max() > 0.1


def _mp2_worker(rank: int, base_dir: Path, delta_dir: Path) -> torch.Tensor:
    from util.dist import init_distributed

    init_distributed(model_parallel_size=2)
    model, _ = build_model(None, [base_dir, delta_dir], dtype=torch.float32)
    assert tuple(model.layers[0].attention.wq.lora.lora_b.shape) == (ARGS.dim // 2, 4)  # B split like the base rows
    with torch.no_grad():
        return model(TOKENS)


def test_an_accessory_lora_and_bias_delta_runs_at_model_parallel_2(base, tmp_path) -> None:
    _, _, acc = base
    delta = _lora_delta(ARGS, rank=4, seed=4) | _bias_delta(seed=5)
    d = write_accessory(
        tmp_path / "d", delta, config=accessory_config(ARGS, "llama_peft", lora_rank=4), llama_type="llama_peft", mp=1
    )
    r0, r1 = run_multiprocess(_mp2_worker, 2, acc[2], d)
    ref = _logits([acc[1], d])
    assert torch.equal(r0, r1)
    torch.testing.assert_close(r0, ref, rtol=1e-5, atol=1e-5)


# --- what is refused, with the file named


def test_an_additive_diff_checkpoint_is_refused_by_name(tmp_path) -> None:
    torch.save({"model": {}}, tmp_path / "consolidated.00-of-01.model-diff.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.00-of-01\.model-diff\.pth.*diff"):
        open_checkpoint(tmp_path)


def test_a_missing_rank_file_is_named(base, tmp_path) -> None:
    sd, _, _ = base
    d = write_accessory(tmp_path / "a", sd, config=accessory_config(ARGS, "llama"), mp=2)
    (d / "consolidated.01-of-02.model.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.01-of-02\.model\.pth"):
        open_checkpoint(d)


def test_a_truncated_rank_file_is_named(base, tmp_path) -> None:
    sd, _, _ = base
    d = write_accessory(tmp_path / "a", sd, config=accessory_config(ARGS, "llama"), mp=1)
    f = d / "consolidated.00-of-01.model.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"consolidated\.00-of-01\.model\.pth.*(truncated|corrupt)"):
        open_checkpoint(d)


@pytest.mark.parametrize(
    ("change", "meta", "message"),
    [
        ({"rope_scaling": 4.0}, "llama", r"config\.json.*rope_scaling=4\.0"),
        ({"use_flash": True}, "llama", r"config\.json.*'use_flash'"),
        ({}, "llama_adapter", r"meta\.json.*llama_type='llama_adapter'"),
    ],
)
def test_config_fields_and_model_types_this_reader_does_not_implement_are_errors(base, tmp_path, change, meta, message):
    sd, _, _ = base
    d = write_accessory(tmp_path / "a", sd, config=accessory_config(ARGS, "llama") | change, llama_type=meta)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(d)


def test_the_config_json_accessory_writes_maps_to_model_args(tmp_path) -> None:
    cfg = accessory_config(ARGS, "llama_peft", lora_rank=8)
    d = write_accessory(tmp_path / "a", {"norm.weight": torch.ones(ARGS.dim)}, config=cfg, llama_type="llama_peft")
    assert json.loads((d / "meta.json").read_text()) == {"llama_type": "llama_peft"}
    with open_checkpoint(d) as r:
        assert r.config["lora_rank"] == 8 and r.config["lora_alpha"] == 8.0  # Accessory's LoRA is unscaled
        assert r.config["bias_tuning"] is True and r.config["norm_tuning"] is True
        assert r.config["max_seq_len"] == ARGS.max_seq_len and "rope_scaling" not in r.config
