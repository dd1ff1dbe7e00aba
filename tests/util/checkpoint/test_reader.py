"""The shared reader (util/checkpoint/reader.py): release(), shard requests, closing.

Tiny random tensors; runs in seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.util.checkpoint.helpers import LINUX, PARAMS, make_state_dict, save_lazyllama
from util.checkpoint import (
    CheckpointError,
    meta_split_dim,
    open_checkpoint,
    save_checkpoint,
    write_hf_checkpoint,
    write_meta_checkpoint,
)


@pytest.mark.parametrize("fmt", ["meta", "hf", "lazyllama"])
def test_release_then_read_again(tmp_path: Path, fmt: str) -> None:
    sd = make_state_dict()
    if fmt == "meta":
        write_meta_checkpoint(tmp_path, sd, params=PARAMS, num_shards=2)
    elif fmt == "hf":
        write_hf_checkpoint(tmp_path, sd, params=PARAMS)
    else:
        save_lazyllama(tmp_path, sd, 2)
    reader = open_checkpoint(tmp_path)
    assert reader.format == fmt
    for key in sorted(reader.keys()):
        first = reader.read(key, shard_dim=meta_split_dim(key), rank=1, world_size=2)
        before = first.clone()
        reader.release(key)
        assert torch.equal(first, before), key  # a view taken before release still reads the same values
        again = reader.read(key, shard_dim=meta_split_dim(key), rank=1, world_size=2)
        assert torch.equal(again, before), key
        assert torch.equal(reader.read(key), sd[key]), key


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not LINUX, reason="madvise(MADV_DONTNEED) is Linux-only")
@pytest.mark.parametrize("fmt", ["meta", "lazyllama"])
def test_release_gives_pages_back(tmp_path: Path, fmt: str) -> None:
    big = torch.randn(2048, 2048)  # 16 MiB
    if fmt == "meta":
        write_meta_checkpoint(tmp_path, {"output.weight": big}, params=PARAMS)
    else:
        save_checkpoint(tmp_path, {"output.weight": big}, shard_dims={"output.weight": 0})
    del big
    reader = open_checkpoint(tmp_path)
    t = reader.read("output.weight")
    float(t.sum())  # touch every page
    touched = _rss_file_kib()
    reader.release("output.weight")
    released = _rss_file_kib()
    assert touched - released > 12 * 1024, (touched, released)
    assert torch.isfinite(t.sum())  # still readable: pages come back from the file


def test_non_divisible_shard_request(meta_ckpts) -> None:
    _, dirs = meta_ckpts
    reader = open_checkpoint(dirs[2])
    key = "layers.0.attention.wk.weight"
    with pytest.raises(CheckpointError) as err:
        reader.read(key, shard_dim=0, rank=0, world_size=3)
    msg = str(err.value)
    assert key in msg and "(32, 64)" in msg and "world_size=3" in msg and str(dirs[2]) in msg
    with pytest.raises(CheckpointError, match="rank=2"):
        reader.read(key, shard_dim=0, rank=2, world_size=2)
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        reader.read("nope")


def test_closed_reader(tmp_path: Path) -> None:
    save_lazyllama(tmp_path, make_state_dict(), 1)
    with open_checkpoint(tmp_path) as reader:
        kept = reader.read("norm.weight")
    with pytest.raises(CheckpointError, match="closed"):
        reader.read("norm.weight")
    assert torch.isfinite(kept).all()  # views handed out before close stay valid
