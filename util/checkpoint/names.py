"""Tensor names and split rules: Meta LLaMA's names <-> Hugging Face's, the dim each Meta tensor is split on
across model-parallel ranks, and the q/k row permutation HF applies for its rotate_half RoPE.

Pure functions of names and tensors; no files.
"""

from __future__ import annotations

import re

import torch

from util.checkpoint.errors import CheckpointError

# Meta's model-parallel layout: column-parallel weights are split on dim 0, row-parallel ones and the
# embedding on dim 1, norms replicated. "unknown" marks names Meta's layout does not cover (LoRA, adapters,
# ...).
_META_LAYER_SPLIT: dict[str, int | None] = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
_META_TOP_SPLIT: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "rope.freqs": None,
}
LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
UNKNOWN = "unknown"


def meta_rule(key: str) -> int | None | str:
    """Meta's split dim for `key`, None for replicated, or "unknown" for a name outside Meta's layout."""
    if key in _META_TOP_SPLIT:
        return _META_TOP_SPLIT[key]
    m = LAYER_RE.fullmatch(key)
    if m and m.group(2) in _META_LAYER_SPLIT:
        return _META_LAYER_SPLIT[m.group(2)]
    return UNKNOWN


def meta_split_dim(key: str) -> int | None:
    """The dim Meta's checkpoints split `key` on across model-parallel ranks (None: replicated or unknown)."""
    rule = meta_rule(key)
    return None if rule == UNKNOWN else rule  # type: ignore[return-value]


_HF_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_META_TOP_TO_HF = {v: k for k, v in _HF_TOP.items()}
_META_LAYER_TO_HF = {v: k for k, v in _HF_LAYER.items()}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_to_meta_name(name: str) -> str | None:
    """Meta's name for a Hugging Face LLaMA tensor name; None for keys to ignore; unknown names unchanged."""
    if name.endswith("rotary_emb.inv_freq"):  # a cached RoPE table some HF versions save; recomputed by the model
        return None
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return name


def meta_to_hf_name(name: str) -> str:
    """Hugging Face's name for a Meta LLaMA tensor name; unknown names unchanged."""
    if name in _META_TOP_TO_HF:
        return _META_TOP_TO_HF[name]
    m = LAYER_RE.fullmatch(name)
    if m and m.group(2) in _META_LAYER_TO_HF:
        return f"model.layers.{m.group(1)}.{_META_LAYER_TO_HF[m.group(2)]}"
    return name


def qk_heads_param(key: str) -> str | None:
    """Which config field counts the heads of a q/k projection HF permutes ("n_heads"/"n_kv_heads")."""
    m = LAYER_RE.fullmatch(key)
    if m and m.group(2) == "attention.wq.weight":
        return "n_heads"
    if m and m.group(2) == "attention.wk.weight":
        return "n_kv_heads"
    return None


def check_qk(w: torch.Tensor, n_heads: int, what: str) -> int:
    if w.dim() != 2 or n_heads <= 0 or w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise CheckpointError(
            f"{what}: cannot undo/apply the Hugging Face q/k permutation to shape {tuple(w.shape)} with "
            f"{n_heads} heads (expected a 2-D weight whose rows are n_heads * an even head_dim); "
            "check num_attention_heads / num_key_value_heads in the config"
        )
    return w.shape[0] // n_heads


def hf_permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF layout of a q/k projection (as HF's convert_llama_weights_to_hf.py does).

    Meta's RoPE rotates interleaved pairs (rows 2j, 2j+1 of each head); HF's rotate_half pairs row j with row
    j + head_dim/2. So HF row j of a head is Meta row 2j and HF row head_dim/2 + j is Meta row 2j + 1.
    """
    head_dim = check_qk(w, n_heads, "hf_permute_qk")
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def hf_unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta layout of a q/k projection: the exact inverse of `hf_permute_qk`. Works on whole heads."""
    head_dim = check_qk(w, n_heads, "hf_unpermute_qk")
    return w.reshape(n_heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
