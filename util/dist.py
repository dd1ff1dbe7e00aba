"""Process groups and this process's place in them: the one module util/ and the entry scripts ask.

Set up: torchrun, SLURM, or a plain `python` process (a one-process group by itself). Model-parallel and
data-parallel groups come from fairscale (`fairscale.nn.model_parallel.initialize`). Asked: `position()` (ranks,
sizes, and whether this rank writes checkpoint files), `dp_group()` / `mp_group()` / `mp_src_rank()`, `barrier()`.
Every question works before (or without) any setup: one process, rank 0 of 1, no groups.

Backend and device: nccl on this rank's GPU where CUDA is available, else gloo on CPU; LAZYLLAMA_DIST_BACKEND=gloo
(or nccl) overrides the choice, and gloo computes on CPU even where GPUs are (the test suite's workers set it).
This rank's GPU comes from the visible devices: under SLURM with one GPU bound per task LOCAL_RANK can exceed the
one visible index. `control_group()`: a gloo group with a long timeout for messages that wait on a person (demo.py's
followers idle while rank 0 waits for input; rank 0 preparing the quickstart), which NCCL's watchdog would abort
after its 10-minute default.

model/layers/parallel.py keeps its own two one-liners (`mp_rank`, `mp_world_size`) because model/ may not import
util/; they read the same fairscale state.
"""

from __future__ import annotations

import datetime
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


BACKEND_ENV = "LAZYLLAMA_DIST_BACKEND"
CONTROL_TIMEOUT_ENV = "LAZYLLAMA_CONTROL_TIMEOUT"  # seconds; the GPU check shortens it to prove the path
CONTROL_TIMEOUT = datetime.timedelta(days=30)  # a chat server idles for as long as nobody asks


def default_backend() -> str:
    """LAZYLLAMA_DIST_BACKEND if set, else nccl where CUDA is available, else gloo."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in ("gloo", "nccl"):
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected 'gloo' or 'nccl' (or unset: nccl with CUDA)")
        if forced == "nccl" and not torch.cuda.is_available():
            raise ValueError(f"{BACKEND_ENV}=nccl but CUDA is not available here: unset it or use gloo")
        return forced
    return "nccl" if torch.cuda.is_available() else "gloo"


def gpu_index(local_rank: int | None = None, visible: int | None = None) -> int:
    """This rank's GPU among the visible ones. One visible GPU (SLURM binding one per task, or
    CUDA_VISIBLE_DEVICES set per rank): 0 whatever LOCAL_RANK says; several: LOCAL_RANK, which must be one of them."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    visible = torch.cuda.device_count() if visible is None else visible
    if visible < 1:
        raise RuntimeError("no CUDA device is visible (check CUDA_VISIBLE_DEVICES); run with --device cpu")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {visible} GPUs are visible to this process "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): launch at most {visible} "
            "processes per node (torchrun --nproc_per_node, srun --ntasks-per-node), or bind one GPU per task"
        )
    return local_rank


def local_device() -> torch.device:
    """Where this rank computes: its GPU when the backend is nccl, else the CPU (the backend of the process group
    if one exists, else the one init_process_group would choose)."""
    backend = dist.get_backend() if dist.is_initialized() else default_backend()
    if backend == "nccl":
        return torch.device("cuda", gpu_index())
    return torch.device("cpu")


_control: dict[str, object] = {}  # the control group, and the world group it was made in


def control_timeout() -> datetime.timedelta:
    seconds = os.environ.get(CONTROL_TIMEOUT_ENV)
    return datetime.timedelta(seconds=float(seconds)) if seconds else CONTROL_TIMEOUT


def control_group() -> dist.ProcessGroup | None:
    """All ranks, over gloo (CPU objects, no NCCL watchdog), with a long timeout: for messages that wait on a
    person. Created on first use; every rank must make that first call at the same point (a collective). None
    without a process group."""
    if not dist.is_initialized():
        return None
    if _control.get("world") is not dist.group.WORLD:  # none yet, or made in a process group since destroyed
        _control.update(group=dist.new_group(backend="gloo", timeout=control_timeout()), world=dist.group.WORLD)
    return _control["group"]


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
    backend = backend or default_backend()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        _slurm_env()
    if "RANK" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(gpu_index())
        dist.init_process_group(backend)
    else:  # plain `python`: a one-process group on a private store
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend, rank=0, world_size=1)


def init_distributed(model_parallel_size: int = 1, *, backend: str | None = None) -> DistInfo:
    """Set up torch.distributed (if needed) and fairscale's model-parallel groups; idempotent.

    backend: default_backend() (LAZYLLAMA_DIST_BACKEND, else "nccl" when CUDA is available, else "gloo"). Under
    torchrun the environment says rank and world size; under SLURM (srun) SLURM_PROCID/SLURM_NTASKS do;
    otherwise this process is a group of one.
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
        _control.clear()  # the control group goes with it
        dist.destroy_process_group()
