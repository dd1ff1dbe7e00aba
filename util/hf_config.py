"""Hugging Face Llama config.json -> ModelArgs fields, for the layouts transformers 4 and 5 write.

Every field of the file is accounted for: translated (MAPPED, the rope fields, head_dim, token ids), accepted
because it cannot change the model's outputs here (NO_EFFECT), accepted only at the value that matches this
implementation (MUST_BE), or refused by name. A field nobody here knows is refused too: a config that asks for
different math (attention biases, another activation, YaRN RoPE, ...) must never load as a plain Llama.

RoPE, in either layout:
- transformers 4: top-level `rope_theta` and `rope_scaling` ({"type" or "rope_type": ..., "factor": ...} or null);
- transformers 5: `rope_parameters` {"rope_type", "rope_theta", "factor", ...}.
As in transformers, values inside `rope_scaling` / `rope_parameters` win over top-level ones, a "default"
rope_type means no scaling, llama3 scaling without `original_max_position_embeddings` uses
max_position_embeddings (a top-level `original_max_position_embeddings` wins over both), and dynamic NTK scaling
grows the base past max_position_embeddings (recorded as the scaling's original_max_position_embeddings, so a
larger max_seq_len set later keeps the same math).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.args import ROPE_SCALING_KEYS

# config.json field -> ModelArgs field, copied as they are (null: not given)
MAPPED = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "ffn_hidden_dim",
    "rms_norm_eps": "norm_eps",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_seq_len",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters", "original_max_position_embeddings", "head_dim")

# Fields that do not change the outputs of a loaded model: bookkeeping, the dtype the file was saved in (the
# build's dtype decides), generation/runtime switches, the init range of a fresh model (weights come from the
# file), pretraining_tp (transformers 4 split the same products in slices: equal up to rounding; transformers 5
# ignores it), and quantization_config (how the weights are stored: the checkpoint reader decides about it).
NO_EFFECT = frozenset(
    {
        "_name_or_path",
        "_attn_implementation_autoset",
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "initializer_range",
        "pretraining_tp",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "max_length",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "quantization_config",
    }
)

# Fields accepted only at the value this implementation computes (a different value is different math).
MUST_BE: dict[str, tuple[Any, ...]] = {
    "model_type": ("llama",),
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "attention_dropout": (0, 0.0),
    "partial_rotary_factor": (1, 1.0),
}
# What each refused value would need (the error says it).
_WHY = {
    "model_type": "only Llama models are implemented",
    "hidden_act": "the feed-forward is SwiGLU with silu",
    "attention_bias": "the attention projections have no biases",
    "mlp_bias": "the feed-forward projections have no biases",
    "attention_dropout": "attention has no dropout (set it to 0.0 to train without it)",
    "partial_rotary_factor": "RoPE rotates the whole head",
}


def _fail(source: str | Path, message: str) -> ValueError:
    return ValueError(f"{source}: {message}")


def _rope(hf: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    """rope_theta and rope_scaling (ModelArgs fields) from either layout."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    if not isinstance(scaling, Mapping):
        raise _fail(source, f"{where} must be an object or null, got {scaling!r}")
    rope = dict(scaling)
    theta = rope.pop("rope_theta", None)
    if theta is None:
        theta = hf.get("rope_theta")
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)  # transformers keeps the legacy key beside rope_type
    out: dict[str, Any] = {} if theta is None else {"rope_theta": float(theta)}
    if "partial_rotary_factor" in rope:
        value = rope.pop("partial_rotary_factor")
        if value not in MUST_BE["partial_rotary_factor"]:
            raise _fail(
                source, f"{where}.partial_rotary_factor={value!r} is not implemented: RoPE rotates the whole head"
            )
    if kind == "default":
        if rope:
            raise _fail(source, f"{where} with rope_type 'default' has unexpected field(s) {sorted(rope)}")
        return out
    if kind not in ROPE_SCALING_KEYS:
        raise _fail(
            source,
            f"{where}.rope_type={kind!r} is not implemented (implemented: default, {', '.join(ROPE_SCALING_KEYS)}); "
            "this model's positions would be computed differently",
        )
    if kind == "llama3":
        if hf.get("original_max_position_embeddings") is not None:
            rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if kind == "dynamic":
        if "original_max_position_embeddings" in rope:
            raise _fail(
                source,
                f"{where}.original_max_position_embeddings with rope_type 'dynamic': transformers scales from "
                "max_position_embeddings and ignores it; remove it (or set max_position_embeddings to it)",
            )
        rope["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    expected = set(ROPE_SCALING_KEYS[kind])
    if extra := sorted(set(rope) - expected):
        raise _fail(
            source, f"{where} field(s) {extra} are not implemented for rope_type {kind!r} (known: {sorted(expected)})"
        )
    if missing := sorted(k for k in expected if rope.get(k) is None):
        raise _fail(source, f"{where} of rope_type {kind!r} needs {missing}")
    out["rope_scaling"] = {"rope_type": kind, **{k: rope[k] for k in ROPE_SCALING_KEYS[kind]}}
    return out


def hf_config_to_params(hf: Mapping[str, Any], *, source: str | Path = "config.json") -> dict[str, Any]:
    """Map a Hugging Face Llama config.json (a dict) to ModelArgs fields; `source` names the file in errors.

    Raises ValueError naming the field and the file for anything not implemented or not known.
    """
    unknown = sorted(set(hf) - set(MAPPED) - set(ROPE_FIELDS) - NO_EFFECT - set(MUST_BE))
    if unknown:
        raise _fail(
            source,
            f"unknown field(s) {unknown}: not implemented here, and they may change the model's math. "
            f"Read: {sorted(MAPPED) + list(ROPE_FIELDS)}; accepted at fixed values: {sorted(MUST_BE)}; "
            "accepted as without effect: see util/hf_config.py NO_EFFECT",
        )
    for field, allowed in MUST_BE.items():
        if field in hf and hf[field] not in allowed:
            raise _fail(source, f"{field}={hf[field]!r} is not implemented: {_WHY[field]} (accepted: {list(allowed)})")
    arch = hf.get("architectures") or []
    if not isinstance(arch, list) or any(a not in ("LlamaForCausalLM", "LlamaModel") for a in arch):
        raise _fail(source, f"architectures={arch!r}: only LlamaForCausalLM is implemented")
    params = {ours: hf[theirs] for theirs, ours in MAPPED.items() if hf.get(theirs) is not None}
    if "n_heads" in params and "n_kv_heads" not in params:
        params["n_kv_heads"] = params["n_heads"]  # transformers' default when the field is absent (no GQA)
    head_dim = hf.get("head_dim")
    if head_dim is not None and not (
        "dim" in params and "n_heads" in params and head_dim * params["n_heads"] == params["dim"]
    ):
        params["head_size"] = head_dim  # only when it differs from dim // n_heads, so params stay Meta-like
    params.update(_rope(hf, source))
    return params


def params_to_hf_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json fields for RoPE, head_dim, tying and token ids of a model with these ModelArgs fields, in
    the layout both transformers 4 (>= 4.43, for llama3) and 5 read: top-level rope_theta and rope_scaling.

    For an exporter: merge these into the config.json it writes (they override its rope_theta,
    max_position_embeddings and tie_word_embeddings).
    """
    from model.args import META_LLAMA3_ROPE_SCALING

    scaling = dict(META_LLAMA3_ROPE_SCALING) if params.get("use_scaled_rope") else params.get("rope_scaling")
    max_pos = params.get("max_seq_len", 2048)
    if scaling and scaling["rope_type"] == "dynamic":
        # transformers grows the base past max_position_embeddings: it must be the scaling's original length
        max_pos = scaling["original_max_position_embeddings"]
        scaling = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    head_dim = params.get("head_size") or params["dim"] // params["n_heads"]
    fields = {
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "rope_scaling": dict(scaling) if scaling else None,
        "max_position_embeddings": max_pos,
        "head_dim": head_dim,
        "tie_word_embeddings": bool(params.get("tie_word_embeddings", False)),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if params.get(key) is not None:
            fields[key] = params[key]
    return fields
