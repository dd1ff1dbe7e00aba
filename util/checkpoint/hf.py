"""Hugging Face's LLaMA format: `config.json` + `model.safetensors`, or `model-0000N-of-0000M.safetensors` +
`model.safetensors.index.json`. Names are mapped to Meta's, and the q/k row permutation HF applies for its
rotate_half RoPE is undone on reading (applied on writing). Safetensors files with Meta's names (and no
lazyllama metadata) are read here as they are.

Holds the reader, the writer (`write_hf_checkpoint`), and the detection rule (config.json is
translated by util/hf_config.py); HF is the catch-all for safetensors, so it comes last in the registry.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from util.checkpoint import lazyllama
from util.checkpoint.errors import CheckpointError
from util.checkpoint.files import atomic_write, read_config, read_json, write_json
from util.checkpoint.names import (
    check_qk,
    hf_permute_qk,
    hf_to_meta_name,
    hf_unpermute_qk,
    meta_to_hf_name,
    qk_heads_param,
)
from util.checkpoint.reader import (
    CheckpointFormat,
    CheckpointReader,
    Layout,
    merge_layout,
    safetensors_piece,
    unknown_file_type,
)
from util.checkpoint.safetensors import SafetensorsFile, WriteItem, dtype_name, write_safetensors
from util.hf_config import hf_config_to_params, params_to_hf_fields

# The transformer-block projections (what HF quantizes: every nn.Linear except lm_head)
_PROJECTION = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")


def _ffn_hidden_dim(params: Mapping[str, Any]) -> int:
    """SwiGLU hidden size by Meta's rule unless given explicitly (same rule as ModelArgs.hidden_dim)."""
    if params.get("ffn_hidden_dim") is not None:
        return int(params["ffn_hidden_dim"])
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    return multiple_of * math.ceil(hidden / multiple_of)


