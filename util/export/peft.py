"""A LoRA delta as a peft adapter: adapter_model.safetensors + adapter_config.json, which
`peft.PeftModel.from_pretrained` loads over the Hugging Face export of the base model.

peft's LoRA is the same update as ours (W x + (alpha / r) B A x); only names and the q/k layout differ: the base's
q/k rows are in HF's rotary order, so lora_B's rows (the update's output rows) get the same permutation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from util.checkpoint.errors import CheckpointError
from util.checkpoint.files import atomic_write, write_json
from util.checkpoint.names import hf_permute_qk, meta_to_hf_name, qk_heads_param
from util.checkpoint.safetensors import WriteItem, write_safetensors

_LORA_RE = re.compile(r"(layers\.\d+\.(?:attention|feed_forward)\.(w[qkvo123]))\.lora\.lora_([ab])")


def write_peft_adapter(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    params: Mapping[str, Any],
    base_model: str = "",
) -> Path:
    """Write the LoRA tensors of a (non-model-parallel) model state as a peft adapter.

    `tensors` holds the LoRA tensors (`layers.N.attention.wq.lora.lora_a` ...) and may hold base weights, which are
    skipped; any other trainable kind (bias tuning, LLaMA-Adapter) has no peft LoRA equivalent and is refused.
    """
    rank, alpha = int(params.get("lora_rank", 0)), float(params.get("lora_alpha", 16.0))
    if rank <= 0:
        raise CheckpointError("peft export: the model has no LoRA (lora_rank is 0 in its config): nothing to write")
    other = sorted(k for k in tensors if ".bias_tune." in k or "adapter" in k)
    if other:
        raise CheckpointError(f"peft export: peft's LoRA has no place for {other[:4]}; export to hf (merged) instead")
    heads = {"n_heads": int(params["n_heads"]), "n_kv_heads": int(params.get("n_kv_heads") or params["n_heads"])}
    items: list[WriteItem] = []
    targets: set[str] = set()
    for key, t in tensors.items():
        m = _LORA_RE.fullmatch(key)
        if not m:
            continue
        weight_key = m.group(1) + ".weight"
        hf = meta_to_hf_name(weight_key).removesuffix(".weight")
        targets.add(hf.rsplit(".", 1)[-1])
        t = t.detach().float().cpu()
        if m.group(3) == "b" and (field := qk_heads_param(weight_key)):
            t = hf_permute_qk(t, heads[field])
        name = f"base_model.model.{hf}.lora_{m.group(3).upper()}.weight"
        items.append(WriteItem(name, t.dtype, tuple(t.shape), (lambda t=t: t)))
    if not items:
        raise CheckpointError("peft export: no LoRA tensors in the model (was the LoRA delta given after the base?)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "adapter_model.safetensors") as f:
        write_safetensors(f, items, {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(params.get("lora_dropout", 0.0)),
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    write_json(out / "adapter_config.json", config)
    return out
