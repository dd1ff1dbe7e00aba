"""Process groups: torchrun, SLURM, or a plain `python` process (a one-process group by itself).

Model parallel groups come from fairscale (`fairscale.nn.model_parallel.initialize`); the layers in
`model/layers` use them through `mp_rank()` / `mp_world_size()`.
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
    rank: int
    world_size: int
    local_rank: int
    model_parallel_rank: int
    model_parallel_size: int
    data_parallel_rank: int
    data_parallel_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
                f"asked for {model_parallel_size}; call destroy_distributed() first"
            )
    else:
        if model_parallel_size < 1 or world_size % model_parallel_size:
            raise ValueError(
                f"model_parallel_size={model_parallel_size} must divide the number of processes ({world_size}); "
                f"launch with torchrun --nproc_per_node a multiple of {model_parallel_size}"
            )
        fs_mp.initialize_model_parallel(model_parallel_size)
    return info()


def info() -> DistInfo:
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        model_parallel_rank=fs_mp.get_model_parallel_rank(),
        model_parallel_size=fs_mp.get_model_parallel_world_size(),
        data_parallel_rank=fs_mp.get_data_parallel_rank(),
        data_parallel_size=fs_mp.get_data_parallel_world_size(),
        backend=dist.get_backend(),
    )


def destroy_distributed() -> None:
    if fs_mp.model_parallel_is_initialized():
        fs_mp.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def shutdown(*, keep_process_group: bool = False) -> None:
    """The one teardown: the model-parallel groups, then the process group unless keep_process_group (it was the
    caller's). Idempotent."""
    if fs_mp.model_parallel_is_initialized():
        fs_mp.destroy_model_parallel()
    if not keep_process_group and dist.is_initialized():
        dist.destroy_process_group()
