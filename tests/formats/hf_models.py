"""Test helper: tiny Hugging Face Llama models written by transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROPE_THETA = 500000.0
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_hf_llama(out: Path, *, seed: int = 0, **config) -> torch.nn.Module:
    """A random LlamaForCausalLM (grouped-query attention, rope theta 5e5) saved with save_pretrained; returns it.

    transformers 5 writes the theta inside `rope_parameters`; the top-level `rope_theta` (transformers 4's layout,
    same value) is added so the file reads the same under either layout.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = (
        dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=128,
            rope_theta=ROPE_THETA,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
        | config
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # norms away from 1, so a loader that dropped them would be caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    add_legacy_rope_theta(out)
    return model


def add_legacy_rope_theta(out: Path) -> None:
    """Add transformers 4's top-level `rope_theta` (the value transformers 5 keeps in `rope_parameters`)."""
    path = out / "config.json"
    saved = json.loads(path.read_text())
    saved["rope_theta"] = saved["rope_parameters"]["rope_theta"] if "rope_parameters" in saved else saved["rope_theta"]
    path.write_text(json.dumps(saved, indent=2))


def make_adapter(base_dir: Path, out: Path, *, seed: int = 1, targets=ALL, **lora):
    """A peft LoRA (r=8, alpha=16) on the base with non-zero random A and B, saved; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out)
    return model.eval()
