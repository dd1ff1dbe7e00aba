"""GGUF, the file llama.cpp (and Ollama, LM Studio) runs: one file with the weights, llama's hyperparameters and the
tokenizer, written with llama.cpp's own `gguf` package.

Tensors keep Meta's q/k row layout: llama.cpp's RoPE rotates adjacent pairs like Meta's reference, which is why
llama.cpp's converter undoes Hugging Face's permutation when it reads an HF checkpoint. 1-D tensors (norms) are
stored as f32, as llama.cpp expects; 2-D ones in the requested type (a row length that is not a whole number of
quantization blocks falls back to f16).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util.checkpoint.errors import CheckpointError
from util.export.tokenizer import GGUFVocab

# --quant for GGUF -> (ggml tensor type name, llama file type name)
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}

_TOP = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
_LAYER = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def gguf_name(key: str) -> str:
    """llama.cpp's tensor name for a Meta-named LLaMA tensor."""
    if key in _TOP:
        return _TOP[key]
    m = _LAYER_RE.fullmatch(key)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise CheckpointError(f"GGUF (llama architecture) has no tensor for {key!r}; merge LoRA and drop adapters first")


def llama3_rope_factors(head_dim: int, theta: float, scaling: Mapping[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's RoPE scaling (llama.cpp's rope_freqs.weight): 1 for short wavelengths,
    `factor` for long ones, a smooth blend between (the same rule as Meta's apply_scaling)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _to_numpy(t: torch.Tensor, qtype: Any) -> tuple[np.ndarray, Any]:
    """(data, raw type) for GGUFWriter.add_tensor: float tensors as numpy floats, quantized ones as packed bytes."""
    import gguf

    T = gguf.GGMLQuantizationType
    t = t.detach().to("cpu")
    if t.dim() == 1 or qtype == T.F32:
        return t.float().numpy(), T.F32
    if qtype == T.F16:
        return t.to(torch.float16).numpy(), T.F16
    if qtype == T.BF16:  # torch rounds to nearest even like gguf's own converter; raw bytes, little-endian
        return t.to(torch.bfloat16).view(torch.uint8).numpy(), T.BF16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if t.shape[-1] % block:
        return t.to(torch.float16).numpy(), T.F16
    return gguf.quants.quantize(t.float().numpy(), qtype), qtype


def write_gguf(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    params: Mapping[str, Any],
    vocab: GGUFVocab,
    quant: str = "f16",
    name: str = "lazyllama export",
) -> Path:
    """Write a llama-architecture GGUF file (atomically: a temp file renamed into place).

    `tensors` are Meta-named (merged, no adapters); `params` is the ModelArgs config. Metadata: context length,
    embedding length, block count, feed-forward length, head counts, RoPE base / dimension / scaling, RMS eps, file
    type, vocabulary size and the tokenizer (`vocab`). With params' tie_word_embeddings no output.weight is written
    (llama.cpp then uses token_embd). RoPE scaling: linear as metadata, llama3 as the rope_freqs.weight tensor;
    others (dynamic) are refused: llama.cpp has no equivalent.
    """
    import gguf

    if quant not in GGUF_TYPES:
        raise ValueError(f"GGUF --quant {quant!r}: choose one of {sorted(GGUF_TYPES)}")
    qtype = gguf.GGMLQuantizationType[GGUF_TYPES[quant][0]]
    file_type = gguf.LlamaFileType[GGUF_TYPES[quant][1]]
    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    head_dim = int(params.get("head_size") or dim // n_heads)
    theta = float(params.get("rope_theta", 10000.0))
    vocab_size = int(tensors["tok_embeddings.weight"].shape[0])
    hidden = int(tensors["layers.0.feed_forward.w1.weight"].shape[0])
    if len(vocab.tokens) != vocab_size:
        raise CheckpointError(f"GGUF: the tokenizer has {len(vocab.tokens)} tokens, the embedding {vocab_size} rows")
    scaling = params.get("rope_scaling")
    if params.get("use_scaled_rope"):
        from model.args import META_LLAMA3_ROPE_SCALING

        scaling = META_LLAMA3_ROPE_SCALING
    if scaling and scaling.get("rope_type") not in ("linear", "llama3"):
        raise CheckpointError(
            f"GGUF: rope_scaling type {scaling.get('rope_type')!r} has no llama.cpp equivalent (linear and llama3 do)"
        )

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        w.add_name(name)
        w.add_context_length(int(params.get("max_seq_len", 2048)))
        w.add_embedding_length(dim)
        w.add_block_count(int(params["n_layers"]))
        w.add_feed_forward_length(hidden)
        w.add_head_count(n_heads)
        w.add_head_count_kv(int(params.get("n_kv_heads") or n_heads))
        w.add_rope_dimension_count(head_dim)
        if head_dim != dim // n_heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(params.get("norm_eps", 1e-5)))
        w.add_file_type(file_type)
        if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(vocab_size)
        if scaling and scaling["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        # tokenizer
        w.add_tokenizer_model(vocab.model)
        if vocab.pre:
            w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.token_types)
        if vocab.merges:
            w.add_token_merges(vocab.merges)
        ids = vocab.special_ids
        for key, add in (
            ("bos", w.add_bos_token_id),
            ("eos", w.add_eos_token_id),
            ("unk", w.add_unk_token_id),
            ("pad", w.add_pad_token_id),
        ):
            if key in ids:
                add(ids[key])
        w.add_add_bos_token(vocab.add_bos)
        w.add_add_eos_token(vocab.add_eos)
        # tensors
        if scaling and scaling["rope_type"] == "llama3":
            w.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, theta, scaling))
        tied = bool(params.get("tie_word_embeddings", False))
        for key, t in tensors.items():
            if key == "rope.freqs" or (tied and key == "output.weight"):
                continue
            data, raw = _to_numpy(t, qtype)
            w.add_tensor(gguf_name(key), data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out
