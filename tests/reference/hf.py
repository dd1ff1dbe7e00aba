"""transformers + peft as the reference: a tiny LlamaForCausalLM (GQA) written by transformers itself, peft's LoRA
on all seven projections, and the map between their LoRA tensors and this project's.

Everything here is the reference's own code path (transformers' forward, loss and checkpoint writer; peft's LoRA);
the only translation is written out below from the layouts' definitions, not taken from the project: HF's
q/k rows are permuted per head for its rotate_half RoPE (HF row j of a head is Meta row 2j, HF row
head_dim/2 + j is Meta row 2j + 1), so LoRA's B (which produces rows) carries the same permutation, and A does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 384
# HF module path -> this project's (the seven LoRA targets)
PROJECTIONS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
}
N_HEADS, N_KV_HEADS = 4, 2


def hf_config(**overrides) -> LlamaConfig:
    """Tiny LLaMA with grouped-query attention (4 query heads share 2 KV heads), untied head, fp32."""
    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def write_hf_model(path: Path, *, seed: int, rope_theta: float = 10000.0) -> LlamaForCausalLM:
    """A random tiny LlamaForCausalLM saved by transformers' save_pretrained into `path` (safetensors).

    Norm weights are randomized too (HF initializes them to one, which would hide a model that ignored them).
    config.json is written with a top-level `rope_theta`, as transformers 4.x configs (most on the Hub) carry it;
    transformers 5 would nest it in `rope_parameters`.
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(rope_theta=rope_theta)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    assert rope.get("rope_type", "default") == "default", rope
    cfg["rope_theta"] = rope.get("rope_theta", rope_theta)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return model


def with_lora(model: LlamaForCausalLM, *, r: int = 8, alpha: float = 24.0, seed: int = 1, dropout: float = 0.0):
    """peft's LoRA on all seven projections, A and B both non-zero (seeded), scale alpha / r."""
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=[k.split(".")[1] for k in PROJECTIONS],
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    assert sum(p.requires_grad for p in peft_model.parameters()) == 2 * 7 * model.config.num_hidden_layers
    return peft_model


def _meta_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF row order of a q/k projection's output -> Meta's (per head: [evens..., odds...] -> interleaved)."""
    head_dim = w.shape[0] // heads
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def lora_tensors(peft_model, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """peft's LoRA tensors (or their gradients) under this project's names, in Meta's row order."""
    out = {}
    for name, p in peft_model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        # base_model.model.model.layers.{i}.{self_attn.q_proj}.lora_A.default.weight
        parts = name.split(".")
        layer, proj, which = parts[4], f"{parts[5]}.{parts[6]}", parts[7]
        ours = f"layers.{layer}.{PROJECTIONS[proj]}.lora.{'lora_a' if which == 'lora_A' else 'lora_b'}"
        t = (p.grad if grads else p).detach().clone()
        if which == "lora_B" and proj in ("self_attn.q_proj", "self_attn.k_proj"):
            t = _meta_rows(t, N_HEADS if proj == "self_attn.q_proj" else N_KV_HEADS)
        out[ours] = t
    return out


def copy_lora_into(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Set this project's (single-process) LoRA tensors to `values` (all of them must be named)."""
    params = {n: p for n, p in model.named_parameters() if ".lora." in n}
    assert params.keys() == values.keys(), sorted(set(params) ^ set(values))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])


def example(length: int, prompt: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels): random tokens, the first `prompt` positions masked with -100 (IGNORE_INDEX)."""
    tokens = torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))
    labels = tokens.clone()
    labels[:prompt] = -100
    return tokens, labels


def pad(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0):
    """Right-padded (tokens, labels, attention_mask); padding is -100 in the labels and 0 in the mask."""
    length = max(t.numel() for t, _ in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (t, lab) in enumerate(examples):
        tokens[i, : t.numel()], labels[i, : t.numel()], mask[i, : t.numel()] = t, lab, 1
    return tokens, labels, mask


def hf_loss_and_grads(peft_model, examples) -> tuple[float, dict[str, torch.Tensor]]:
    """transformers' own loss (mean next-token cross entropy over the labelled targets) of one padded batch and
    peft's LoRA gradients, mapped to this project's names."""
    peft_model.zero_grad(set_to_none=True)
    tokens, labels, mask = pad(examples)
    out = peft_model(input_ids=tokens, attention_mask=mask, labels=labels)
    out.loss.backward()
    return float(out.loss.detach()), lora_tensors(peft_model, grads=True)
