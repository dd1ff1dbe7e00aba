"""bench/copy_model.graft: a small model zero-padded into a bigger shape (wider residual, GQA with more query heads per
kv head, a wider FFN, more layers, a bigger vocabulary) computes the small model's logits exactly. The speculative
decoding bench's honesty rests on this: the 1.1B-shape model it times is the trained small model."""

import sys
from pathlib import Path

import pytest
import torch

from model.args import ModelArgs
from model.llama import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import copy_model  # noqa: E402

BIG = ModelArgs(dim=128, n_layers=3, n_heads=8, n_kv_heads=4, vocab_size=100, ffn_hidden_dim=96, max_seq_len=64)
SMALL = ModelArgs(
    dim=32,
    n_layers=2,
    n_heads=2,
    n_kv_heads=2,
    head_size=16,
    vocab_size=60,
    ffn_hidden_dim=40,
    norm_eps=BIG.norm_eps * 128 / 32,
    max_seq_len=64,
)


def small_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(SMALL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so a norm the graft mis-scaled shows
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return model.eval()


def grafted(small: Transformer, big_args: ModelArgs = BIG, filler: int = 0) -> Transformer:
    state = dict(copy_model.graft(small.state_dict(), SMALL, big_args, filler_token=filler))
    big = Transformer(big_args)
    big.load_state_dict(state)
    return big.eval()


def test_the_grafted_model_computes_the_small_models_logits():
    small = small_model()
    big = grafted(small, filler=5)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = small(tokens), big(tokens)
    assert got.shape == (2, 40, BIG.vocab_size)
    torch.testing.assert_close(got[..., : SMALL.vocab_size], want, atol=1e-5, rtol=1e-5)
    # every padded id scores exactly what the filler token scores, so none wins an argmax a real id would not
    torch.testing.assert_close(got[..., SMALL.vocab_size :], want[..., 5:6].expand(-1, -1, 40), atol=1e-5, rtol=1e-5)


def test_the_grafted_model_decodes_as_the_small_one_with_the_kv_cache():
    from util.generate import SamplingParams, generate

    small = small_model(seed=3)
    big = grafted(small)
    prompt = torch.randint(0, SMALL.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_new_tokens=16)
    assert generate(big, [prompt], params, vocab_size=SMALL.vocab_size) == generate(small, [prompt], params)


def test_a_wrong_norm_eps_or_a_too_big_small_model_is_refused():
    small = small_model()
    with pytest.raises(ValueError, match="norm_eps"):
        list(copy_model.graft(small.state_dict(), SMALL, BIG.replace(norm_eps=1e-6)))
    with pytest.raises(ValueError, match="n_layers 2 > 1"):
        list(copy_model.graft(small.state_dict(), SMALL, BIG.replace(n_layers=1)))
    with pytest.raises(ValueError, match="n_kv_heads"):
        list(copy_model.graft(small.state_dict(), SMALL, BIG.replace(n_kv_heads=1)))


def test_the_zero_padding_survives_4bit_quantization(tmp_path):
    """All-zero bitsandbytes blocks (absmax 0) quantize and dequantize to zero: no NaN, no non-finite error from the
    lazy build, and the padded residual dims stay exactly zero through the 4-bit layers."""
    from util.build import build_model
    from util.checkpoint import write_hf_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from harness import shape_params

    small = small_model(seed=4)
    # 4-bit blocks of 64 fit the rows; eps kept at the small one's x dim ratio
    big_args = BIG.replace(dim=256, n_heads=16, ffn_hidden_dim=128, norm_eps=SMALL.norm_eps * SMALL.dim / 256)
    state = copy_model.graft(small.state_dict(), SMALL, big_args, dtype=torch.bfloat16)
    write_hf_checkpoint(tmp_path, state, params=shape_params(big_args))
    model, _ = build_model(big_args, [tmp_path], quant="4bit", dtype=torch.float32)
    wq = model.layers[0].attention.wq
    import bitsandbytes.functional as bnbf

    dense = bnbf.dequantize_4bit(wq.weight.data, wq.weight.quant_state).float()
    assert torch.isfinite(dense).all()
    assert dense[:, SMALL.dim :].abs().max() == 0 and dense[16:32].abs().max() == 0  # padding, and head 1 (unused)
    assert dense[:16, : SMALL.dim].abs().max() > 0
    hidden = []
    model.layers[1].register_forward_hook(lambda m, i, o: hidden.append(o))
    tokens = torch.randint(0, SMALL.vocab_size, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(tokens)
    assert torch.isfinite(logits).all() and hidden[0][..., SMALL.dim :].abs().max() == 0
    # the same function up to 4-bit rounding: the small model's argmax mostly survives
    with torch.no_grad():
        want = small(tokens)
    agree = (logits[..., : SMALL.vocab_size].argmax(-1) == want.argmax(-1)).float().mean()
    assert agree > 0.5, agree
