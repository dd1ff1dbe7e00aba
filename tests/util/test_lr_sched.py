import math

import pytest
import torch

from util.lr_sched import lr_at, set_lr


def test_linear_warmup_then_cosine_to_the_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_iters=4, total_iters=24)
    lrs = [lr_at(s, **kw) for s in range(24)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # strictly decreasing after warmup
    assert lrs[4 + 10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway
    assert lrs[-1] > 0.1 and lr_at(24, **kw) == pytest.approx(0.1)  # the floor one step after the last
    assert lr_at(1000, **kw) == pytest.approx(0.1)
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_iters=0, total_iters=1) == 1.0


def test_set_lr_sets_every_group():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}, {"params": [torch.nn.Parameter(torch.zeros(2))]}]
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
