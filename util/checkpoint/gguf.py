"""GGUF (llama.cpp, Ollama, LM Studio): one `*.gguf` file, or a directory holding exactly one, of the "llama"
architecture, read with llama.cpp's own `gguf` package.

The config comes from the `llama.*` metadata (a key the model needs and the file lacks is an error naming both);
other architectures are refused by name. Tensors are renamed from llama.cpp's names to Meta's; q/k rows are already
in Meta's layout (llama.cpp rotates adjacent pairs like Meta's reference, and util/export/gguf.py writes them so).
f32 / f16 / bf16 tensors are handed out as they are stored; quantized ones (q8_0, q4_0, ...) are dequantized with
gguf.quants.dequantize to float32, which the loader casts into the model dtype. llama.cpp's `rope_freqs.weight`
(Llama 3.1's per-frequency RoPE divisors) is not a model tensor: it is turned back into the llama3 rope_scaling
that produces it, or refused when no known setting does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util.checkpoint.errors import CheckpointError
from util.checkpoint.reader import CheckpointFormat, CheckpointReader, Layout, Piece, merge_layout

_TOP = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_BLK_RE = re.compile(r"blk\.(\d+)\.(.+)")
# llama.* metadata -> ModelArgs field; the first group must be present
_REQUIRED = {
    "embedding_length": "dim",
    "block_count": "n_layers",
    "attention.head_count": "n_heads",
    "feed_forward_length": "ffn_hidden_dim",
    "attention.layer_norm_rms_epsilon": "norm_eps",
}
_OPTIONAL = {
    "attention.head_count_kv": "n_kv_heads",
    "context_length": "max_seq_len",
    "rope.freq_base": "rope_theta",  # llama.cpp's default, like ours, is 10000
    "vocab_size": "vocab_size",
}
# Llama 3.1 / 3.2's published llama3 settings (all but `factor`, which is the largest divisor): rope_freqs.weight
# is matched against what they give
_LLAMA3_KNOWN = [{"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}]


def meta_name(name: str) -> str | None:
    """Meta's name of a llama.cpp tensor (None: not a model tensor, e.g. rope_freqs.weight)."""
    if name in _TOP:
        return _TOP[name]
    m = _BLK_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def _value(field: Any) -> Any:
    v = field.contents()
    return v.item() if isinstance(v, np.generic) else v


