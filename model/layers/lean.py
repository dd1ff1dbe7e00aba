"""Autograd functions that keep less for backward than the plain ops would, with the same values and gradients.

Activations saved for backward are what a (Q)LoRA step's memory grows by at long sequences: with a frozen base,
the weights are fixed and every layer still keeps its elementwise intermediates. Three of them are kept here
in a smaller form:

- `recompute(fn, *inputs)`: keeps only the inputs of a cheap elementwise piece (RMSNorm, SwiGLU's silu * mul)
  and runs the piece again in backward. RMSNorm then keeps its bf16 input instead of an fp32 copy, SwiGLU its
  two projections instead of those plus silu's output. The backward replays the same ops on the same inputs,
  so gradients are the plain graph's bit for bit.
- `dropout_linear(x, weight, p)`: LoRA's A(dropout(x)). The plain ops keep the dropped-out copy of x and the
  scaled mask, both in the activation dtype, per adapter: three of each for q, k, v, which read the same x. Here
  each adapter keeps x itself (one tensor shared by q, k, v, saved once) and the seed of its mask; backward
  draws the mask again and rebuilds the dropped-out copy.

Without a gradient to take (decoding, evaluation) nothing is kept: recompute runs fn, dropout_linear the same mask
rule, without the autograd function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def needs_graph(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        # the autocast the forward ran under, replayed in backward (which runs outside it)
        device = inputs[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))


def recompute(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs), keeping only `inputs` for backward (fn runs again there). fn: elementwise and cheap, with
    no randomness; every input a tensor."""
    if not needs_graph(*inputs):
        return fn(*inputs)
    return _Recompute.apply(fn, *inputs)


# Dropout draws one 16-bit uniform word per element (4 per 64-bit draw: a quarter of the generator calls
# bernoulli_ makes, which was most of a LoRA adapter's dropout time on CPU), so p is rounded to a multiple of
# 1/65536; kept elements are scaled by 1 / (1 - that rounded p), which keeps the expectation exact.
_WORD = 1 << 16


def _drop_words(p: float) -> int:
    return round(p * _WORD)


def _noise(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropout multiplier, in x's dtype: 0 where dropped (probability round(p * 65536) / 65536), 1 / (1 - that)
    where kept; the same for the same seed (backward draws it again). Built with float arithmetic on the random
    words, never a bool tensor: on CPU, bool compares and casts run several times slower than float ops."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=torch.Generator(x.device).manual_seed(seed))
    drop = _drop_words(p)
    threshold = drop - _WORD // 2  # an int16 word below it drops its element
    # integers: word - (threshold - 1) is >= 1 when kept, <= 0 when dropped, so the clamp gives exactly 1 or 0
    keep = words.view(torch.int16)[:n].to(torch.float32).sub_(threshold - 1).clamp_(0, 1)
    return keep.mul_(_WORD / (_WORD - drop)).to(x.dtype).view(x.shape)


def _new_seed() -> int:
    """A mask's seed, from the global generator: torch.manual_seed decides it, and activation checkpointing (which
    restores the generator before recomputing) gets the same mask again."""
    return int(torch.randint(0, 1 << 62, ()))


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        ctx.seed = _new_seed()
        ctx.p = p
        # the matmul's dtype: autocast's if on (it would cast both operands), else the operands' own
        device = x.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.save_for_backward(x, weight)
        return F.linear((x * _noise(x, p, ctx.seed)).to(ctx.dtype), weight.to(ctx.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        noise = _noise(x, ctx.p, ctx.seed)
        g2 = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = g2.mm(weight.to(ctx.dtype)).view(x.shape).to(x.dtype) * noise
        if ctx.needs_input_grad[1]:
            dropped = (x * noise).reshape(-1, x.shape[-1]).to(ctx.dtype)
            grad_w = dropped.t().mm(g2).t().to(weight.dtype)  # the orientation linear's own backward uses
        return grad_x, grad_w, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """F.linear(dropout(x, p), weight) in training: x is dropped out with a mask that backward draws again from
    its seed, so only x is kept (one tensor for q, k and v, which read the same x). Without a gradient to take,
    the same mask rule runs without the graph."""
    if p == 0:
        return F.linear(x, weight)
    if not needs_graph(x, weight):
        return F.linear(x * _noise(x, p, _new_seed()), weight)
    return _DropoutLinear.apply(x, weight, p)
