"""Model-parallel linears and embedding that can be built on meta and own their init.

fairscale's own layers allocate with the legacy `torch.Tensor(...)` constructor (which ignores the meta device),
initialize in `__init__`, and build a full-size master weight on every rank. These are written for this project:
fairscale only provides the process groups and the autograd mappings.

Sharded init: a weight is generated as a sequence of fixed row blocks of the *full* tensor, each from its own
generator seeded from (a base seed drawn from the global RNG, block index). A rank generates only the blocks that
overlap its shard, so no rank holds more than one block of the full weight, and the values do not depend on the
model-parallel size: the shards of a size-2 run are exactly the slices of the size-1 run's weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as mp
from fairscale.nn.model_parallel import mappings
from torch import nn

# Each init block holds about this many elements (4 MiB of fp32): bounded memory whatever the tensor size.
INIT_BLOCK_ELEMENTS = 1 << 20


def mp_world_size() -> int:
    return mp.get_model_parallel_world_size() if mp.model_parallel_is_initialized() else 1


def mp_rank() -> int:
    return mp.get_model_parallel_rank() if mp.model_parallel_is_initialized() else 0


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by the model-parallel size {denominator}")
    return numerator // denominator


# --- the model-parallel mappings, which are identities on one rank (fairscale's need an initialized group) ---
def copy_to_mp(x: torch.Tensor) -> torch.Tensor:
    return mappings.copy_to_model_parallel_region(x) if mp_world_size() > 1 else x


def reduce_from_mp(x: torch.Tensor) -> torch.Tensor:
    return mappings.reduce_from_model_parallel_region(x) if mp_world_size() > 1 else x


def scatter_to_mp(x: torch.Tensor) -> torch.Tensor:
    return mappings.scatter_to_model_parallel_region(x) if mp_world_size() > 1 else x


def gather_from_mp(x: torch.Tensor) -> torch.Tensor:
    return mappings.gather_from_model_parallel_region(x) if mp_world_size() > 1 else x


def _block_seed(base_seed: int, block: int) -> int:
    # splitmix64-style mixing: neighbouring blocks get unrelated streams
    z = (base_seed + 0x9E3779B97F4A7C15 * (block + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def draw_base_seed() -> int:
    """One seed from the global CPU RNG: equal on every rank when the global RNG was seeded equally."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def init_sharded_(
    local: torch.Tensor,
    fill: Callable[[torch.Tensor, torch.Generator], None],
    *,
    shard_dim: int | None,
    rank: int,
    world_size: int,
    base_seed: int | None = None,
) -> torch.Tensor:
    """Fill `local`, this rank's shard of a full tensor, with the values of a full-tensor init.

    `fill(block, generator)` initializes an fp32 block in place (fp32 because some inits, e.g. trunc_normal_,
    are wrong or unsupported in half precision; the block is cast on copy). Blocks are drawn on the CPU whatever
    `local`'s device: CUDA's generator gives other numbers for the same seed, and a model built on a GPU must equal
    the one built on the CPU (random init is for new tensors - adapters, LoRA - so its speed matters little).
    """
    if base_seed is None:
        base_seed = draw_base_seed()
    full_shape = list(local.shape)
    if shard_dim is not None:
        full_shape[shard_dim] *= world_size
    if local.dim() == 0 or local.numel() == 0:
        gen = torch.Generator().manual_seed(_block_seed(base_seed, 0))
        tmp = torch.empty(local.shape, dtype=torch.float32)
        fill(tmp, gen)
        return local.copy_(tmp)
    rows = full_shape[0]
    row_elems = math.prod(full_shape[1:])
    rows_per_block = max(1, INIT_BLOCK_ELEMENTS // max(1, row_elems))
    # This rank's row range and column slice within the full tensor.
    row_lo, row_hi = 0, rows
    cols = slice(None)
    if shard_dim == 0:
        row_lo, row_hi = rank * local.shape[0], (rank + 1) * local.shape[0]
    elif shard_dim is not None:
        size = local.shape[shard_dim]
        cols = (slice(None),) * shard_dim + (slice(rank * size, (rank + 1) * size),)
    with torch.no_grad():
        for block in range(row_lo // rows_per_block, math.ceil(row_hi / rows_per_block)):
            b_lo, b_hi = block * rows_per_block, min(rows, (block + 1) * rows_per_block)
            gen = torch.Generator().manual_seed(_block_seed(base_seed, block))  # CPU: see above
            tmp = torch.empty((b_hi - b_lo, *full_shape[1:]), dtype=torch.float32)
            fill(tmp, gen)
            if shard_dim not in (None, 0):
                tmp = tmp[cols]
            lo, hi = max(b_lo, row_lo), min(b_hi, row_hi)
            local[lo - row_lo : hi - row_lo].copy_(tmp[lo - b_lo : hi - b_lo])
    return local


def uniform_fill(bound: float) -> Callable[[torch.Tensor, torch.Generator], None]:
    return lambda t, g: t.uniform_(-bound, bound, generator=g)


def normal_fill(std: float) -> Callable[[torch.Tensor, torch.Generator], None]:
    return lambda t, g: t.normal_(0.0, std, generator=g)


def linear_weight_fill(in_features: int) -> Callable[[torch.Tensor, torch.Generator], None]:
    # nn.Linear's default, kaiming_uniform_(a=sqrt(5)), is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in is the
    # full input size even for a row-parallel shard.
    return uniform_fill(1.0 / math.sqrt(in_features))


class _ParallelLinear(nn.Module):
    """Shared parts of the column/row-parallel linears. `shard_dims` tells the loader how each tensor is split."""

    shard_dims: dict[str, int | None]

    def __init__(self, in_features: int, out_features: int, bias: bool, local_in: int, local_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # full sizes
        self.weight = nn.Parameter(torch.empty(local_out, local_in))
        self.bias = (
            nn.Parameter(torch.empty(local_out if self.shard_dims["bias"] == 0 else out_features)) if bias else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:  # built under meta_init(): the materializer calls us once storage exists
            return
        init_sharded_(
            self.weight,
            linear_weight_fill(self.in_features),
            shard_dim=self.shard_dims["weight"],
            rank=mp_rank(),
            world_size=mp_world_size(),
        )
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"local_weight={tuple(self.weight.shape)}"
        )


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T with W split by output rows: each rank computes a slice of the output features."""

    shard_dims = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, gather_output: bool = True) -> None:
        self.gather_output = gather_output
        local_out = divide(out_features, mp_world_size(), f"{type(self).__name__} out_features")
        super().__init__(in_features, out_features, bias, in_features, local_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_mp(x), self.weight, self.bias)
        return gather_from_mp(y) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """y = x W^T with W split by input columns: partial products are summed across ranks."""

    shard_dims = {"weight": 1, "bias": None}

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, *, input_is_parallel: bool = True
    ) -> None:
        self.input_is_parallel = input_is_parallel
        local_in = divide(in_features, mp_world_size(), f"{type(self).__name__} in_features")
        super().__init__(in_features, out_features, bias, local_in, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_mp(x)
        y = reduce_from_mp(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class ParallelEmbedding(nn.Module):
    """Token embedding split along the embedding dimension (as Meta's checkpoints are), gathered after lookup."""

    shard_dims = {"weight": 1}

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local_dim = divide(embedding_dim, mp_world_size(), "ParallelEmbedding embedding_dim")
        self.weight = nn.Parameter(torch.empty(num_embeddings, local_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        # nn.Embedding's default N(0, 1)
        init_sharded_(self.weight, normal_fill(1.0), shard_dim=1, rank=mp_rank(), world_size=mp_world_size())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return gather_from_mp(F.embedding(tokens, self.weight))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, local_weight={tuple(self.weight.shape)}"
