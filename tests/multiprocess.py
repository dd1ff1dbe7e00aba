"""Run a function in N real processes joined by a gloo process group (torchrun's environment, by hand).

The workers compute on CPU over gloo on any machine: LAZYLLAMA_DIST_BACKEND=gloo keeps util.dist from choosing
nccl (and this rank's GPU) where CUDA is available."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LAZYLLAMA_DIST_BACKEND="gloo",
    )
    import torch

    torch.set_num_threads(1)  # two processes on two cores
    try:
        result = fn(rank, *args)
        payload = ("ok", result)
    except BaseException as e:  # surfaced in the parent with the worker's traceback
        payload = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        from util.dist import shutdown

        shutdown()
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(payload, f)


def run_multiprocess(fn, world_size: int, *args, timeout: float = 240):
    """fn(rank, *args) in `world_size` spawned processes; returns the list of their results (picklable). Ranks still
    running after `timeout` s are killed and the test fails: a rank waiting in a collective that another never
    joins would otherwise hang the suite."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, _free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                alive = [rank for rank, proc in enumerate(ctx.processes) if proc.is_alive()]
                for proc in ctx.processes:
                    proc.kill()
                raise AssertionError(f"ranks {alive} of {world_size} still running after {timeout} s (a hang?): killed")
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(value)
            results.append(value)
        return results
