"""peft LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` (what `PeftModel.save_pretrained` writes
for a LoRA on a Hugging Face Llama), read as a delta over a base checkpoint listed before it.

Names map to this project's LoRA children: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` ->
`layers.N.attention.wq.lora.lora_a` (`lora_B` -> `lora_b`). The config maps to lora_rank (r), lora_alpha
(scale alpha / r; with use_rslora alpha / sqrt(r), stored as lora_alpha = alpha * sqrt(r)), lora_targets (the
projections the file holds) and lora_dropout. Hugging Face stores q/k projections with their rows permuted for
its rotate_half RoPE (see names.hf_permute_qk), and a LoRA delta B @ A on them has B's rows permuted the same way:
lora_B of q_proj / k_proj is un-permuted on reading. That needs the base's head counts, which the adapter does not
record: `build_model` hands them over (`bind_base`); otherwise they come from the config.json of
base_model_name_or_path when that is a local directory.

A config field that would change the math and is not implemented (DoRA, bias training, modules_to_save, rank or
alpha patterns, layer selection, fan_in_fan_out, ...) is an error naming the field; so is a tensor that is not a
LoRA A/B of one of the seven Llama projections.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from util.checkpoint.errors import CheckpointError
from util.checkpoint.files import read_config
from util.checkpoint.hf import hf_config_to_params
from util.checkpoint.names import check_qk, hf_unpermute_qk, qk_heads_param
from util.checkpoint.reader import CheckpointFormat, CheckpointReader, Layout, Piece, merge_layout
from util.checkpoint.safetensors import SafetensorsFile

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

_MODULES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
}
_KEY_RE = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)\.lora_([AB])\.weight")

# Fields that do not change what a saved adapter computes: bookkeeping, and initialization-only settings.
_IGNORED = {
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "init_lora_weights",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "lora_dropout",
    "use_rslora",
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "bias",
}


def _is_default(v: Any) -> bool:
    return v is None or v is False or v == {} or v == [] or v == "none"


def _params(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """adapter_config.json as ModelArgs fields (lora_targets are filled from the tensors later)."""
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type={cfg.get('peft_type')!r}; only LoRA adapters (LORA) are supported")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(
            f"{where}: bias={cfg['bias']!r} (the adapter trains the base's biases) is not supported; train with "
            "bias='none'"
        )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise CheckpointError(
            f"{where}: init_lora_weights={init!r}: this initialization also changes the base model's weights, so the "
            "adapter does not apply to the original base; convert it to a plain LoRA when saving (peft's "
            "path_initial_model_for_weight_conversion) and load that"
        )
    refused = sorted(k for k, v in cfg.items() if k not in _IGNORED and not _is_default(v))
    if refused:
        shown = ", ".join(f"{k}={cfg[k]!r}" for k in refused)
        raise CheckpointError(
            f"{where}: {shown}: not supported by this loader (it reads plain LoRA on the seven Llama projections, "
            "with r, lora_alpha and use_rslora); loading without it would compute something else"
        )
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise CheckpointError(
            f"{where}: expected a positive integer r and a number lora_alpha, got r={r!r}, lora_alpha={alpha!r}"
        )
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        known = {m.split(".")[-1] for m in _MODULES}
        other = sorted({t.split(".")[-1] for t in targets} - known)
        if other:
            raise CheckpointError(
                f"{where}: target_modules {other} are not Llama projections this loader knows ({sorted(known)})"
            )
    # this project's scale is lora_alpha / lora_rank: rslora's alpha / sqrt(r) is lora_alpha = alpha * sqrt(r)
    ours = float(alpha) * math.sqrt(r) if cfg.get("use_rslora") else float(alpha)
    return {"lora_rank": r, "lora_alpha": ours, "lora_dropout": float(cfg.get("lora_dropout") or 0.0)}


class PeftReader(CheckpointReader):
    """A peft LoRA adapter under this project's names; lora_B of q/k un-permuted on the way out."""

    def __init__(self, path: Path, weights: Path, config_file: Path, raw_config: dict[str, Any]):
        params = _params(raw_config, config_file)
        super().__init__(path, "peft", params)
        self.info = {"adapter_config": raw_config}
        self._file = SafetensorsFile(weights)
        self._where: dict[str, str] = {}  # our key -> stored name
        self._heads: dict[str, int] | None = None
        short = {
            "attention.wq": "wq",
            "attention.wk": "wk",
            "attention.wv": "wv",
            "attention.wo": "wo",
            "feed_forward.w1": "w1",
            "feed_forward.w2": "w2",
            "feed_forward.w3": "w3",
        }
        targets: set[str] = set()
        for name, e in self._file.entries.items():
            m = _KEY_RE.fullmatch(name)
            if m is None or m.group(2) not in _MODULES:
                raise CheckpointError(
                    f"{weights}: tensor {name!r} is not a LoRA A/B of a Llama projection "
                    f"(model.layers.N.{{{', '.join(_MODULES)}}}.lora_A/lora_B.weight); an adapter for another "
                    "model, or a peft method this loader does not read"
                )
            proj = _MODULES[m.group(2)]
            key = f"layers.{m.group(1)}.{proj}.lora.lora_{m.group(3).lower()}"
            r_dim = 0 if m.group(3) == "A" else 1
            if len(e.shape) != 2 or e.shape[r_dim] != params["lora_rank"]:
                raise CheckpointError(
                    f"{weights}: {name!r} has shape {list(e.shape)}, but {config_file.name} says r="
                    f"{params['lora_rank']}; the adapter file and its config do not belong together"
                )
            self._where[key] = name
            targets.add(short[proj])
        unpaired = sorted(k for k in self._where if k[:-1] + ("b" if k.endswith("a") else "a") not in self._where)
        if unpaired:
            raise CheckpointError(f"{weights}: {unpaired[:4]} without its A/B partner; the adapter file is incomplete")
        if not targets:
            raise CheckpointError(f"{weights}: holds no LoRA tensors")
        order = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
        self.config = {**params, "lora_targets": [t for t in order if t in targets]}
        base = raw_config.get("base_model_name_or_path")
        base_cfg = read_config(Path(base) / "config.json") if isinstance(base, str) and Path(base).is_dir() else None
        if base_cfg is not None:
            p = hf_config_to_params(base_cfg)
            if isinstance(p.get("n_heads"), int):
                self._heads = {"n_heads": p["n_heads"], "n_kv_heads": p.get("n_kv_heads") or p["n_heads"]}

    def bind_base(self, args: Any) -> None:
        """The base model's head counts (a ModelArgs or dict with n_heads / n_kv_heads), needed to un-permute q/k."""
        get = args.get if isinstance(args, dict) else lambda k: getattr(args, k, None)
        n_heads = get("n_heads")
        self._heads = {"n_heads": n_heads, "n_kv_heads": get("n_kv_heads") or n_heads}
        self._layouts.clear()

    def keys(self) -> set[str]:
        return set(self._where)

    def _heads_of(self, key: str) -> int | None:
        """For lora_b of q/k: the head count its rows are permuted with; None for every other tensor."""
        if not key.endswith(".lora.lora_b"):
            return None
        field = qk_heads_param(key.removesuffix(".lora.lora_b") + ".weight")
        if field is None:
            return None
        if self._heads is None:
            raise CheckpointError(
                f"{self._file.path}: un-permuting the q/k LoRA B rows needs the base model's num_attention_heads "
                "and num_key_value_heads, which the adapter does not record; load it through build_model after its "
                "base, or call bind_base(model_args) on this reader"
            )
        return int(self._heads[field])

    def _make_layout(self, key: str, shard_dim: int | None) -> Layout:
        name, f = self._where[key], self._file
        e = f.entries[name]
        heads = self._heads_of(key)
        if heads is None:
            piece = Piece(
                str(f.path), e.shape, e.dtype, lambda: f.tensor(name), lambda: f.release(name), (str(f.path), e.begin)
            )
        else:

            def load() -> torch.Tensor:
                b = f.tensor(name)
                check_qk(b, heads, f"{f.path}: {name!r}")
                return hf_unpermute_qk(b, heads)

            piece = Piece(str(f.path), e.shape, e.dtype, load, lambda: f.release(name))  # no location: transformed
        return merge_layout(key, None, [piece])

    def _direct_ok(self, key: str) -> bool:
        return self._heads_of(key) is None

    def close(self) -> None:
        super().close()
        self._file.close()


def detect(path: Path) -> bool:
    """A directory with adapter_config.json, or an adapter_model.safetensors file beside one."""
    if path.is_file():
        return path.name == WEIGHTS and (path.parent / CONFIG).is_file()
    return (path / CONFIG).is_file()


def open_peft(path: Path) -> PeftReader:
    folder = path if path.is_dir() else path.parent
    config_file = folder / CONFIG
    raw = read_config(config_file)
    if raw is None:
        raise CheckpointError(f"{folder}: no {CONFIG} (a peft adapter directory has it beside {WEIGHTS})")
    weights = folder / WEIGHTS
    if not weights.is_file():
        other = sorted(p.name for p in folder.glob("adapter_model*"))
        hint = (
            f" (found {', '.join(other)}: only safetensors is read; save with safe_serialization=True)" if other else ""
        )
        raise CheckpointError(f"{folder}: no {WEIGHTS}{hint}")
    return PeftReader(path, weights, config_file, raw)


FORMAT = CheckpointFormat("peft", detect, open_peft, f"{CONFIG} + {WEIGHTS} (peft LoRA adapter)")
