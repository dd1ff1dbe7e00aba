"""Process groups and this process's place in them: the one module util/ and the entry scripts ask.

Set up: torchrun, SLURM, or a plain `python` process (a one-process group by itself). Model-parallel and
data-parallel groups come from fairscale (`fairscale.nn.model_parallel.initialize`). Asked: `position()` (ranks,
sizes, and whether this rank writes checkpoint files), `dp_group()` / `mp_group()` / `mp_src_rank()`, `barrier()`.
Every question works before (or without) any setup: one process, rank 0 of 1, no groups.

model/layers/parallel.py keeps its own two one-liners (`mp_rank`, `mp_world_size`) because model/ may not import
util/; they read the same fairscale state.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_mp


@dataclass(frozen=True)
class DistInfo:
    """This process's position. Model parallel splits one model across `model_parallel_size` ranks; data
    parallel repeats that group `data_parallel_size` times."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    model_parallel_rank: int = 0
    model_parallel_size: int = 1
    data_parallel_rank: int = 0
    data_parallel_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of the world: logs, prints, publishes directories."""
        return self.rank == 0

    @property
    def writes(self) -> bool:
        """Whether this rank writes model files: data-parallel rank 0, each model-parallel rank its shard (the
        other data-parallel replicas hold the same values)."""
        return self.data_parallel_rank == 0


def _groups_ready() -> bool:
    return dist.is_initialized() and fs_mp.model_parallel_is_initialized()


def position() -> DistInfo:
    """Where this process stands; a process without model-parallel groups is rank 0 of 1."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not _groups_ready():
        if dist.is_initialized():  # torch.distributed only: no model-parallel split yet
            return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        model_parallel_rank=fs_mp.get_model_parallel_rank(),
        model_parallel_size=fs_mp.get_model_parallel_world_size(),
        data_parallel_rank=fs_mp.get_data_parallel_rank(),
        data_parallel_size=fs_mp.get_data_parallel_world_size(),
    )


def dp_group() -> dist.ProcessGroup | None:
    """The data-parallel group (the replicas of this model-parallel rank), or None without groups."""
    return fs_mp.get_data_parallel_group() if _groups_ready() else None


def mp_group() -> dist.ProcessGroup | None:
    """The model-parallel group (the ranks holding one model's shards), or None without groups."""
    return fs_mp.get_model_parallel_group() if _groups_ready() else None


def mp_src_rank() -> int:
    """The global rank of this model-parallel group's first member (it broadcasts to the others)."""
    return fs_mp.get_model_parallel_src_rank() if _groups_ready() else 0


def barrier() -> None:
    """All ranks wait here; nothing without model-parallel groups. Only once the groups exist: before that (the
    quickstart's preparation on rank 0) the other ranks wait in a barrier of their own, which this must not pair
    with."""
    if _groups_ready() and dist.get_world_size() > 1:
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env() -> None:
    """Translate SLURM's variables (srun) into the ones torch.distributed reads."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
        try:
            first = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], check=True, capture_output=True, text=True
            ).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = nodes.split(",")[0]
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", "29500")


def init_process_group(*, backend: str | None = None) -> None:
    """torch.distributed only (no model-parallel groups yet); idempotent. See init_distributed."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        _slurm_env()
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    else:  # plain `python`: a one-process group on a private store
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend, rank=0, world_size=1)


def init_distributed(model_parallel_size: int = 1, *, backend: str | None = None) -> DistInfo:
    """Set up torch.distributed (if needed) and fairscale's model-parallel groups; idempotent.

    backend: "nccl" when CUDA is available, else "gloo". Under torchrun the environment says rank and world
    size; under SLURM (srun) SLURM_PROCID/SLURM_NTASKS do; otherwise this process is a group of one.
    """
    init_process_group(backend=backend)
    world_size = dist.get_world_size()
    if fs_mp.model_parallel_is_initialized():
        if fs_mp.get_model_parallel_world_size() != model_parallel_size:
            raise RuntimeError(
                f"model parallel is already initialized with size {fs_mp.get_model_parallel_world_size()}, "
                f"asked for {model_parallel_size}; call shutdown() first"
            )
    else:
        if model_parallel_size < 1 or world_size % model_parallel_size:
            raise ValueError(
                f"model_parallel_size={model_parallel_size} must divide the number of processes ({world_size}); "
                f"launch with torchrun --nproc_per_node a multiple of {model_parallel_size}"
            )
        fs_mp.initialize_model_parallel(model_parallel_size)
    return position()


def shutdown(*, keep_process_group: bool = False) -> None:
    """The one teardown: the model-parallel groups, then the process group unless keep_process_group (it was the
    caller's). Idempotent."""
    if fs_mp.model_parallel_is_initialized():
        fs_mp.destroy_model_parallel()
    if not keep_process_group and dist.is_initialized():
        dist.destroy_process_group()
