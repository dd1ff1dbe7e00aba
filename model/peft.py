"""Parameter-efficient fine-tuning: LoRA on any linear kind, bias tuning, and the one trainable predicate.

LoRA and tuning biases are attached to an existing linear as child modules (`wq.lora`, `wq.bias_tune`) and
added to its output by a forward hook, so the base linear - plain, column/row-parallel, or a 4-bit/8-bit
QuantLinear - and its checkpoint keys stay exactly as they were. Every new module owns its init and starts as
an exact no-op (LoRA B = 0, biases = 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.layers.lean import dropout_linear
from model.layers.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_mp,
    gather_from_mp,
    init_sharded_,
    mp_rank,
    mp_world_size,
    reduce_from_mp,
    uniform_fill,
)

LORA_TARGETS = {
    "wq": "attention.wq",
    "wk": "attention.wk",
    "wv": "attention.wv",
    "wo": "attention.wo",
    "w1": "feed_forward.w1",
    "w2": "feed_forward.w2",
    "w3": "feed_forward.w3",
}


def linear_style(linear: nn.Module) -> str | None:
    """'column', 'row' or None (replicated) for any linear kind this project uses."""
    style = getattr(linear, "style", "unset")
    if style != "unset":  # QuantLinear records the kind it replaced
        return style
    if isinstance(linear, ColumnParallelLinear):
        return "column"
    if isinstance(linear, RowParallelLinear):
        return "row"
    if isinstance(linear, nn.Linear):
        return None
    raise TypeError(f"{type(linear).__name__} is not a linear layer LoRA knows how to wrap")


class LoRA(nn.Module):
    """delta(x) = scale * B(A(dropout(x))), the low-rank update of one linear; B starts at zero.

    Model parallel: for a column-parallel base, B is split by output rows like the base and A is replicated
    (its input is copied to the group, so A's gradient is summed across ranks); for a row-parallel base, A is
    split by input columns like the base and the rank-r intermediate is summed across ranks, B replicated.
    A and B are fp32 master weights; the product is computed in the activation dtype.
    """

    init_when_missing = True  # new tensors: a base checkpoint does not have them

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        style: str | None,
        gather_output: bool = False,
    ) -> None:
        super().__init__()
        ws = mp_world_size() if style else 1
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = alpha / rank
        self.style, self.gather_output = style, gather_output
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        a_in = in_features // ws if style == "row" else in_features
        b_out = out_features // ws if style == "column" else out_features
        self.shard_dims = {"lora_a": 1 if style == "row" else None, "lora_b": 0 if style == "column" else None}
        self.lora_a = nn.Parameter(torch.empty(rank, a_in, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.empty(b_out, rank, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_a.is_meta:
            return
        # kaiming_uniform_(a=sqrt(5)) over the full A: bound sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in)
        init_sharded_(
            self.lora_a,
            uniform_fill(1.0 / math.sqrt(self.in_features)),
            shard_dim=self.shard_dims["lora_a"],
            rank=mp_rank() if self.style else 0,
            world_size=mp_world_size() if self.style else 1,
        )
        with torch.no_grad():
            self.lora_b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_a.to(x.dtype)
        if self.training and isinstance(self.dropout, nn.Dropout):
            h = dropout_linear(x, a, self.dropout.p)  # keeps x and a bool mask, not a dropped-out copy
        else:
            h = F.linear(x, a)  # no dropout, or eval (nn.Dropout is the identity there)
        if self.style == "column":
            h = copy_to_mp(h)
        elif self.style == "row":
            h = reduce_from_mp(h)
        y = F.linear(h, self.lora_b.to(x.dtype)) * self.scale
        return gather_from_mp(y) if self.style == "column" and self.gather_output else y

    def extra_repr(self) -> str:
        a, b = tuple(self.lora_a.shape), tuple(self.lora_b.shape)
        return f"rank={self.rank}, scale={self.scale:g}, style={self.style}, a={a}, b={b}"


class BiasTune(nn.Module):
    """A trainable bias added to a frozen linear's output (LLaMA-Adapter V2's bias tuning); starts at zero."""

    init_when_missing = True

    def __init__(self, out_features: int, *, sharded: bool) -> None:
        super().__init__()
        local = out_features // mp_world_size() if sharded else out_features
        self.shard_dims = {"bias": 0 if sharded else None}
        self.bias = nn.Parameter(torch.empty(local, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.bias.is_meta:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias.to(y.dtype)


def _add_output_hook(linear: nn.Module) -> None:
    if getattr(linear, "_peft_hooked", False):
        return

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        lora = module._modules.get("lora")
        if lora is not None:
            output = output + lora(inputs[0])
        bias = module._modules.get("bias_tune")
        return bias(output) if bias is not None else output

    linear.register_forward_hook(hook)
    linear._peft_hooked = True


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    unknown = sorted(set(names) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA/bias target(s) {unknown}; this model's projections are {sorted(LORA_TARGETS)}")
    found = []
    for block_name, block in model.named_modules():
        if not block_name.startswith("layers.") or block_name.count(".") != 1:
            continue
        for short in names:
            path = LORA_TARGETS[short]
            linear = block.get_submodule(path) if _has(block, path) else None
            if linear is None:
                raise ValueError(f"LoRA target {short!r}: {block_name}.{path} does not exist in this model")
            found.append((f"{block_name}.{path}", linear))
    if not found:
        raise ValueError(f"no projections {list(names)} found: is this a LLaMA Transformer?")
    return found


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def add_lora(model: nn.Module, args: ModelArgs) -> int:
    """Attach LoRA to the projections named by args.lora_targets (after quantize_model). Returns the count."""
    if args.lora_rank <= 0:
        return 0
    count = 0
    for _, linear in _targets(model, tuple(args.lora_targets)):
        if "lora" in linear._modules:
            raise ValueError("LoRA is already attached to this model")
        style = linear_style(linear)
        linear.lora = LoRA(
            linear.in_features,
            linear.out_features,
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            style=style,
            gather_output=getattr(linear, "gather_output", False),
        )
        _add_output_hook(linear)
        count += 1
    return count


def add_bias_tuning(model: nn.Module, args: ModelArgs) -> int:
    """A trainable zero-initialized bias on every projection (args.bias_tuning)."""
    if not args.bias_tuning:
        return 0
    count = 0
    for _, linear in _targets(model, tuple(LORA_TARGETS)):
        sharded = linear_style(linear) == "column" and not getattr(linear, "gather_output", True)
        linear.bias_tune = BiasTune(linear.out_features, sharded=sharded)
        _add_output_hook(linear)
        count += 1
    return count


def uses_peft(args: ModelArgs) -> bool:
    """Does the config add anything to train (LoRA, LLaMA-Adapter, bias or norm tuning)? If not: full fine-tuning."""
    return args.lora_rank > 0 or args.adapter_len > 0 or args.bias_tuning or args.norm_tuning


def is_trainable(name: str, args: ModelArgs) -> bool:
    """THE trainable predicate: what the optimizer updates and what a trainable-only checkpoint holds.

    Adapter tensors are trainable whenever the config adds them; norm weights with norm_tuning. With no PEFT
    method configured, everything except quantized weights is trainable (full fine-tuning).
    """
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("visual."):  # the backbone is frozen unless asked; projection and markers train
        return args.visual_trainable or not name.startswith("visual.backbone.")
    if ".lora." in f".{name}" or ".bias_tune." in f".{name}" or "adapter" in name:
        return True
    if args.norm_tuning and leaf == "weight" and name.rsplit(".", 2)[-2].endswith("norm"):
        return True
    return not uses_peft(args)


def mark_trainable(model: nn.Module, args: ModelArgs) -> list[str]:
    """Set requires_grad from is_trainable (quantized weights always frozen); returns the trainable names."""
    frozen = {  # quantized base weights (also while still on meta, before they are packed)
        id(m.weight) for m in model.modules() if hasattr(m, "quantize_weight_") and m.weight is not None
    }
    names = []
    for name, p in model.named_parameters():
        trainable = is_trainable(name, args) and p.dtype.is_floating_point and id(p) not in frozen
        p.requires_grad_(trainable)
        if trainable:
            names.append(name)
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight (W += scale * B @ A on this rank's shard) and drop it.

    Only for full-precision bases: a quantized base cannot absorb the update without re-quantizing.
    """
    merged = 0
    for name, module in model.named_modules():
        lora = module._modules.get("lora")
        if not isinstance(lora, LoRA):
            continue
        if getattr(module, "is_quantized", False) or not module.weight.dtype.is_floating_point:
            raise ValueError(
                f"{name} has a quantized base: merge_lora needs a full-precision base model. Build it with "
                "quant=None from the base checkpoint, load the LoRA delta, then merge"
            )
        delta = (lora.lora_b.double() @ lora.lora_a.double()) * lora.scale
        module.weight.add_(delta.to(module.weight.dtype))
        del module._modules["lora"]
        merged += 1
    return merged