class GGUFCheckpoint(CheckpointReader):
    def __init__(self, path: Path, file: Path):
        import gguf

        try:
            self._reader = gguf.GGUFReader(file, "c")  # copy-on-write: writable views, the file untouched
        except Exception as e:  # the reader raises ValueError / IndexError / struct errors on a cut-off file
            raise CheckpointError(
                f"{file}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated (copy or download "
                "it again)"
            ) from None
        self.file = file
        size = file.stat().st_size
        fields = {name: f for name, f in self._reader.fields.items()}
        arch = _value(fields["general.architecture"]) if "general.architecture" in fields else None
        if arch != "llama":
            raise CheckpointError(
                f"{file}: general.architecture is {arch!r}; only the 'llama' architecture is read (its tensors and "
                "metadata are what this model implements)"
            )
        self._tensors: dict[str, Any] = {}
        rope_freqs = None
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{file}: tensor {t.name!r} ends past the end of the file; it is truncated")
            key = meta_name(t.name)
            if t.name == "rope_freqs.weight":
                rope_freqs = t
            elif key is None:
                raise CheckpointError(
                    f"{file}: tensor {t.name!r} is not part of a llama model this project builds (expected "
                    "token_embd, blk.N.attn_q/k/v/output, ffn_gate/down/up, attn_norm, ffn_norm, output_norm, output)"
                )
            else:
                self._tensors[key] = t
        super().__init__(path, "gguf", self._config(fields, rope_freqs))
        self.info = {"file": str(file)}

    def _config(self, fields: dict[str, Any], rope_freqs: Any) -> dict[str, Any]:
        def get(key: str, required: bool) -> Any:
            field = fields.get(f"llama.{key}")
            if field is None:
                if required:
                    raise CheckpointError(f"{self.file}: metadata key 'llama.{key}' is missing; the model needs it")
                return None
            return _value(field)

        config: dict[str, Any] = {}
        for key, ours in _REQUIRED.items():
            config[ours] = get(key, True)
        for key, ours in _OPTIONAL.items():
            value = get(key, False)
            if value is not None:
                config[ours] = value
        if get("expert_count", False):
            raise CheckpointError(f"{self.file}: llama.expert_count is set (a mixture of experts); not supported")
        head_dim = get("attention.key_length", False) or config["dim"] // config["n_heads"]
        value_len = get("attention.value_length", False)
        rope_dim = get("rope.dimension_count", False)
        for key, v in (("attention.value_length", value_len), ("rope.dimension_count", rope_dim)):
            if v is not None and v != head_dim:
                raise CheckpointError(
                    f"{self.file}: llama.{key} is {v}, the head width {head_dim}; this model rotates and attends "
                    "over whole heads"
                )
        if head_dim != config["dim"] // config["n_heads"]:
            config["head_size"] = head_dim
        kind = get("rope.scaling.type", False)
        if kind == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", True))}
        elif kind not in (None, "none"):
            raise CheckpointError(
                f"{self.file}: llama.rope.scaling.type {kind!r} is not supported (linear is, and llama3 scaling as "
                "rope_freqs.weight)"
            )
        if rope_freqs is not None:
            config["rope_scaling"] = self._llama3_scaling(rope_freqs, head_dim, config.get("rope_theta", 10000.0))
        config["tie_word_embeddings"] = "output.weight" not in self._tensors
        for key, ours in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            field = fields.get(f"tokenizer.ggml.{key}")
            if field is not None:
                config[ours] = _value(field)
        if "vocab_size" not in config and "tok_embeddings.weight" in self._tensors:
            config["vocab_size"] = int(self._tensors["tok_embeddings.weight"].shape[1])
        return config

    def _llama3_scaling(self, t: Any, head_dim: int, theta: float) -> dict[str, Any]:
        """The llama3 rope_scaling whose divisors are rope_freqs.weight."""
        import gguf

        from model.layers.rope import inv_frequencies

        got = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)).flatten()
        plain = inv_frequencies(head_dim, theta)
        for known in _LLAMA3_KNOWN:
            scaling = {"rope_type": "llama3", "factor": float(got.max()), **known}
            want = plain / inv_frequencies(head_dim, theta, scaling)
            if want.shape == got.shape and torch.allclose(want, got, rtol=1e-6, atol=0):
                return scaling
        raise CheckpointError(
            f"{self.file}: rope_freqs.weight holds RoPE divisors no known llama3 rope scaling gives (tried factor "
            f"{float(got.max())} with {_LLAMA3_KNOWN}); building without them would rotate differently"
        )

    def keys(self) -> set[str]:
        return set(self._tensors)

    def _make_layout(self, key: str, shard_dim: int | None) -> Layout:
        import gguf

        t = self._tensors[key]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        T = gguf.GGMLQuantizationType
        if t.tensor_type in (T.F32, T.F16):
            dtype = torch.float32 if t.tensor_type == T.F32 else torch.float16

            def load() -> torch.Tensor:
                return torch.from_numpy(t.data).reshape(shape)  # a view of the mapped file
        elif t.tensor_type == T.BF16:
            dtype = torch.bfloat16

            def load() -> torch.Tensor:
                return torch.from_numpy(t.data).view(torch.bfloat16).reshape(shape)
        elif t.tensor_type in gguf.GGML_QUANT_SIZES:
            dtype = torch.float32

            def load() -> torch.Tensor:
                try:
                    values = gguf.quants.dequantize(t.data, t.tensor_type)
                except NotImplementedError:
                    raise CheckpointError(
                        f"{self.file}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf package cannot "
                        "dequantize; requantize the file to f16, bf16, q8_0 or q4_0"
                    ) from None
                return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
        else:
            raise CheckpointError(f"{self.file}: tensor {t.name!r} has unknown type {t.tensor_type}")
        return merge_layout(key, None, [Piece(str(self.file), shape, dtype, load, lambda: None)])

    def close(self) -> None:
        super().close()
        self._tensors.clear()


def _gguf_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    found = sorted(path.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def detect(path: Path) -> bool:
    """A .gguf file, or a directory holding some (opening it says so unless it is exactly one)."""
    return path.suffix == ".gguf" if path.is_file() else any(path.glob("*.gguf"))


def open_gguf(path: Path) -> GGUFCheckpoint:
    file = _gguf_file(path)
    if file is None:
        found = sorted(p.name for p in path.glob("*.gguf")) if path.is_dir() else []
        raise CheckpointError(
            f"{path}: expected a .gguf file or a directory holding exactly one (found {found or 'none'}); pass the "
            "file itself"
        )
    return GGUFCheckpoint(path, file)


FORMAT = CheckpointFormat("gguf", detect, open_gguf, "*.gguf (llama.cpp GGUF, llama architecture)")
