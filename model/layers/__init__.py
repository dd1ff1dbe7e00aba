from model.layers.norm import RMSNorm
from model.layers.parallel import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    init_sharded_,
    mp_rank,
    mp_world_size,
)
from model.layers.rope import RotaryEmbedding

__all__ = [
    "ColumnParallelLinear",
    "ParallelEmbedding",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "init_sharded_",
    "mp_rank",
    "mp_world_size",
]