class HFReader(CheckpointReader):
    """Hugging Face LLaMA safetensors (or any safetensors files without lazyllama metadata).

    HF names are mapped to Meta's, other names pass through, so a safetensors file with Meta's names is read
    as-is. Each tensor lives whole in one file; wq/wk get HF's rotary permutation undone on the way out.
    """

    def __init__(
        self,
        path: Path,
        files: list[Path],
        config: dict[str, Any] | None,
        config_file: Path | None,
        weight_map: dict[str, str] | None = None,
    ):
        super().__init__(path, "hf", config)
        self._files = [SafetensorsFile(f) for f in files]
        by_name = {f.path.name: f for f in self._files}
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}  # meta name -> (file, stored name)
        # wq/wk stored under HF names are in HF's rotary layout; Meta-named ones are read as-is
        self._permuted: dict[str, str] = {}  # meta name -> config field counting its heads
        for f in self._files:
            for name in f.entries:
                if weight_map is not None and weight_map.get(name) != f.path.name:
                    continue  # the index says another file holds this name (or it is not part of the model)
                self._add(meta_name=hf_to_meta_name(name), f=f, name=name)
        if weight_map is not None:
            for name, fname in weight_map.items():
                if fname not in by_name or name not in by_name[fname].entries:
                    raise CheckpointError(
                        f"{path}: the index model.safetensors.index.json says {name!r} is in {fname}, but "
                        f"{'that file does not have it' if fname in by_name else 'that file is missing'}"
                    )
        # A tied model (config tie_word_embeddings: true) saves no lm_head: its config builds a model whose head
        # is the embedding (ModelArgs.tie_word_embeddings), so nothing is aliased here.
        for field in sorted(set(self._permuted.values())):
            if not config or not isinstance(config.get(field), int):
                raise CheckpointError(
                    f"{path}: the q/k projections are stored in HF's rotary layout, and undoing it needs "
                    f"{field} from config.json ({config_file or 'not found beside the weights'}); expected "
                    "num_attention_heads (and num_key_value_heads for grouped-query attention)"
                )

    def _add(self, meta_name: str | None, f: SafetensorsFile, name: str) -> None:
        if meta_name is None:
            return
        if meta_name in self._where:
            other, other_name = self._where[meta_name]
            raise CheckpointError(
                f"{self.path}: key {meta_name!r} is stored twice: {other_name!r} in {other.path} and "
                f"{name!r} in {f.path}; remove one of the files"
            )
        self._where[meta_name] = (f, name)
        heads_field = qk_heads_param(meta_name)
        if heads_field and name != meta_name:
            self._permuted[meta_name] = heads_field

    def keys(self) -> set[str]:
        return set(self._where)

    def _make_layout(self, key: str, shard_dim: int | None) -> Layout:
        f, name = self._where[key]
        return merge_layout(key, None, [safetensors_piece(f, name)])

    def _direct_ok(self, key: str) -> bool:
        return key not in self._permuted  # q/k in HF's layout are permuted on the way out

    def read(self, key: str, *, shard_dim: int | None = None, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if key not in self._permuted:
            return super().read(key, shard_dim=shard_dim, rank=rank, world_size=world_size)
        layout = self._layout(key, shard_dim)
        d, lo, hi = self._requested(key, layout.shape, shard_dim, rank, world_size)
        assert self.config is not None  # checked in __init__
        n_heads = int(self.config[self._permuted[key]])
        stored = layout.pieces[0].load()
        head_dim = check_qk(stored, n_heads, f"{layout.pieces[0].file}: {self._where[key][1]!r}")
        if d == 0:
            # The permutation stays within each head: read only the rows of the heads covering [lo, hi).
            h0, h1 = lo // head_dim, -(-hi // head_dim)
            out = hf_unpermute_qk(stored.narrow(0, h0 * head_dim, (h1 - h0) * head_dim), h1 - h0)
            if (h0 * head_dim, h1 * head_dim) != (lo, hi):  # part of a head: keep only the requested rows
                out = out.narrow(0, lo - h0 * head_dim, hi - lo).clone()
            return out
        if d is not None:
            stored = stored.narrow(d, lo, hi - lo)  # columns: the row permutation is unaffected
        return hf_unpermute_qk(stored, n_heads)

    def close(self) -> None:
        super().close()
        for f in self._files:
            f.close()


def _hf_config(path: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """Config beside safetensors weights, and the file it came from: config.json (mapped from HF names by
    util/hf_config.py; a field that is not implemented is an error naming it), else params.json (as is)."""
    cfg_path = path / "config.json"
    hf = read_config(cfg_path)
    if hf is not None:
        try:
            return hf_config_to_params(hf, source=cfg_path), cfg_path
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    meta_path = path / "params.json"
    return read_config(meta_path), (meta_path if meta_path.is_file() else None)


def _open_hf_dir(path: Path) -> HFReader:
    index_path = path / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: expected an object with a 'weight_map' of tensor name -> file name")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: {index_path.name} lists {', '.join(missing)}, which is missing")
        files = [path / n for n in names]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files (expected a Hugging Face checkpoint directory)")
    config, config_file = _hf_config(path)
    return HFReader(path, files, config, config_file, weight_map)


def detect(path: Path) -> bool:
    """A .safetensors file, or a directory with *.safetensors files (that is not an interrupted lazyllama save)."""
    if path.is_file():
        return path.suffix == ".safetensors"
    if not any(path.glob("*.safetensors")):
        return False
    lazyllama.refuse_interrupted_save(path)
    return True


def open_hf(path: Path) -> HFReader:
    """A Hugging Face directory, or one .safetensors file read as a directory of one file."""
    if path.is_dir():
        return _open_hf_dir(path)
    if path.suffix == ".safetensors":
        config, config_file = _hf_config(path.parent)
        return HFReader(path, [path], config, config_file, None)
    raise unknown_file_type(path, "hf")


FORMAT = CheckpointFormat(
    "hf",
    detect,
    open_hf,
    "*.safetensors + config.json (Hugging Face; pytorch_model*.bin is not supported: convert to safetensors)",
)


def hf_config(params: Mapping[str, Any], *, vocab_size: int, dtype: str) -> dict[str, Any]:
    """A complete LlamaForCausalLM config.json for a ModelArgs-named config (what write_hf_checkpoint writes)."""
    n_heads = params["n_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": params["dim"],
        "intermediate_size": _ffn_hidden_dim(params),
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "vocab_size": vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
        **params_to_hf_fields(params),  # RoPE theta and scaling, head_dim, tying, token ids
    }


# Packed replacements of one HF-layout weight: suffix ("" for the weight itself) -> tensor (see write_hf_checkpoint)
Quantizer = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def write_hf_checkpoint(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    params: dict[str, Any],
    max_shard_bytes: int | None = None,
    quantize: Quantizer | None = None,
    quantization_config: dict[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face LLaMA checkpoint from Meta-named tensors: config.json + model.safetensors, or
    model-0000N-of-0000M.safetensors + model.safetensors.index.json when `max_shard_bytes` splits it.

    Names are mapped, wq/wk get HF's rotary permutation (n_heads / n_kv_heads from `params`), rope.freqs is
    dropped; with params' tie_word_embeddings the output head is not written (HF ties it to the embedding).
    config.json is complete (`hf_config`: RoPE theta and scaling, head_dim, tying, token ids).
    `state_dict` may be a dict or an iterable of (key, tensor) pairs. Memory: from a dict, one
    permuted copy at a time; from an iterable, the tensors of the shard being filled are held until it is
    written (so pass `max_shard_bytes` to bound memory when streaming a large model).

    `quantize(hf_name, weight)`, given, is called on each transformer-block projection in HF's layout (q/k already
    permuted, so packed blocks follow HF's rows) and returns the tensors to store instead, by name suffix (e.g.
    bitsandbytes' "" packed weight, ".absmax", ".quant_state.bitsandbytes__nf4"); `quantization_config` goes into
    config.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    tied = bool(params.get("tie_word_embeddings", False))
    lazy = isinstance(state_dict, Mapping) and quantize is None
    pairs = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    shards: list[tuple[Path, list[str]]] = []
    current: list[WriteItem] = []
    current_bytes = 0
    seen: dict[str, torch.dtype] = {}
    vocab_size = params.get("vocab_size", -1)
    tag = uuid.uuid4().hex[:8]

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            tmp_name = out / f".shard-{len(shards):05d}.{tag}.safetensors.tmp"
            with atomic_write(tmp_name) as f:
                write_safetensors(f, current, {"format": "pt"})
            shards.append((tmp_name, [it.name for it in current]))
        current, current_bytes = [], 0

    def producer(t: torch.Tensor, heads: int | None) -> Callable[[], torch.Tensor]:
        return (lambda: hf_permute_qk(t.detach(), heads)) if heads else (lambda: t)

    try:
        for key, t in pairs:
            if key == "rope.freqs":
                continue
            if key == "tok_embeddings.weight" and (vocab_size is None or vocab_size < 0):
                vocab_size = t.shape[0]
            if key == "output.weight" and tied:
                continue
            heads = {"n_heads": n_heads, "n_kv_heads": n_kv_heads}.get(qk_heads_param(key) or "")
            if heads and not lazy:  # from a stream, hold the permuted copy instead of the original
                t = hf_permute_qk(t.detach(), heads)
                heads = None
            name = meta_to_hf_name(key)
            items = {name: t}
            if quantize is not None and _PROJECTION.fullmatch(key):
                items = {name + suffix: q for suffix, q in quantize(name, t).items()}
            for item_name, item in items.items():
                nbytes = item.numel() * item.element_size()
                if max_shard_bytes is not None and current and current_bytes + nbytes > max_shard_bytes:
                    flush()
                current.append(WriteItem(item_name, item.dtype, tuple(item.shape), producer(item, heads)))
                current_bytes += nbytes
                if item_name == name:
                    seen[name] = t.dtype
            del t, items
        flush()
        if len(shards) == 1:
            os.replace(shards[0][0], out / "model.safetensors")
        else:
            weight_map = {}
            for i, (tmp_name, names) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp_name, out / final)
                weight_map.update({n: final for n in names})
            total = sum((out / f).stat().st_size for f in set(weight_map.values()))
            write_json(
                out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
    finally:
        for tmp_name, _ in shards:
            tmp_name.unlink(missing_ok=True)
    if quantize is not None:  # the dtype of the unquantized tensors (the packed ones are uint8)
        seen = {n: d for n, d in seen.items() if d.is_floating_point}
    config = hf_config(params, vocab_size=vocab_size, dtype=dtype_name(seen.values()))
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    write_json(out / "config.json", config)
    return out
