from __future__ import annotations

import torch
from torch import nn

from model.layers.lean import recompute


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            with torch.no_grad():
                self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # backward keeps x (not its fp32 copy) and normalizes again
        return recompute(self._normalize, x, self.weight)

    def _normalize(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # normalize in fp32 whatever the activation dtype (as Meta's reference), then scale in x's dtype
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * weight
