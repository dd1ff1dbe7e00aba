"""LLaMA-Adapter: learnable prefix prompts on the top layers, read through zero-initialized gates.

The prompts of the top `adapter_layers` layers live in one table (`adapter.weight`, [layers * len, dim]); each
of those layers' attention gets a per-head gate that starts at zero, so an untrained adapter changes nothing.
The multimodal variant adds visual prefix tokens to the prompts (Transformer.forward's `prefix`).
"""

from __future__ import annotations

import torch
from torch import nn

from model.layers.parallel import divide, init_sharded_, mp_world_size, normal_fill


class AdapterPrompt(nn.Module):
    init_when_missing = True  # new tensors: a base checkpoint does not have them

    def __init__(self, n_layers: int, length: int, dim: int) -> None:
        super().__init__()
        self.n_layers, self.length, self.dim = n_layers, length, dim
        self.weight = nn.Parameter(torch.empty(n_layers * length, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # nn.Embedding's N(0, 1); replicated on every model-parallel rank
            init_sharded_(self.weight, normal_fill(1.0), shard_dim=None, rank=0, world_size=1)

    def prompts(self, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """[n_layers, batch or 1, length, dim]; `prefix` ([batch, length, dim], e.g. projected image features)
        is added to every layer's prompt."""
        p = self.weight.view(self.n_layers, 1, self.length, self.dim)
        return p if prefix is None else p + prefix.to(p.dtype).unsqueeze(0)


class AdapterGate(nn.Module):
    """One gate per attention head (this rank's heads), applied as tanh(gate); zero at init."""

    init_when_missing = True
    shard_dims = {"gate": 0}

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.empty(divide(n_heads, mp_world_size(), "n_heads"), dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.gate.is_meta:
            with torch.no_grad():
                self.gate.zero_()

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        """attn: [batch, heads, seq, head_dim] from the prompt; returns it scaled per head."""
        return torch.tanh(self.gate).to(attn.dtype).view(1, -1, 1, 1) * attn
