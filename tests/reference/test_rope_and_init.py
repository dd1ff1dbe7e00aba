"""RoPE with a non-default base against transformers' logits; the statistics of a fresh initialization."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from model.llama import Transformer
from model.peft import LoRA, add_lora
from tests.reference.hf import write_hf_model
from util.build import build_model
from util.lazy_init import materialize_and_load, meta_init

TOKENS = torch.randint(3, 384, (2, 120), generator=torch.Generator().manual_seed(7))  # long: rope matters late


@pytest.mark.parametrize("theta", [500.0, 1_000_000.0])
def test_a_non_default_rope_theta_gives_transformers_logits(tmp_path, theta):
    hf_model = write_hf_model(tmp_path, seed=4, rope_theta=theta)
    ours, _ = build_model(None, [tmp_path], dtype=torch.float32)
    assert ours.args.rope_theta == theta
    with torch.no_grad():
        expected = hf_model(input_ids=TOKENS).logits
        got = ours(TOKENS)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
        # the base matters at these positions: the default one gives clearly different logits
        default, _ = build_model(ours.args.replace(rope_theta=10000.0), [tmp_path], dtype=torch.float32)
        assert float((default(TOKENS) - expected).abs().max()) > 1e-2


# --- init ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh():
    """A pure init (no checkpoint) of a model large enough for stable statistics, LoRA on all seven."""
    from model.args import ModelArgs

    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, ffn_hidden_dim=512, max_seq_len=64)
    args = args.replace(lora_rank=16, lora_alpha=32.0)
    with meta_init(torch.float32):
        model = Transformer(args)
        add_lora(model, args)
    materialize_and_load(model, None, seed=0)
    return model


def _linears(model):
    return [
        (n, m) for n, m in model.named_modules() if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")
    ]


def test_each_linear_is_uniform_with_its_fan_in_bound(fresh):
    linears = _linears(fresh)
    assert len(linears) == 2 * 7 + 1  # the seven projections per layer + the output head
    for name, m in linears:
        w, bound = m.weight.detach(), 1.0 / math.sqrt(m.in_features)
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound, name
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.03), name  # U(-b, b): std b / sqrt(3)
        assert abs(float(w.mean())) < 0.02 * bound, name


def test_embedding_norms_and_lora_inits(fresh):
    emb = fresh.tok_embeddings.weight.detach()
    assert float(emb.std()) == pytest.approx(1.0, rel=0.02) and abs(float(emb.mean())) < 0.02  # N(0, 1)
    for name, p in fresh.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    loras = [(n, m) for n, m in fresh.named_modules() if isinstance(m, LoRA)]
    assert len(loras) == 2 * 7
    for name, m in loras:
        a, bound = m.lora_a.detach(), 1.0 / math.sqrt(m.in_features)
        assert float(a.abs().max()) <= bound and float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05), name
        assert torch.count_nonzero(m.lora_b) == 0, name  # an untrained LoRA is an exact no-op


def test_no_two_modules_share_init_values(fresh):
    """Each module is seeded by its own name: wk and wv of a layer (same shape and init) are unrelated, and no two
    tensors are scaled copies of one random stream (correlation of their first elements near 0, not 1)."""
    tensors = {n: p.detach().flatten() for n, p in fresh.named_parameters() if p.ndim == 2 and ".lora_b" not in n}
    assert len(tensors) == 1 + 15 + 14
    _assert_uncorrelated(tensors)


def _assert_uncorrelated(tensors):
    names, n = list(tensors), min(t.numel() for t in tensors.values())
    corr = torch.corrcoef(torch.stack([tensors[k][:n] for k in names]))
    for i, j in itertools.combinations(range(len(names)), 2):
        assert abs(float(corr[i, j])) < 0.1, (names[i], names[j], float(corr[i, j]))


def test_quantized_linears_get_their_own_init_too():
    """A 4-bit build from init quantizes each linear's own seeded init: no two share a random stream either."""
    from model.args import ModelArgs
    from util.quant import QuantLinear, quantize_model

    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, ffn_hidden_dim=512, max_seq_len=64)
    with meta_init(torch.float32):
        model = Transformer(args)
    quantize_model(model, "4bit")
    materialize_and_load(model, None, seed=0)
    weights = {
        n: m.dequantized_weight().float().flatten() for n, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    assert len(weights) == 2 * 7
    _assert_uncorrelated(weights)
