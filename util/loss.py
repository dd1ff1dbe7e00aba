"""The training loss without the full logits: the output head and the cross entropy, a chunk of tokens at a time.

The plain loss materializes fp32 logits [tokens, vocab] (128,256 x 1,024 x 4 bytes = 0.5 GB for a Llama 3
vocabulary and one 1k-token sequence), keeps them for backward, and adds as much again for their gradient and
the log-softmax temporaries. Here only the labelled positions go through the head (prompt tokens masked with
IGNORE_INDEX never need logits), in chunks of rows sized so a chunk's logits stay around CHUNK_ELEMENTS, and
each chunk is checkpointed: its logits are freed right after its loss is taken and recomputed in backward, so at
most one chunk's logits (and their gradient) exist at any time. The cost is one more head matmul per chunk in
backward; what is saved is memory that grows with vocabulary x sequence. When the head is frozen (QLoRA: no
head parameter needs a gradient) even that matmul is saved: each chunk's gradient for its hidden rows is taken
in forward, while its logits exist, and kept instead of the logits ([rows, dim], vocab/dim times smaller).

The value and the gradients equal the plain loss's (same per-row math; only the order of the final sum differs).
Model parallel: `head` is the model's own `logits` (column-parallel over the vocabulary and gathered, or the tied
row-parallel product), called on identical chunks on every rank, so its collectives line up in forward and in
the recomputation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from util.data import IGNORE_INDEX

# fp32 logits elements per chunk (64 MiB): 128 rows at a 128k vocabulary, 512 at 32k - big enough for an
# efficient matmul, small enough that the chunk is noise next to the model.
CHUNK_ELEMENTS = 1 << 24


def plain_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross entropies over labelled positions, number of them) from full logits
    [batch, seq, vocab]: position t predicts t + 1. The reference the chunked loss must equal."""
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


class _FrozenHeadChunkLoss(torch.autograd.Function):
    """A chunk's loss whose gradient with respect to its hidden rows is taken in forward, while the chunk's
    logits exist, and kept ([rows, dim], small): backward only scales it, so nothing is recomputed. Two head
    matmuls per chunk as in the plain loss, where the checkpointed chunk needs three. Only valid when no head
    parameter needs a gradient (QLoRA: the head is frozen); the caller checks."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]):
        with torch.enable_grad():
            leaf = h.detach().requires_grad_(True)
            loss = _chunk_loss(head, leaf, targets)
            (grad_h,) = torch.autograd.grad(loss, leaf)
        ctx.save_for_backward(grad_h)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out).to(grad_h.dtype), None, None


def chunked_token_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    vocab_size: int,
    chunk_elements: int = CHUNK_ELEMENTS,
    head_frozen: bool = False,
) -> tuple[torch.Tensor, int]:
    """`plain_token_loss(head(hidden), labels)` without ever holding more than one chunk of logits.

    hidden: the final-norm hidden states [batch, seq, dim] (Transformer.forward(..., return_hidden=True));
    head: hidden rows [n, dim] -> logits [n, vocab] (Transformer.logits); vocab_size sizes the chunks.
    head_frozen: no parameter used by `head` requires a gradient (a quantized or frozen head); then each chunk's
    gradient for `hidden` is taken in forward instead of recomputing its logits in backward (one head matmul
    per chunk less). Passing True for a trainable head would silently drop the head's gradients: the caller
    must know (model_token_loss checks the model's head parameters).
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements={chunk_elements} must be >= 1")
    targets = labels[:, 1:].reshape(-1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    n = int(keep.numel())
    if n == 0:
        # Nothing labelled: a zero that still runs the head once, so every trainable tensor takes part in the
        # graph (DDP expects that) and model-parallel ranks run the same collectives as on any other batch.
        return head(h[:1]).float().sum() * 0.0, 0
    if n < targets.numel():
        h, targets = h.index_select(0, keep), targets.index_select(0, keep)
    rows = max(1, chunk_elements // max(vocab_size, 1))
    total = None
    grad_in_forward = head_frozen and torch.is_grad_enabled() and h.requires_grad
    for start in range(0, n, rows):
        if grad_in_forward:
            part = _FrozenHeadChunkLoss.apply(h[start : start + rows], targets[start : start + rows], head)
            total = part if total is None else total + part
            continue
        part = checkpoint(
            _chunk_loss,
            head,
            h[start : start + rows],
            targets[start : start + rows],
            use_reentrant=False,
            preserve_rng_state=False,  # the head draws no random numbers (LoRA cannot target it: no dropout)
        )
        total = part if total is None else total + part
    return total, n


def model_token_loss(
    model: torch.nn.Module,
    base: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    images: torch.Tensor | None = None,
    chunked: bool = True,
) -> tuple[torch.Tensor, int]:
    """The summed next-token loss of a training forward of `model` (possibly a DDP wrapper of `base`, the
    Transformer): chunked (the default) or from the full logits (chunked=False)."""
    kwargs = {"images": images} if images is not None else {}
    if not chunked:
        return plain_token_loss(model(tokens, **kwargs), labels)
    hidden = model(tokens, return_hidden=True, **kwargs)
    return chunked_token_loss(
        hidden, base.logits, labels, vocab_size=base.args.vocab_size, head_frozen=not head_requires_grad(base)
    )


def head_requires_grad(base: torch.nn.Module) -> bool:
    """Whether any parameter of the Transformer's head (its `output`, or the token embedding when tied; with
    whatever wraps it) requires a gradient."""
    head = base.output if base.output is not None else base.tok_embeddings
    return any(p.requires_grad for p in head.parameters())
