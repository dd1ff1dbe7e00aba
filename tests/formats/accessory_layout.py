"""Test helper: write a LLaMA2-Accessory checkpoint the way Accessory's own code does, from tensors in Meta's names.

Learned from Alpha-VLLM/LLaMA2-Accessory (not copied): util/misc.py `save_checkpoint` writes, per model-parallel
rank, `consolidated.{rank:02d}-of-{size:02d}.model.pth` = torch.save({"model": model.state_dict()}) of the MetaModel
wrapper (so every key starts with `llma.`), then config.json (dataclasses.asdict of the LLM's ModelArgs) and meta.json
({"llama_type": ...}). model/LLM/llama_peft.py: every projection is a Lora{Column,Row}ParallelLinear whose bias is the
bias-tuning bias and whose LoRA children are `lora_a` / `lora_b` (nn.Linear or fairscale parallel linears, each with
a `.weight`), added unscaled. util/tensor_parallel.py splits by layer class: ColumnParallelLinear weight and bias dim
0, RowParallelLinear weight dim 1 (bias whole), ParallelEmbedding dim 1; anything else is whole on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW = ("attention.wo", "feed_forward.w2")

# Accessory's ModelArgs fields (model/LLM/llama.py; llama_peft.py adds the last three)
LLAMA_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "max_batch_size",
    "max_seq_len",
    "rope_scaling",
)


def accessory_config(args, llama_type: str, **peft) -> dict:
    cfg = {f: getattr(args, f, None) for f in LLAMA_FIELDS}
    if llama_type == "llama_peft":
        cfg |= {"lora_rank": -1, "bias_tuning": True, "norm_tuning": True} | peft
    return cfg


def _class_split(name: str) -> int | None:
    """The split dim of an Accessory state-dict key (without `llma.`), by the class of the module that owns it."""
    module, leaf = name.rsplit(".", 1)
    parts = module.split(".")
    if module == "tok_embeddings":  # ParallelEmbedding
        return 1
    if module == "output":  # ColumnParallelLinear
        return 0
    if parts[-1] in ("lora_a", "lora_b"):  # the LoRA child of a projection
        proj = ".".join(parts[2:-1])
        if parts[-1] == "lora_b" and proj in COLUMN:  # ColumnParallelLinear(r, out)
            return 0
        if parts[-1] == "lora_a" and proj in ROW:  # RowParallelLinear(in, r)
            return 1
        return None  # nn.Linear
    proj = ".".join(parts[2:])
    if proj in COLUMN:
        return 0
    if proj in ROW:
        return 1 if leaf == "weight" else None
    return None


def accessory_state_dict(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta names (+ this project's `X.lora.lora_a`, `X.lora.lora_b`, `X.bias_tune.bias`) -> Accessory's."""
    out = {}
    for k, v in ours.items():
        k = k.replace(".lora.lora_a", ".lora_a.weight").replace(".lora.lora_b", ".lora_b.weight")
        k = k.replace(".bias_tune.bias", ".bias")
        out["llma." + k] = v
    return out


def write_accessory(
    out: Path,
    ours: dict[str, torch.Tensor],
    *,
    config: dict | None,
    llama_type: str = "llama",
    mp: int = 1,
    dtype: torch.dtype | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    sd = accessory_state_dict(ours)
    for rank in range(mp):
        shard = {}
        for k, v in sd.items():
            d = _class_split(k.removeprefix("llma."))
            t = v if d is None or mp == 1 else v.chunk(mp, dim=d)[rank]
            shard[k] = t.clone().to(dtype or t.dtype)
        torch.save({"model": shard}, out / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth")
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
    return out
