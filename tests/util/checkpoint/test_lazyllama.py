"""The lazyllama format (util/checkpoint/lazyllama.py): round trips across model-parallel sizes, atomic saves.

Tiny random tensors; runs in seconds on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import util.checkpoint.safetensors as st
from tests.util.checkpoint.helpers import (
    HIDDEN,
    LINUX,
    PARAMS,
    assert_names_file,
    chunk,
    make_state_dict,
    mapped_file,
    save_lazyllama,
    shard_dims_of,
)
from util.checkpoint import CheckpointError, open_checkpoint, save_checkpoint


@pytest.mark.parametrize("saved", [1, 2, 4])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_lazyllama_round_trip_across_world_sizes(tmp_path: Path, saved: int, world_size: int) -> None:
    sd = make_state_dict(torch.bfloat16)
    sd["layers.0.attention.wq.lora_a"] = torch.randn(8, 64)  # an extra key, split on dim 0, other dtype
    save_lazyllama(tmp_path, sd, saved, config=PARAMS, extra={"step": 7})
    reader = open_checkpoint(tmp_path)
    assert reader.format == "lazyllama" and reader.config == PARAMS
    assert reader.info["model_parallel_size"] == saved and reader.info["extra"] == {"step": 7}
    assert reader.info["trainable_only"] is False and reader.info["dtype"] == "mixed"
    assert reader.keys() == set(sd)
    dims = shard_dims_of(sd) | {"layers.0.attention.wq.lora_a": 0}
    for key, full in sd.items():
        assert reader.shape(key) == tuple(full.shape) and reader.dtype(key) == full.dtype
        assert torch.equal(reader.read(key), full), key
        for shard_dim in {dims[key], *range(full.dim())}:
            for rank in range(world_size):
                got = reader.read(key, shard_dim=shard_dim, rank=rank, world_size=world_size)
                assert torch.equal(got, chunk(full, shard_dim, rank, world_size)), (key, shard_dim, rank)


def test_lazyllama_rank_files_replicate_nothing_and_load_in_safetensors(tmp_path: Path) -> None:
    sd = make_state_dict()
    save_lazyllama(tmp_path, sd, 2, config=PARAMS)
    r0 = safetensors.torch.load_file(tmp_path / "consolidated.00.safetensors")
    r1 = safetensors.torch.load_file(tmp_path / "consolidated.01.safetensors")
    assert "norm.weight" in r0 and "norm.weight" not in r1  # replicated keys: written once, by rank 0
    assert torch.equal(r1["layers.0.feed_forward.w2.weight"], sd["layers.0.feed_forward.w2.weight"][:, HIDDEN // 2 :])


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_lazyllama_reads_are_views(tmp_path: Path) -> None:
    sd = make_state_dict()
    save_lazyllama(tmp_path, sd, 2)
    reader = open_checkpoint(tmp_path)
    got = reader.read("layers.1.feed_forward.w1.weight", shard_dim=0, rank=1, world_size=2)
    assert mapped_file(got.data_ptr()) == str(tmp_path / "consolidated.01.safetensors")
    got = reader.read("norm.weight")
    assert mapped_file(got.data_ptr()) == str(tmp_path / "consolidated.00.safetensors")


def test_lazyllama_save_accepts_views_and_noncontiguous(tmp_path: Path) -> None:
    base = torch.randn(8, 6)
    tensors = {"t": base.t(), "row": base[2], "also": base[3:5]}  # all share one storage
    save_checkpoint(tmp_path, tensors, shard_dims=dict.fromkeys(tensors), trainable_only=True)
    reader = open_checkpoint(tmp_path / "consolidated.00.safetensors")  # a single-rank file on its own
    assert reader.format == "lazyllama"
    for k, v in tensors.items():
        assert torch.equal(reader.read(k), v)
    assert open_checkpoint(tmp_path).info["trainable_only"] is True


def test_lazyllama_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = make_state_dict(seed=1), make_state_dict(seed=2)
    save_lazyllama(tmp_path, old, 1, config=PARAMS)
    before = sorted(p.name for p in tmp_path.iterdir())
    real, calls = st._tensor_bytes, []

    def crash_half_way(t: torch.Tensor) -> memoryview:
        calls.append(1)
        if len(calls) > len(new) // 2:
            raise OSError("disk full (simulated)")
        return real(t)

    monkeypatch.setattr(st, "_tensor_bytes", crash_half_way)
    with pytest.raises(OSError, match="simulated"):
        save_lazyllama(tmp_path, new, 1, config=PARAMS | {"dim": 999})
    assert len(calls) > 1  # it really failed mid-file
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp files left behind
    reader = open_checkpoint(tmp_path)
    assert reader.config == PARAMS
    for key in old:
        assert torch.equal(reader.read(key), old[key]), key


def test_lazyllama_save_at_smaller_world_size_removes_stale_rank_files(tmp_path: Path) -> None:
    save_lazyllama(tmp_path, make_state_dict(seed=1), 4)
    sd = make_state_dict(seed=2)
    save_lazyllama(tmp_path, sd, 2)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "consolidated.00.safetensors",
        "consolidated.01.safetensors",
    ]
    reader = open_checkpoint(tmp_path)
    assert torch.equal(reader.read("layers.0.attention.wo.weight"), sd["layers.0.attention.wo.weight"])


def test_lazyllama_mixed_saves_are_detected(tmp_path: Path) -> None:
    sd = make_state_dict()
    save_lazyllama(tmp_path / "a", sd, 2)
    save_lazyllama(tmp_path / "b", sd, 4)
    os.replace(tmp_path / "b" / "consolidated.01.safetensors", tmp_path / "a" / "consolidated.01.safetensors")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path / "a")
    assert_names_file(err, "consolidated.01.safetensors")


def test_lazyllama_missing_rank_file(tmp_path: Path) -> None:
    save_lazyllama(tmp_path, make_state_dict(), 2)
    (tmp_path / "consolidated.01.safetensors").unlink()
    with pytest.raises(CheckpointError, match="consolidated.01.safetensors"):
        open_checkpoint(tmp_path)


def test_lazyllama_rank_file_opened_alone(tmp_path: Path) -> None:
    save_lazyllama(tmp_path, make_state_dict(), 2)
    with pytest.raises(CheckpointError, match="open its directory") as err:
        open_checkpoint(tmp_path / "consolidated.01.safetensors")
    assert_names_file(err, "consolidated.01.safetensors")


def test_lazyllama_rank_files_without_index(tmp_path: Path) -> None:
    save_lazyllama(tmp_path, make_state_dict(), 2)
    (tmp_path / "lazyllama.json").unlink()
    with pytest.raises(CheckpointError, match="lazyllama.json"):
        open_checkpoint(tmp_path)
