"""Model configuration: one dataclass, JSON merging, and presets."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class ModelArgs:
    # --- LLaMA shape (names and meaning as in Meta's params.json) ---
    dim: int = 4096  # model width
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention (None: = n_heads)
    vocab_size: int = -1  # -1 (Meta's convention): filled from the tokenizer or the checkpoint
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # scales the SwiGLU hidden size (LLaMA-2 70B: 1.3)
    ffn_hidden_dim: int | None = None  # explicit SwiGLU hidden size (Hugging Face intermediate_size); wins
    head_size: int | None = None  # explicit per-head width (Hugging Face head_dim); None: dim // n_heads
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"dynamic"|"llama3", "factor": ...}: ROPE_SCALING_KEYS
    use_scaled_rope: bool = False  # Meta's params.json (Llama 3.1+): llama3 scaling with Meta's constants
    tie_word_embeddings: bool = False  # the output head is the token embedding (no separate output.weight)
    max_seq_len: int = 2048  # longest sequence (RoPE table and KV cache size)
    max_batch_size: int = 32  # KV cache batch size for generation

    # --- special token ids from the checkpoint's config (None: the tokenizer's own) ---
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # Llama 3 instruct models stop on several
    pad_token_id: int | None = None

    # --- adapters (used by the adapter issues; defaults leave the plain model) ---
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    adapter_len: int = 0  # LLaMA-Adapter prefix length (0: off)
    adapter_layers: int = 0  # prefix on the top N layers
    bias_tuning: bool = False
    norm_tuning: bool = False

    # --- multimodal (a visual backbone beside the LLM; None: text only) ---
    visual_backbone: str | None = None  # "open_clip:ViT-L-14" or "timm:vit_base_patch16_224"
    visual_kwargs: dict = dataclasses.field(default_factory=dict)  # backbone config overrides (tiny test models)
    visual_weights: str | None = None  # local file with the backbone's weights (scripts/convert_visual_weights.py)
    visual_mode: str = "tokens"  # "tokens": image tokens in the LLM input; "prefix": LLaMA-Adapter visual prefix
    visual_proj: str = "mlp"  # projection to the LLM width: "linear" or "mlp"
    visual_trainable: bool = False  # the backbone is frozen unless this is set

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.lora_targets, list):
            self.lora_targets = tuple(self.lora_targets)
        # types and ranges first: a 0 or a string below would surface as a ZeroDivisionError or TypeError
        numbers_given = {name: getattr(self, name) for name in (*_MINIMUM, *_POSITIVE, "vocab_size", "lora_alpha")}
        for name, value in numbers_given.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"ModelArgs: {name}={value!r} is not a valid value: expected a number")
        problems = _range_problems(self)
        if problems:
            raise ValueError("invalid ModelArgs: " + "; ".join(problems))
        if self.head_size is None and self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads} (or give head_size)")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        problems += rope_scaling_problems(self.rope_scaling)
        if self.rope_scaling and self.use_scaled_rope:
            problems.append("use_scaled_rope (Meta's llama3 scaling) and rope_scaling are both set: keep one")
        if problems:
            raise ValueError("invalid ModelArgs: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.dim // self.n_heads

    @property
    def rope_scaling_params(self) -> dict | None:
        """The RoPE scaling in effect: rope_scaling, or Meta's llama3 constants for use_scaled_rope, or None."""
        if self.use_scaled_rope:
            return dict(META_LLAMA3_ROPE_SCALING)
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size, computed exactly as Meta's reference does unless given explicitly."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(d["lora_targets"])
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "<dict>", base: ModelArgs | None = None) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {unknown}; known keys are {sorted(known)}")
        _check_types(values, source)
        merged = base.to_dict() if base is not None else {}
        merged.update(values)
        try:
            return cls(**merged)
        except ValueError as e:  # name the file whose values make the config invalid
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, *paths: str | Path, **overrides: Any) -> ModelArgs:
        """Merge JSON files in order (later files win), e.g. Meta's params.json then a LoRA config."""
        merged: dict[str, Any] = {}
        for path in paths:
            values = read_config_json(path)
            cls.from_dict(values, source=str(path))  # names the file holding an unknown key
            merged.update(values)
        merged.update(overrides)
        return cls.from_dict(merged, source=" + ".join(map(str, paths)) or "<overrides>")

    def with_vocab_size(self, vocab_size: int, *, source: str) -> ModelArgs:
        """Fill Meta's vocab_size=-1 (from a tokenizer or a checkpoint's embedding); check it otherwise."""
        if self.vocab_size == -1:
            return self.replace(vocab_size=vocab_size)
        if self.vocab_size != vocab_size:
            raise ValueError(f"vocab_size={self.vocab_size} in the config but {source} has {vocab_size}")
        return self


# The JSON types each annotation accepts (a float field takes an integer; a bool is no number here).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "dict": (dict,),
    "tuple[str, ...]": (list, tuple),
    "list[int]": (list,),
}


def _check_types(values: dict[str, Any], source: str) -> None:
    """A value of the wrong type is an error naming the key, not a TypeError deep in the model's construction."""
    for f in fields(ModelArgs):
        if f.name not in values:
            continue
        value, kinds = values[f.name], str(f.type).split(" | ")
        if value is None and "None" in kinds:
            continue
        ok = any(
            isinstance(value, _JSON_TYPES[k]) and not (isinstance(value, bool) and k in ("int", "float"))
            for k in kinds
            if k in _JSON_TYPES
        )
        if ok and isinstance(value, (list, tuple)):
            item = str if "tuple[str, ...]" in kinds else int
            ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        if not ok:
            raise TypeError(f"{source}: {f.name}={value!r} is not a valid value: expected {f.type}")


