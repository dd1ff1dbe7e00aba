"""The chunked loss (util.loss) equals the plain loss from full logits in value and in every gradient: fp32, with
ignored positions, untied and tied heads, model parallel 2; and it never saves a full
[tokens, vocab] tensor for backward."""

import pytest
import torch

from tests.helpers import tiny_args
from tests.multiprocess import run_multiprocess
from util.build import build_model
from util.data import IGNORE_INDEX
from util.dist import init_distributed
from util.loss import chunked_token_loss, model_token_loss, plain_token_loss

VOCAB = 512  # the tiny preset's


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=g)
    labels = tokens.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[1, 3:6] = IGNORE_INDEX  # a hole in the middle
    labels[1, -1] = IGNORE_INDEX
    return tokens, labels


def _model(**overrides):
    model, _ = build_model(tiny_args(**overrides), None, dtype=torch.float32, seed=3)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _loss_and_grads(model, tokens, labels, **chunking):
    model.zero_grad(set_to_none=True)
    if chunking:
        hidden = model(tokens, return_hidden=True)
        loss, n = chunked_token_loss(hidden, model.logits, labels, vocab_size=VOCAB, **chunking)
    else:
        loss, n = plain_token_loss(model(tokens), labels)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (la, na, ga), (lb, nb, gb) = a, b
    assert na == nb
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_equals_plain_in_value_and_gradients(tied):
    model = _model(tie_word_embeddings=tied)
    tokens, labels = _batch()
    plain = _loss_and_grads(model, tokens, labels)
    assert plain[1] == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 16
    for rows in (1, 3, 7, 100):  # chunk sizes that do and do not divide the 16 labelled rows
        _assert_same(_loss_and_grads(model, tokens, labels, chunk_elements=rows * VOCAB), plain)
    assert "output.weight" in plain[2] if not tied else "tok_embeddings.weight" in plain[2]


def test_nothing_labelled_gives_zero_and_zero_gradients():
    model = _model()
    tokens, labels = _batch()
    labels[:] = IGNORE_INDEX
    loss, n, grads = _loss_and_grads(model, tokens, labels, chunk_elements=VOCAB)
    assert n == 0 and loss.item() == 0.0
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_no_full_logits_are_saved_for_backward():
    model = _model()
    tokens, labels = _batch()
    biggest = {}

    def pack(t):  # logits-like tensors: [..., vocab] (the weights are [vocab, dim])
        if t.dim() >= 2 and t.shape[-1] == VOCAB:
            biggest["n"] = max(biggest.get("n", 0), t.numel())
        return t

    for chunked in (False, True):
        biggest.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kwargs = {"chunk_elements": 4 * VOCAB} if chunked else {}
            _loss_and_grads(model, tokens, labels, **kwargs)
        if chunked:
            assert biggest.get("n", 0) <= 4 * VOCAB, biggest  # nothing logits-sized kept beyond one chunk
        else:
            assert biggest["n"] >= 2 * 12 * VOCAB  # the plain loss keeps all of them


def test_model_token_loss_switch_and_images_argument():
    model = _model()
    tokens, labels = _batch()
    with torch.no_grad():
        a, na = model_token_loss(model, model, tokens, labels)
        b, nb = model_token_loss(model, model, tokens, labels, chunked=False)
    assert na == nb
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _mp_worker(rank, tied):
    init_distributed(model_parallel_size=2)
    model = _model(tie_word_embeddings=tied)
    tokens, labels = _batch()
    plain = _loss_and_grads(model, tokens, labels)
    chunked = _loss_and_grads(model, tokens, labels, chunk_elements=3 * VOCAB)
    return plain, chunked


@pytest.mark.parametrize("tied", [False, True])
def test_model_parallel_2_chunked_equals_plain_and_model_parallel_1(tied):
    """The head is column-parallel over the vocabulary (or the tied row-parallel product): each chunk's
    logits are gathered/reduced inside the checkpointed chunk, in forward and again in the recomputation."""
    ranks = run_multiprocess(_mp_worker, 2, tied)
    single = _loss_and_grads(_model(tie_word_embeddings=tied), *_batch())
    for plain, chunked in ranks:
        _assert_same(chunked, plain)
        torch.testing.assert_close(chunked[0], single[0], rtol=1e-5, atol=1e-5)
