"""Decoding with the model's KV cache."""

from __future__ import annotations

import torch

from model.llama import Transformer


@torch.inference_mode()
def greedy_generate(
    model: Transformer, prompt: list[int], max_new_tokens: int, *, eos_id: int | None = None
) -> list[int]:
    """Greedy continuation of one prompt: the prompt in one forward, then one token per step from the cache."""
    total = len(prompt) + max_new_tokens
    if not prompt or total > model.args.max_seq_len:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + {max_new_tokens} new must be non-empty and fit max_seq_len="
            f"{model.args.max_seq_len}"
        )
    device = model.norm.weight.device
    model.setup_cache(1, total)
    logits = model(torch.tensor([prompt], device=device), start_pos=0)
    out: list[int] = []
    for pos in range(len(prompt), total):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos_id or pos == total - 1:
            break
        logits = model(torch.tensor([[token]], device=device), start_pos=pos)
    return out