# Integer fields and their smallest valid value (vocab_size -1 is Meta's "from the tokenizer", checked apart).
_MINIMUM: dict[str, int] = {
    "dim": 1,
    "n_layers": 1,
    "n_heads": 1,
    "n_kv_heads": 1,
    "multiple_of": 1,
    "ffn_hidden_dim": 1,
    "head_size": 1,
    "max_seq_len": 1,
    "max_batch_size": 1,
    "lora_rank": 0,
    "adapter_len": 0,
    "adapter_layers": 0,
}


_POSITIVE = ("norm_eps", "rope_theta", "ffn_dim_multiplier")  # finite and > 0 where given


def _range_problems(a: ModelArgs) -> list[str]:
    """Values of the right type that no model can have (n_heads 0, lora_rank -3, a NaN epsilon), each named."""
    problems = [
        f"{name}={getattr(a, name)} must be >= {low}"
        for name, low in _MINIMUM.items()
        if getattr(a, name) is not None and getattr(a, name) < low
    ]
    if a.vocab_size != -1 and a.vocab_size < 1:
        problems.append(f"vocab_size={a.vocab_size} must be >= 1 (or -1: from the tokenizer/checkpoint)")
    if a.adapter_layers > a.n_layers:
        problems.append(f"adapter_layers={a.adapter_layers} exceeds n_layers={a.n_layers}")
    for name in _POSITIVE:
        value = getattr(a, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            problems.append(f"{name}={value} must be a finite number > 0")
    if not math.isfinite(a.lora_alpha):
        problems.append(f"lora_alpha={a.lora_alpha} must be finite")
    if not 0 <= a.lora_dropout < 1:
        problems.append(f"lora_dropout={a.lora_dropout} must be in [0, 1)")
    # Offline by construction: a hub id or URL would make open_clip/timm download at build time.
    for name in ("visual_backbone", "visual_weights"):
        value = getattr(a, name) or ""
        if any(marker in value for marker in ("hf-hub:", "hf_hub:", "://")):
            problems.append(
                f"{name}={value!r}: hub ids ('hf-hub:') and URLs are refused because nothing may be downloaded; "
                "use a built-in architecture name and a local visual_weights file (scripts/convert_visual_weights.py)"
            )
    return problems


# RoPE scalings implemented by model/layers/rope.py: the keys each type requires (nothing else is accepted).
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Meta's reference code (llama-models, Llama 3.1) applies these when params.json says use_scaled_rope: true.
META_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def rope_scaling_problems(scaling: Any) -> list[str]:
    """What is wrong with a rope_scaling value (empty when it is None or valid)."""
    if scaling is None:
        return []
    if not isinstance(scaling, dict):
        return [f"rope_scaling must be an object or null, got {scaling!r}"]
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        return [f"rope_scaling rope_type={kind!r} is not implemented; implemented: {sorted(ROPE_SCALING_KEYS)}"]
    problems = []
    expected = set(ROPE_SCALING_KEYS[kind]) | {"rope_type"}
    if missing := sorted(expected - set(scaling)):
        problems.append(f"rope_scaling of type {kind!r} needs {missing}")
    if extra := sorted(set(scaling) - expected):
        problems.append(f"rope_scaling of type {kind!r} does not take {extra} (expected {sorted(expected)})")
    for key in sorted(expected & set(scaling) - {"rope_type"}):
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"rope_scaling {key}={value!r} must be a positive number")
    if not problems and kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        problems.append("rope_scaling high_freq_factor must be greater than low_freq_factor")
    return problems


def read_config_json(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """A JSON object of config keys, with errors that name the file."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path}: expected a JSON object of config keys, got {type(values).__name__}")
    return values


# Presets: LLaMA-2 shapes, TinyLlama-1.1B, and a tiny one for tests and the quickstart.
PRESETS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=512,
        multiple_of=32,
        max_seq_len=128,
        max_batch_size=4,
    ),
    "1.1B": ModelArgs(
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        vocab_size=32000,
        ffn_hidden_dim=5632,
        max_seq_len=2048,
    ),
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=4096),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, max_seq_len=4096),
    "70B": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=32000,
        multiple_of=4096,
        ffn_dim_multiplier=1.3,
        max_seq_len=4096,
    ),
    # Llama 3.2 1B's shape (a 128k vocabulary, tied head); "llama3.2-1B-2L" is it at two layers, for measuring
    # what the vocabulary alone costs
    "llama3.2-1B": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_hidden_dim=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_seq_len=2048,
    ),
}
PRESETS["llama3.2-1B-2L"] = PRESETS["llama3.2-1B"].replace(n_layers=2)
# Llama 3 8B's shape: the 128k vocabulary with an untied head (two 1 GB bf16 tensors at this width)
PRESETS["llama3-8B"] = ModelArgs(
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    vocab_size=128256,
    ffn_hidden_dim=14336,
    rope_theta=500000.0,
    max_seq_len=2048,
)


def preset(name: str, **overrides: Any) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
