"""Rotary position embedding in Meta's layout (pairs of adjacent features rotate together)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables as non-persistent fp32 buffers.

    Computed tables are not in checkpoints, and a meta build leaves them without values: the materializer
    allocates them and calls reset_parameters, which recomputes them (never left as garbage after `to_empty`).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        device = self.cos.device
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim)
        )
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float64), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate x of shape [batch, seq, heads, head_dim] for positions start_pos..start_pos+seq-1."""
        seq = x.shape[1]
        if start_pos + seq > self.max_seq_len:
            raise ValueError(
                f"position {start_pos + seq} exceeds max_seq_len={self.max_seq_len}; raise max_seq_len in the config"
            )
        cos = self.cos[start_pos : start_pos + seq].view(1, seq, 1, -1)
        sin = self.sin[start_pos : start_pos + seq].view(1, seq, 1, -1)
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).type_as(x)
