"""Learning-rate schedule: linear warmup, then cosine decay to a floor, per optimizer step.

A pure function of the step index, so resuming needs no scheduler state beyond the step count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup_iters: int, total_iters: int) -> float:
    """The learning rate of optimizer step `step` (0-based) out of `total_iters`.

    Warmup: lr * (step + 1) / warmup_iters for the first warmup_iters steps (the first step already moves).
    Then cosine from lr towards min_lr, which it would reach one step after the last (no step is wasted at 0).
    """
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    decay_steps = max(1, total_iters - warmup_iters)
    progress = min(1.0, (step - warmup_iters) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass(frozen=True)
class Schedule:
    """lr_at with its settings bound: schedule(step) is the learning rate of optimizer step `step`."""

    lr: float
    min_lr: float
    warmup_iters: int
    total_iters: int

    def __call__(self, step: int) -> float:
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup_iters=self.warmup_iters, total_iters=self.total_iters)
