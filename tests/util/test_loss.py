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


def _frozen_head_model(tied):
    model = _model(tie_word_embeddings=tied)
    head = model.tok_embeddings if tied else model.output
    head.weight.requires_grad_(False)  # as under QLoRA: the head (or the tied embedding) is frozen
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_head_gradient_in_forward_equals_plain(tied):
    """With a frozen head each chunk's gradient for the hidden states is taken in forward (no recomputation):
    value and every gradient still equal the plain loss's, also when the loss is scaled before backward."""
    model = _frozen_head_model(tied)
    tokens, labels = _batch()
    plain = _loss_and_grads(model, tokens, labels)
    for rows in (1, 3, 100):
        _assert_same(_loss_and_grads(model, tokens, labels, chunk_elements=rows * VOCAB, head_frozen=True), plain)
    assert ("output.weight" if not tied else "tok_embeddings.weight") not in plain[2]
    assert "layers.0.attention.wq.weight" in plain[2]

    model.zero_grad(set_to_none=True)  # a non-unit upstream gradient (the loss divided by the token count)
    loss, n = chunked_token_loss(
        model(tokens, return_hidden=True),
        model.logits,
        labels,
        vocab_size=VOCAB,
        chunk_elements=3 * VOCAB,
        head_frozen=True,
    )
    (loss / n * 0.25).backward()
    for k, g in plain[2].items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g / n * 0.25, rtol=1e-6, atol=1e-7)


def test_model_token_loss_uses_the_frozen_path_only_for_a_frozen_head():
    """model_token_loss decides from the model: a frozen head runs the head once per chunk (gradient taken in
    forward), a trainable one twice (forward and the checkpoint's recomputation) and gets its gradient."""
    tokens, labels = _batch()
    for frozen in (True, False):
        model = _frozen_head_model(tied=False) if frozen else _model()
        calls = []
        model.output.register_forward_hook(lambda mod, inp, out, calls=calls: calls.append(out.shape[0]))
        loss, n = model_token_loss(model, model, tokens, labels)
        loss.backward()
        assert sum(calls) == (n if frozen else 2 * n), (frozen, calls)
        assert (model.output.weight.grad is None) == frozen


def _saved_tensors_of_graph(loss):
    """Every tensor the autograd graph behind `loss` keeps for backward (what stays alive until backward)."""
    out, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_") or name == "saved_tensors":
                value = getattr(node, name)
                values = value if isinstance(value, tuple) else (value,)
                out += [v for v in values if isinstance(v, torch.Tensor)]
        stack += [f for f, _ in node.next_functions]
    return out


def test_frozen_head_path_keeps_no_logits_and_skips_work_without_grad():
    model = _frozen_head_model(tied=False)
    tokens, labels = _batch()
    hidden = model(tokens, return_hidden=True)
    frozen, _ = chunked_token_loss(
        hidden, model.logits, labels, vocab_size=VOCAB, chunk_elements=4 * VOCAB, head_frozen=True
    )
    plain, _ = plain_token_loss(model.logits(hidden), labels)
    vocab_sized = [
        [t.shape for t in _saved_tensors_of_graph(x) if t.dim() and t.shape[-1] == VOCAB] for x in (frozen, plain)
    ]
    assert vocab_sized[0] == [], vocab_sized[0]  # only [rows, dim] gradients are kept: no logits, no weight copy
    assert vocab_sized[1], "the walk finds the plain loss's logits (so it would find the chunked ones)"
    with torch.no_grad():  # evaluation: no gradient is taken in forward either
        a, _ = model_token_loss(model, model, tokens, labels)
        b, _ = model_token_loss(model, model, tokens, labels, chunked=False)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _mp_worker(rank, tied):
    init_distributed(model_parallel_size=2)
    model = _model(tie_word_embeddings=tied)
    tokens, labels = _batch()
    plain = _loss_and_grads(model, tokens, labels)
    chunked = _loss_and_grads(model, tokens, labels, chunk_elements=3 * VOCAB)
    # the frozen head: its collectives run inside forward's gradient, on identical chunks on both ranks
    (model.tok_embeddings if tied else model.output).weight.requires_grad_(False)
    frozen_plain = _loss_and_grads(model, tokens, labels)
    frozen = _loss_and_grads(model, tokens, labels, chunk_elements=3 * VOCAB, head_frozen=True)
    return plain, chunked, frozen_plain, frozen


@pytest.mark.parametrize("tied", [False, True])
def test_model_parallel_2_chunked_equals_plain_and_model_parallel_1(tied):
    """The head is column-parallel over the vocabulary (or the tied row-parallel product): each chunk's
    logits are gathered/reduced inside the checkpointed chunk, in forward and again in the recomputation."""
    ranks = run_multiprocess(_mp_worker, 2, tied)
    single = _loss_and_grads(_model(tie_word_embeddings=tied), *_batch())
    for plain, chunked, frozen_plain, frozen in ranks:
        _assert_same(chunked, plain)
        _assert_same(frozen, frozen_plain)
        torch.testing.assert_close(chunked[0], single[0], rtol=1e-5, atol=1e-5)
