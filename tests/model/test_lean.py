"""model.layers.lean: the same values and gradients as the plain ops, with less kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.layers.lean as lean
from model.args import ModelArgs
from model.layers import RMSNorm
from model.layers.lean import dropout_linear, recompute
from model.llama import _swiglu
from util.build import build_model


def _saved_bytes(fn, exclude=()) -> tuple[int, list[tuple[torch.dtype, tuple[int, ...]]]]:
    """Bytes autograd keeps for backward while fn() runs (each storage once; `exclude`: parameters' storages)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, kept = {}, []

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            kept.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), kept, out


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_recomputed_rmsnorm_and_swiglu_give_the_plain_graphs_gradients_bit_for_bit(dtype, weight_trains):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_(weight_trains)
    norm = RMSNorm(64, eps=1e-5)

    def plain(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * w

    wanted = (x, w) if weight_trains else (x,)
    g = torch.randn(2, 5, 64, dtype=dtype)
    got = recompute(norm._normalize, x, w)
    expected = plain(x, w)
    assert torch.equal(got, expected)
    for a, b in zip(_grads(got, wanted, g), _grads(expected, wanted, g)):
        assert torch.equal(a, b)

    a, b = (torch.randn(3, 7, 32, dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn(3, 7, 32, dtype=dtype)
    got, expected = recompute(_swiglu, a, b), F.silu(a) * b
    assert torch.equal(got, expected)
    for u, v in zip(_grads(got, (a, b), g), _grads(expected, (a, b), g)):
        assert torch.equal(u, v)


def test_recompute_replays_the_forwards_autocast_in_backward():
    torch.manual_seed(0)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    mm = lambda a, b: a @ b  # noqa: E731 - autocast makes this a bf16 matmul
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = recompute(mm, a, b), mm(a, b)
    assert got.dtype == expected.dtype == torch.bfloat16
    g = torch.randn(4, 8, dtype=torch.bfloat16)
    for u, v in zip(_grads(got, (a, b), g), _grads(expected, (a, b), g)):
        assert u.dtype == torch.float32 and torch.equal(u, v)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
def test_dropout_linear_equals_the_plain_graph_with_its_mask(autocast, x_grad):
    """Forward and gradients bit for bit those of F.linear(x * noise, w) with the mask the forward drew (its seed
    is the global generator's next draw): backward, which draws the mask again, rebuilds the same product."""
    dtype = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(2, 9, 48, dtype=dtype).requires_grad_(x_grad)
    w = torch.randn(8, 48, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 9, 8, dtype=torch.bfloat16 if autocast else dtype)
    wanted = (x, w) if x_grad else (w,)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(3)
        got = dropout_linear(x, w, 0.25)
        torch.manual_seed(3)
        noise = lean._noise(x, 0.25, int(torch.randint(0, 1 << 62, ())))
        expected = F.linear(x * noise, w)
    assert torch.equal(got, expected)
    assert 0 < int((noise == 0).sum()) < noise.numel()
    for u, v in zip(_grads(got, wanted, g), _grads(expected, wanted, g)):
        assert u.dtype == v.dtype
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_masks_drop_p_of_the_elements_independently_and_keep_the_mean(p):
    n = 1 << 20
    x = torch.ones(n)
    noise = lean._noise(x, p, seed=11)
    dropped = (noise == 0).double()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(dropped.mean()) - p) < 5 * sigma + 1 / 65536  # p is rounded to a multiple of 1/65536
    assert abs(float(noise.double().mean()) - 1) < 5 * sigma / (1 - p)  # kept ones scaled: the mean stays x's
    # neighbours independent (the 16-bit words of one 64-bit draw among them): P(both dropped) = p^2
    both = float((dropped[:-1] * dropped[1:]).mean())
    assert abs(both - p * p) < 5 * (p * p / n) ** 0.5
    for step in (1, 2, 3, 4):  # and no period of 4 words: each word position of a draw drops at rate p
        assert abs(float(dropped[step - 1 :: 4].mean()) - p) < 5 * 2 * sigma
    assert torch.equal(lean._noise(x, p, seed=11), noise)  # the seed decides the mask
    assert not torch.equal(lean._noise(x, p, seed=12), noise)


def test_a_lora_block_keeps_its_inputs_once_bool_masks_and_gqa_sized_keys():
    """One training forward of a GQA block with LoRA (dropout) on all seven projections, bf16: what autograd keeps
    is at most the sum below. The plain ops kept 2x as much at the Llama 3.2 1B shape (an fp32 copy per norm,
    silu's output, a dropped-out copy and a bf16 mask per adapter - here a seed -, keys and values repeated per
    query head)."""
    args = ModelArgs(
        dim=128, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=64, multiple_of=32, max_seq_len=64
    ).replace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
    model, _ = build_model(args, None, quant=None, dtype=torch.bfloat16)
    block, rope = model.layers[0].train(), model.rope
    for n, p in block.named_parameters():
        p.requires_grad_(".lora." in n)
    seq, dim, hidden, kv, rank = 64, args.dim, args.hidden_dim, args.n_kv_heads * args.head_dim, args.lora_rank
    x = torch.randn(1, seq, dim, dtype=torch.bfloat16, requires_grad=True)
    saved, kept, out = _saved_bytes(lambda: block(x, rope, None), exclude=list(block.parameters()))
    bf16, fp32 = 2, 4
    per_token = (
        4 * dim * bf16  # the norms' inputs (x, h) and outputs (the adapters' inputs: q, k, v share one; w1, w3 one)
        + 3 * hidden * bf16  # SwiGLU's w1 x and w3 x; silu * mul (w2's adapter input)
        + (2 * dim + 2 * kv) * bf16  # attention: q and its output (wo's adapter input), k and v at the KV size
        + args.n_heads * fp32  # attention's log-sum-exp
        + 7 * rank * bf16  # each adapter's rank-r product (B's input)
        + args.head_dim * fp32  # the rotary cos / sin
    )
    weight_casts = sum(2 * m.lora_a.numel() + 2 * m.lora_b.numel() for m in block.modules() if hasattr(m, "lora_a"))
    assert saved <= seq * per_token + weight_casts, (saved, seq * per_token + weight_casts, kept)
    assert not any(dt == torch.float32 and shape[-1] == dim for dt, shape in kept), kept  # no fp32 norm copies
    out.sum().backward()
    assert all(p.grad is not None for n, p in block.named_parameters() if ".lora." in n)
