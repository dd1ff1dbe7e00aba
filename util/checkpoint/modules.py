"""The functions that walk a model's nn.Modules to save it: `model_state` / `save_model` (full precision, this
project's lazyllama format), `quantized_model_state` / `save_quantized` (pre-quantized lazyllama: packed weights
loaded without quantizing again), and `export_meta` (Meta's format, to serve with any LLaMA code).

Each model-parallel rank saves its own slices; only data-parallel rank 0 writes. Modules are duck-typed (their
`shard_dims`, and the packed-weight methods of util.quant.QuantLinear): nothing here imports model/ or
util.quant.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from util.checkpoint.errors import CheckpointError
from util.checkpoint.files import atomic_write, write_json
from util.checkpoint.lazyllama import save_checkpoint
from util.dist import position


def model_state(
    model: torch.nn.Module, *, trainable_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, int | None]]:
    """A model's persistent tensors (this rank's local slices) and each one's split dim.

    Split dims come from the modules' `shard_dims` (the model-parallel layers declare them); anything else is
    replicated. trainable_only keeps the parameters that require grad: the same predicate the optimizer uses.
    """
    tensors: dict[str, torch.Tensor] = {}
    dims: dict[str, int | None] = {}
    for mod_name, module in model.named_modules():
        own = [(n, p, True) for n, p in module._parameters.items() if p is not None]
        own += [
            (n, b, False)
            for n, b in module._buffers.items()
            if b is not None and n not in module._non_persistent_buffers_set
        ]
        for name, t, is_param in own:
            key = f"{mod_name}.{name}" if mod_name else name
            if trainable_only and not (is_param and t.requires_grad):
                continue
            if t.dtype in (torch.uint8, torch.int8) and hasattr(t, "quant_state") or hasattr(t, "SCB"):
                raise CheckpointError(
                    f"{key} is a quantized weight: save a quantized model with save_quantized (packed weights, "
                    "loaded without quantizing again), or save trainable_only=True (the base stays in its checkpoint)"
                )
            tensors[key] = t.detach()
            dims[key] = getattr(module, "shard_dims", {}).get(name)
    return tensors, dims


def save_model(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    config: dict[str, Any] | None = None,
    trainable_only: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    """Save a (possibly model-parallel) model in this project's format: each model-parallel rank its shard.

    Under data parallelism only data-parallel rank 0 writes (the other replicas hold the same values).
    Returns the file this process wrote, or None if it wrote nothing.
    """
    pos = position()
    writes, rank, world_size = pos.writes, pos.model_parallel_rank, pos.model_parallel_size
    if not writes:
        return None
    tensors, dims = model_state(model, trainable_only=trainable_only)
    return save_checkpoint(
        out_dir,
        tensors,
        shard_dims=dims,
        rank=rank,
        world_size=world_size,
        config=config,
        trainable_only=trainable_only,
        extra=extra,
    )


def packed_key(weight_key: str, name: str) -> str:
    """The checkpoint key of one tensor of a pre-quantized weight, e.g. `layers.0.attention.wq.weight.packed`."""
    return f"{weight_key}.{name}"


def _is_packed_linear(module: torch.nn.Module) -> bool:
    # duck-typed util.quant.QuantLinear (this module imports nothing from util.quant)
    return all(callable(getattr(module, a, None)) for a in ("packed_tensors", "quant_settings", "packed_layout"))


def quantized_model_state(
    model: torch.nn.Module, *, adapters: bool = True, world_size: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, int | None], dict[str, Any]]:
    """A quantized model's tensors for `save_quantized`: (tensors, split dims, quantization section).

    Each quantized linear contributes its packed weight + quantization state under `packed_key(weight key, name)`
    (this rank's own tensors: split dim 0, written by every rank) instead of the weight; everything else is as
    `model_state` gives it. adapters=False leaves out the tensors of modules that are new on top of a base model
    (those declaring `init_when_missing`: LoRA, bias tuning, LLaMA-Adapter prompts and gates, and their children).
    """
    tensors: dict[str, torch.Tensor] = {}
    dims: dict[str, int | None] = {}
    weights: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] | None = None
    first = ""
    skipped: list[str] = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if not adapters and (
            getattr(module, "init_when_missing", False) or any(mod_name.startswith(p) for p in skipped)
        ):
            skipped.append(prefix)
            continue
        packed_linear = _is_packed_linear(module)
        if packed_linear:
            key = prefix + "weight"
            mine = module.quant_settings()
            if settings is None:
                settings, first = mine, key
            elif mine != settings:
                raise CheckpointError(
                    f"save_quantized: {key} is quantized as {mine} but {first} as {settings}; a pre-quantized "
                    "checkpoint holds one quantization setting (quantize the model with one mode)"
                )
            packed = module.packed_tensors()
            for name, t in packed.items():
                tensors[packed_key(key, name)] = t.detach()
                dims[packed_key(key, name)] = 0
            weights[key] = {
                "shape": list(module.local_shape),
                "shard_dim": module.shard_dims.get("weight"),
                "dtype": str(module.weight_dtype).removeprefix("torch."),
                "tensors": list(packed),
            }
        own = [(n, p) for n, p in module._parameters.items() if p is not None and not (packed_linear and n == "weight")]
        own += [
            (n, b) for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set
        ]
        for name, t in own:
            key = prefix + name
            if hasattr(t, "quant_state") or hasattr(t, "SCB"):
                raise CheckpointError(
                    f"save_quantized: {key} is a quantized weight outside util.quant.QuantLinear; quantize the model "
                    "with util.quant.quantize_model"
                )
            if t.device.type == "meta":
                raise CheckpointError(f"save_quantized: {key!r} is still on the meta device (not materialized)")
            tensors[key] = t.detach()
            dims[key] = getattr(module, "shard_dims", {}).get(name)
    if settings is None:
        raise CheckpointError(
            "save_quantized: the model has no quantized linear layers (built without quant?); build it with "
            "quant='4bit' / '4bit_fp4' / '8bit', or save a full-precision model with save_model"
        )
    dtypes = {w["dtype"] for w in weights.values()}
    quantization = {
        **settings,
        "model_parallel_size": world_size,
        "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "adapters": adapters,
        "weights": weights,
    }
    return tensors, dims, quantization


def save_quantized(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    config: dict[str, Any] | None = None,
    adapters: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    """Save a quantized model so it can be loaded without quantizing again ("pre-quantized" lazyllama).

    Writes, per model-parallel rank (only data-parallel rank 0 writes; every model-parallel rank must call it),
    consolidated.NN.safetensors atomically: each quantized linear's packed weight and quantization state
    (`QuantLinear.packed_layout`: 4-bit packed uint8 data, absmax, quant_map, nested absmax / quant_map / offset;
    8-bit CB + SCB) under `<weight key>.<name>`, and every other tensor (embeddings, norms, output head, and with
    adapters=True the adapter tensors - LoRA, bias tuning, LLaMA-Adapter) as it is. Rank 0 writes params.json
    (`config`, default `model.args.to_dict()`) and lazyllama.json with a "quantization" section: mode, bits,
    quant_type, blocksize, compress_statistics (nested_blocksize), model_parallel_size, dtype, and per packed weight
    its local shape, split dim and tensor names.

    adapters=False saves the base only (the adapter modules' tensors are left out; the config is saved as given,
    so a build from it initializes fresh adapters). Load with
    `build_model(None, [out_dir], quant=<the same mode>)` at the same model-parallel size: the packed weights are
    adopted as they are (report.quantized == 0).
    Returns the file this process wrote, or None if it wrote nothing.
    """
    pos = position()
    writes, rank, world_size = pos.writes, pos.model_parallel_rank, pos.model_parallel_size
    tensors, dims, quantization = quantized_model_state(model, adapters=adapters, world_size=world_size)
    if not writes:
        return None
    if config is None:
        args = getattr(model, "args", None)
        config = args.to_dict() if callable(getattr(args, "to_dict", None)) else None
    return save_checkpoint(
        out_dir,
        tensors,
        shard_dims=dims,
        rank=rank,
        world_size=world_size,
        config=config,
        extra=extra,
        quantization=quantization,
    )


# Keys of Meta's layout (what `export_meta` can write and other LLaMA code can read).
_META_KEY = re.compile(
    r"^(tok_embeddings\.weight|norm\.weight|output\.weight|layers\.\d+\.(attention\.(wq|wk|wv|wo)"
    r"|feed_forward\.(w1|w2|w3)|attention_norm|ffn_norm)\.weight)$"
)


# Meta's params.json keys (llama / llama-models reference code): other LLaMA code reads these and nothing else.
META_PARAMS_KEYS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
)
# Written beside params.json in EXTRA_PARAMS_FILE: settings Meta's file has no key for that do not change the
# weights' math elsewhere (this project's reader merges them back).
EXTRA_PARAMS_KEYS = ("max_seq_len", "bos_token_id", "eos_token_id", "pad_token_id")
EXTRA_PARAMS_FILE = "extra_params.json"


def _meta_rule_hidden(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """SwiGLU hidden size as Meta's reference (and HF's convert_llama_weights_to_hf) computes it."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_params(params: dict[str, Any], *, hidden_dim: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config into Meta's params.json (its keys only) and the extra settings (EXTRA_PARAMS_KEYS).

    The SwiGLU size is expressed with multiple_of / ffn_dim_multiplier so Meta's rule gives `hidden_dim` (default:
    ffn_hidden_dim or the rule on the given values). Fields that change the math and that Meta's format cannot
    express (an explicit head size, RoPE scaling other than Meta's llama3 constants, adapters) are refused by name.
    """
    from model.args import ModelArgs  # only for the field defaults

    defaults = ModelArgs.__dataclass_fields__
    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    problems = []
    head_size = params.get("head_size")
    if head_size is not None and head_size != dim // n_heads:
        problems.append(f"head_size={head_size} (Meta's code uses dim // n_heads = {dim // n_heads})")
    scaling = params.get("rope_scaling")
    use_scaled = bool(params.get("use_scaled_rope", False))
    if scaling:
        try:
            from model.args import META_LLAMA3_ROPE_SCALING  # present with RoPE scaling support
        except ImportError:
            META_LLAMA3_ROPE_SCALING = None
        if scaling == META_LLAMA3_ROPE_SCALING:
            use_scaled = True
        else:
            problems.append(f"rope_scaling={scaling} (Meta's params.json has only use_scaled_rope: llama3 factor 8)")
    for key in ("lora_rank", "adapter_len", "adapter_layers"):
        if params.get(key):
            problems.append(f"{key}={params[key]} (merge LoRA first; adapters have no place in Meta's format)")
    for key in ("bias_tuning", "norm_tuning"):
        if params.get(key):
            problems.append(f"{key}=true (bias/norm tuning has no place in Meta's format)")
    if params.get("visual_backbone"):
        problems.append(f"visual_backbone={params['visual_backbone']!r} (Meta's LLaMA format is text only)")
    if problems:
        raise CheckpointError(
            "Meta's params.json cannot express: " + "; ".join(problems) + ". Export to Hugging Face (--to hf) instead"
        )
    multiple_of = int(params.get("multiple_of", defaults["multiple_of"].default))
    multiplier = params.get("ffn_dim_multiplier")
    if hidden_dim is None:
        hidden_dim = params.get("ffn_hidden_dim") or _meta_rule_hidden(dim, multiple_of, multiplier)
    if _meta_rule_hidden(dim, multiple_of, multiplier) != hidden_dim:
        # Any hidden size >= 1 can be written as multiple_of=hidden with a multiplier that brings the rule's
        # unrounded size into (0, hidden]; check the rule's result rather than trust the float arithmetic.
        base = int(2 * 4 * dim / 3)
        multiple_of, multiplier = hidden_dim, (None if base <= hidden_dim else hidden_dim / base)
        if _meta_rule_hidden(dim, multiple_of, multiplier) != hidden_dim:
            raise CheckpointError(
                f"Meta's params.json cannot express the feed-forward size {hidden_dim} for dim {dim} (its rule: "
                "multiple_of * ceil(ffn_dim_multiplier * int(8 * dim / 3) / multiple_of)); export to Hugging Face"
            )
    meta = {
        "dim": dim,
        "n_layers": int(params["n_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(params.get("n_kv_heads") or n_heads),
        "vocab_size": int(params.get("vocab_size", -1)),
        "multiple_of": multiple_of,
        "norm_eps": float(params.get("norm_eps", defaults["norm_eps"].default)),
        "rope_theta": float(params.get("rope_theta", defaults["rope_theta"].default)),
    }
    # Optional keys only when set: Llama 2's reference code takes no use_scaled_rope, and HF's converter
    # multiplies by ffn_dim_multiplier when the key is present (null fails there).
    if multiplier is not None:
        meta["ffn_dim_multiplier"] = multiplier
    if use_scaled:
        meta["use_scaled_rope"] = True
    extra = {k: params[k] for k in EXTRA_PARAMS_KEYS if k in defaults and params.get(k) is not None}
    return meta, extra


def export_meta(model: torch.nn.Module, out_dir: str | Path, *, params: dict[str, Any]) -> Path | None:
    """Write a full-precision model in Meta's format (consolidated.NN.pth per model-parallel rank + params.json),
    e.g. after merge_lora, to serve it with any LLaMA code. Only data-parallel rank 0 writes.

    params.json holds Meta's keys only (`meta_params`: a LoRA rank or a visual backbone in it would make a reader
    build modules the weights do not have); max_seq_len and token ids go to extra_params.json beside it.
    Refuses quantized weights and tensors Meta's layout has no place for (adapters, tuning biases): merge or
    drop them first.
    """
    pos = position()
    writes, rank = pos.writes, pos.model_parallel_rank
    if not writes:
        return None
    tensors, dims = model_state(model)
    extra = sorted(k for k in tensors if not _META_KEY.match(k))
    if extra:
        raise CheckpointError(
            f"export_meta({out_dir}): Meta's format has no place for {extra[:6]}{' ...' if len(extra) > 6 else ''}; "
            "merge LoRA first (model.peft.merge_lora) and export models without adapters or tuning biases"
        )
    if "output.weight" not in tensors and "tok_embeddings.weight" in tensors:
        if dims.get("tok_embeddings.weight") is not None and pos.model_parallel_size > 1:
            raise CheckpointError(
                f"export_meta({out_dir}): the output head is tied to the embedding, and Meta's format needs its own "
                "output.weight (split by rows, the embedding by columns): export at model-parallel size 1"
            )
        tensors["output.weight"] = tensors["tok_embeddings.weight"]  # Meta's format always has its own head
    w1 = next((k for k in tensors if k.endswith("feed_forward.w1.weight")), None)
    hidden = None
    if w1 is not None:
        hidden = tensors[w1].shape[0] * (pos.model_parallel_size if dims.get(w1) == 0 else 1)
    meta, extra_params = meta_params(params, hidden_dim=hidden)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"consolidated.{rank:02d}.pth"
    with atomic_write(target) as f:
        torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, f)
    if rank == 0:
        write_json(out / "params.json", meta)
        if extra_params:
            write_json(out / EXTRA_PARAMS_FILE, extra_params)
    return target
