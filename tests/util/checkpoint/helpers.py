"""Shared by the checkpoint tests: a tiny LLaMA state dict in Meta's names, and small helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from util.checkpoint import CheckpointError, meta_split_dim, save_checkpoint

PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 128,
    "multiple_of": 32,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_seq_len": 128,
}

HIDDEN = 192  # Meta's rule for dim 64, multiple_of 32: int(2 * 4 * 64 / 3) = 170 -> 192

HEAD_DIM = 16

LINUX = sys.platform.startswith("linux")


def make_state_dict(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim, kv = PARAMS["dim"], PARAMS["n_kv_heads"] * HEAD_DIM

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    sd = {"tok_embeddings.weight": r(128, dim)}
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        sd |= {
            p + "attention.wq.weight": r(dim, dim),
            p + "attention.wk.weight": r(kv, dim),
            p + "attention.wv.weight": r(kv, dim),
            p + "attention.wo.weight": r(dim, dim),
            p + "feed_forward.w1.weight": r(HIDDEN, dim),
            p + "feed_forward.w2.weight": r(dim, HIDDEN),
            p + "feed_forward.w3.weight": r(HIDDEN, dim),
            p + "attention_norm.weight": r(dim),
            p + "ffn_norm.weight": r(dim),
        }
    sd |= {"norm.weight": r(dim), "output.weight": r(128, dim), "rope.freqs": r(HEAD_DIM // 2)}
    return sd


def chunk(t: torch.Tensor, shard_dim: int | None, rank: int, world_size: int) -> torch.Tensor:
    return t if shard_dim is None else t.chunk(world_size, dim=shard_dim)[rank]


def shard_dims_of(sd: dict[str, torch.Tensor]) -> dict[str, int | None]:
    return {k: meta_split_dim(k) for k in sd}


def mapped_file(ptr: int) -> str | None:
    """The file whose mapping contains address `ptr` (Linux /proc/self/maps), or None for anonymous memory."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def assert_names_file(err: pytest.ExceptionInfo[CheckpointError], name: str) -> None:
    assert name in str(err.value), f"expected {name!r} in the message: {err.value}"


def save_lazyllama(out: Path, sd: dict[str, torch.Tensor], world_size: int, **kw) -> None:
    dims = shard_dims_of(sd)
    for rank in range(world_size):
        local = {k: chunk(v, dims[k], rank, world_size) for k, v in sd.items()}
        save_checkpoint(out, local, shard_dims=dims, rank=rank, world_size=world_size, **kw)
