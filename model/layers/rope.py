"""Rotary position embedding in Meta's layout (pairs of adjacent features rotate together), with the RoPE
scalings Llama checkpoints use: "linear" (position interpolation), "dynamic" (NTK-aware base growth past the
original context, as Hugging Face computes it) and "llama3" (Llama 3.1's per-frequency interpolation).

The scaling is a mapping validated by `model.args` (`ModelArgs.rope_scaling`, see ROPE_SCALING_KEYS there):
{"rope_type": ..., "factor": ..., plus "low_freq_factor", "high_freq_factor" and
"original_max_position_embeddings" where the type needs them}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def inv_frequencies(
    head_dim: int,
    theta: float,
    scaling: Mapping[str, Any] | None = None,
    *,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The head_dim // 2 rotation frequencies (float64), scaled as `scaling` says.

    seq_len matters only for "dynamic": the length of the sequence being computed (the forward's last position
    + 1). Up to the original context the frequencies are the plain ones; past it the base grows with seq_len.
    """
    kind = scaling["rope_type"] if scaling else "default"
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    if kind == "dynamic" and seq_len is not None and seq_len > scaling["original_max_position_embeddings"]:
        # NTK-aware: keep the highest frequency, stretch the lowest so the longer sequence spans the same angles
        factor, original = float(scaling["factor"]), scaling["original_max_position_embeddings"]
        theta = theta * (factor * seq_len / original - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta**exponents
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Wavelengths longer than the original context / low_freq_factor are interpolated by `factor`, shorter
        # than context / high_freq_factor are kept, and those between blend the two linearly in context/wavelength.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(
            wavelen > context / low, inv_freq / factor, torch.where(wavelen < context / high, inv_freq, blended)
        )
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables as non-persistent fp32 buffers.

    Computed tables are not in checkpoints, and a meta build leaves them without values: the materializer
    allocates them and calls reset_parameters, which recomputes them (never left as garbage after `to_empty`).
    With "dynamic" scaling the tables hold the unscaled angles (used up to the original context); a forward that
    reaches past it computes its own angles for its length, as Hugging Face does for each forward's length.
    """

    def __init__(
        self, head_dim: int, max_seq_len: int, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.scaling = dict(scaling) if scaling else None
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def _angles(self, start: int, end: int, device: torch.device, seq_len: int | None = None) -> torch.Tensor:
        inv_freq = inv_frequencies(self.head_dim, self.theta, self.scaling, seq_len=seq_len, device=device)
        return torch.outer(torch.arange(start, end, device=device, dtype=torch.float64), inv_freq)

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        angles = self._angles(0, self.max_seq_len, self.cos.device)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def _dynamic_past_context(self, end: int) -> bool:
        return (
            self.scaling is not None
            and self.scaling["rope_type"] == "dynamic"
            and end > self.scaling["original_max_position_embeddings"]
        )

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate x of shape [batch, seq, heads, head_dim] for positions start_pos..start_pos+seq-1."""
        seq = x.shape[1]
        end = start_pos + seq
        if end > self.max_seq_len:
            raise ValueError(f"position {end} exceeds max_seq_len={self.max_seq_len}; raise max_seq_len in the config")
        if self._dynamic_past_context(end):
            angles = self._angles(start_pos, end, self.cos.device, seq_len=end)
            cos, sin = angles.cos().float().view(1, seq, 1, -1), angles.sin().float().view(1, seq, 1, -1)
        else:
            cos = self.cos[start_pos:end].view(1, seq, 1, -1)
            sin = self.sin[start_pos:end].view(1, seq, 1, -1)
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).type_as(x)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta}, scaling={self.scaling}"
