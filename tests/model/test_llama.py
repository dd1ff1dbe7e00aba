import pytest
import torch

from model.llama import Transformer
from tests.helpers import params_of, random_state_dict, reference_forward, tiny_args
from util.build import build_model
from util.checkpoint import write_hf_checkpoint, write_meta_checkpoint


@pytest.fixture(scope="module")
def weights():
    args = tiny_args()
    return args, random_state_dict(args, seed=1)


@pytest.fixture(scope="module")
def meta_ckpt(weights, tmp_path_factory):
    args, sd = weights
    path = tmp_path_factory.mktemp("meta")
    write_meta_checkpoint(path, sd, params=params_of(args), num_shards=2)
    return path


def test_fp32_logits_match_dense_reference(weights, meta_ckpt):
    args, sd = weights
    model, report = build_model(None, [meta_ckpt], dtype=torch.float32)  # config from params.json
    assert report.loaded == len(sd) and report.initialized == 2  # + the two rope tables
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = reference_forward(sd, args, tokens)
    torch.testing.assert_close(model(tokens).double(), ref, rtol=1e-4, atol=1e-4)


def test_bf16_logits_match_dense_reference(weights, meta_ckpt):
    args, sd = weights
    model, _ = build_model(args, [meta_ckpt], dtype=torch.bfloat16)
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = reference_forward({k: v.to(torch.bfloat16) for k, v in sd.items()}, args, tokens)
    err = (model(tokens).double() - ref).abs().max()
    assert err < 0.05 * ref.abs().max(), err


def test_hf_round_trip_gives_the_same_logits(weights, meta_ckpt, tmp_path):
    args, sd = weights
    write_hf_checkpoint(tmp_path, sd, params=params_of(args))
    from_meta, _ = build_model(None, [meta_ckpt], dtype=torch.float32)
    from_hf, report = build_model(None, [tmp_path], dtype=torch.float32)
    assert from_hf.args.hidden_dim == args.hidden_dim and from_hf.args.n_kv_heads == args.n_kv_heads
    tokens = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(from_meta(tokens), from_hf(tokens))


@pytest.mark.parametrize("quant", [None, "4bit", "8bit"])
def test_kv_cache_decoding_equals_full_recompute(weights, meta_ckpt, quant):
    args, _ = weights
    model, _ = build_model(args, [meta_ckpt], quant=quant, dtype=torch.float32)
    model.eval()
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    model.setup_cache(2, 16)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :5], start_pos=0)]  # prompt, then chunks and single tokens
        steps.append(model(tokens[:, 5:8], start_pos=5))
        steps += [model(tokens[:, i : i + 1], start_pos=i) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_decoding_without_cache_or_past_max_seq_len_is_a_clear_error(weights, meta_ckpt):
    args, _ = weights
    model, _ = build_model(args, [meta_ckpt], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, args.max_seq_len + 1, dtype=torch.long))


def test_unset_vocab_size_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(tiny_args(vocab_size=-1))


def test_tied_head_is_the_embedding_one_parameter_trained_by_both_uses(weights, tmp_path):
    args, sd = weights
    tied_args = args.replace(tie_word_embeddings=True)
    tied_sd = {k: v for k, v in sd.items() if k != "output.weight"}
    write_meta_checkpoint(tmp_path, tied_sd, params=params_of(args) | {"tie_word_embeddings": True})
    model, report = build_model(None, [tmp_path], dtype=torch.float32)
    assert model.args.tie_word_embeddings and model.output is None and report.loaded == len(tied_sd)
    assert "output.weight" not in model.state_dict()
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = reference_forward(tied_sd | {"output.weight": sd["tok_embeddings.weight"]}, tied_args, tokens)
    torch.testing.assert_close(model(tokens).double(), ref, rtol=1e-4, atol=1e-4)
    # the gradient reaches the embedding through the head too: rows of tokens never in the input still get one
    model(tokens).logsumexp(-1).mean().backward()
    unused = sorted(set(range(args.vocab_size)) - set(tokens.flatten().tolist()))
    assert model.tok_embeddings.weight.grad[unused].abs().sum() > 0


def test_head_size_other_than_dim_over_heads_matches_the_reference():
    args = tiny_args(head_size=24)  # 4 heads of 24 on a width of 64
    sd = random_state_dict(args, seed=3)
    assert sd["layers.0.attention.wq.weight"].shape == (96, 64)
    model = Transformer(args)
    model.load_state_dict(sd, strict=False)
    tokens = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(tokens).double(), reference_forward(sd, args, tokens), rtol=1e-4, atol=1e-4)
