import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from model.args import preset
from model.layers import ColumnParallelLinear, RowParallelLinear
from model.llama import Transformer
from util import quant as quant_mod
from util.lazy_init import meta_init
from util.quant import QUANT_MODES, QuantLinear, quantize_4bit_chunked, quantize_8bit_chunked, quantize_model


def _inputs(rows, cols, dtype):
    torch.manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols) * 0.05
    w[0, :5] = 0.0  # zeros, a huge and a tiny value: absmax and rounding edge cases
    w.view(-1)[7] = 40.0
    w.view(-1)[8] = 1e-8
    return w.to(dtype)


@pytest.mark.parametrize("mode", ["4bit", "4bit_fp4"])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("shape", [(96, 64), (37, 100), (129, 7), (1, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_4bit_is_bitwise_bitsandbytes(monkeypatch, mode, compress, shape, dtype):
    monkeypatch.setattr(quant_mod, "CHUNK_ELEMENTS", 200)  # many chunks, rows not a multiple of the chunk
    spec = QUANT_MODES[mode]
    spec = type(spec)(spec.name, 4, spec.quant_type, compress)
    w = _inputs(*shape, dtype)
    ref_packed, ref_state = bnbF.quantize_4bit(
        w, blocksize=64, compress_statistics=compress, quant_type=spec.quant_type
    )
    packed, state = quantize_4bit_chunked(w, spec, device=torch.device("cpu"), dtype=dtype)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert state.shape == ref_state.shape and state.dtype == ref_state.dtype
    assert torch.equal(state.code, ref_state.code)
    if compress:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
        assert torch.equal(state.state2.code, ref_state.state2.code)
    assert torch.equal(bnbF.dequantize_4bit(packed, state), bnbF.dequantize_4bit(ref_packed, ref_state))


@pytest.mark.parametrize("shape", [(96, 64), (37, 100)])
def test_chunked_8bit_is_bitwise_bitsandbytes(monkeypatch, shape):
    monkeypatch.setattr(quant_mod, "CHUNK_ELEMENTS", 300)
    w = _inputs(*shape, torch.bfloat16)
    ref_cb, ref_scb, _ = bnbF.int8_vectorwise_quant(w.to(torch.float16))
    cb, scb = quantize_8bit_chunked(w, device=torch.device("cpu"))
    assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)


@pytest.mark.parametrize("mode", ["4bit", "4bit_fp4", "8bit"])
@pytest.mark.parametrize("kind", [nn.Linear, ColumnParallelLinear, RowParallelLinear])
def test_quant_linear_computes_with_the_dequantized_weight(mode, kind):
    torch.manual_seed(0)
    lin = kind(64, 128, bias=False)
    q = QuantLinear.from_linear(lin, QUANT_MODES[mode])
    assert q.is_quantized and not q.weight.requires_grad
    w = q.dequantized_weight().float()
    assert (w - lin.weight).abs().max() < 0.05 * lin.weight.abs().max() * (4 if mode != "8bit" else 1)
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()  # gradient reaches the input through the frozen quantized weight
    torch.testing.assert_close(x.grad, 2 * (x @ w.T) @ w, rtol=1e-3, atol=1e-3)


def test_train_forward_after_eval_forward_is_still_correct():
    # bitsandbytes' own Linear4bit repacks its weight in place on the first eval forward on AVX512-BF16 CPUs,
    # after which training forwards are wrong; QuantLinear must give the same answers in both modes, any order.
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 64, bias=False, dtype=torch.bfloat16), QUANT_MODES["4bit"])
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    q.train()
    first = q(x.clone().requires_grad_())
    q.eval()
    with torch.no_grad():
        evaluated = q(x)
    q.train()
    xg = x.clone().requires_grad_()
    again = q(xg)
    again.sum().backward()
    assert torch.equal(first.detach(), evaluated) and torch.equal(again.detach(), evaluated)
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_quantize_model_on_meta_and_block_list():
    args = preset("tiny")
    with meta_init(torch.bfloat16):
        model = Transformer(args)
    quantize_model(model, "4bit")
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 7 * args.n_layers  # wq wk wv wo w1 w2 w3 per block; output head blocked
    assert isinstance(model.output, ColumnParallelLinear)
    assert all(m.weight.is_meta for m in model.modules() if isinstance(m, QuantLinear))
    quantize_model(model, "4bit", block_list=())  # a second pass converts only what is left (the head)
    assert isinstance(model.output, QuantLinear)


def test_quantize_model_skips_subclasses_that_read_weight_directly():
    mha = nn.MultiheadAttention(64, 4)  # its out_proj is an nn.Linear subclass read via .weight
    container = nn.Sequential(mha, nn.Linear(64, 64))
    quantize_model(container, "8bit", block_list=())
    assert type(container[0].out_proj) is not QuantLinear and isinstance(container[1], QuantLinear)


def test_unknown_quant_mode_lists_choices():
    with pytest.raises(ValueError, match=r"'3bit'.*4bit.*4bit_fp4.*8bit"):
        quantize_model(nn.Linear(4, 4), "3bit")
    model = nn.Sequential(nn.Linear(4, 4))
    assert quantize_model(model, "none") is model and type(model[0]) is nn.Linear


def test_prepare_for_inference_repacks_4bit_for_cpu_and_refuses_training():
    from util.quant import prepare_for_inference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64, bias=False, dtype=torch.bfloat16))
    quantize_model(model, "4bit", block_list=())
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x)
    repacked = prepare_for_inference(model)
    if repacked == 0:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes' repacked inference kernel is not used")
    with torch.no_grad():
        after = model(x)
    assert (after.float() - before.float()).abs().max() < 0.02 * before.float().abs().max()
    model.train()
    with pytest.raises(RuntimeError, match="cannot train"):
        model(x.requires_grad_())
