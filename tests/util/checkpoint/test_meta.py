"""Meta's format (util/checkpoint/meta.py): reading, resharding, views, the writer, and bad .pth files.

Tiny random tensors; runs in seconds on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.util.checkpoint.helpers import LINUX, PARAMS, assert_names_file, chunk, make_state_dict, mapped_file
from util.checkpoint import CheckpointError, open_checkpoint, write_meta_checkpoint


@pytest.mark.parametrize("saved", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_meta_read_equals_chunk_of_full(meta_ckpts, saved: int, world_size: int) -> None:
    sd, dirs = meta_ckpts
    reader = open_checkpoint(dirs[saved])
    assert reader.format == "meta"
    assert reader.config == PARAMS
    assert reader.keys() == set(sd)  # rope.freqs included
    for key, full in sd.items():
        assert reader.shape(key) == tuple(full.shape), key
        assert reader.dtype(key) == full.dtype
        # the model's own layout, and every other dim (a layout differing from the saved split)
        for shard_dim in [None, *range(full.dim())]:
            for rank in range(world_size):
                got = reader.read(key, shard_dim=shard_dim, rank=rank, world_size=world_size)
                want = chunk(full, shard_dim, rank, world_size)
                assert torch.equal(got, want), (key, shard_dim, rank, world_size)


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_meta_read_returns_views_into_the_mapped_file(meta_ckpts) -> None:
    sd, dirs = meta_ckpts
    key = "layers.1.attention.wq.weight"
    r1 = open_checkpoint(dirs[1])
    whole = r1.read(key)
    assert mapped_file(whole.data_ptr()) == str(dirs[1] / "consolidated.00.pth")
    assert r1.read(key).data_ptr() == whole.data_ptr()  # same bytes again, no copy
    # saved at 2, read at 2: exactly file 1's tensor; read at 4: a narrow() of one file's tensor
    r2 = open_checkpoint(dirs[2])
    part = r2.read(key, shard_dim=0, rank=1, world_size=2)
    assert mapped_file(part.data_ptr()) == str(dirs[2] / "consolidated.01.pth")
    quarter = r2.read(key, shard_dim=0, rank=3, world_size=4)
    assert mapped_file(quarter.data_ptr()) == str(dirs[2] / "consolidated.01.pth")
    assert torch.equal(quarter, chunk(sd[key], 0, 3, 4))
    # a row-parallel weight read at 2 along its saved dim 1
    wo = r2.read("layers.0.attention.wo.weight", shard_dim=1, rank=0, world_size=2)
    assert mapped_file(wo.data_ptr()) == str(dirs[2] / "consolidated.00.pth")
    # replicated norms come from file 0 without a copy
    norm = r2.read("norm.weight")
    assert mapped_file(norm.data_ptr()) == str(dirs[2] / "consolidated.00.pth")


def test_meta_unknown_keys_take_the_callers_split(tmp_path: Path) -> None:
    full = torch.randn(6, 8)
    rep = torch.randn(5)
    for r, piece in enumerate(full.chunk(2, dim=1)):
        torch.save(
            {"adapter.weight": piece.clone(), "adapter.gate": rep.clone()},
            tmp_path / f"consolidated.0{r}.pth",
        )
    reader = open_checkpoint(tmp_path)
    assert reader.config is None
    for ws in (1, 2):
        for rank in range(ws):
            got = reader.read("adapter.weight", shard_dim=1, rank=rank, world_size=ws)
            assert torch.equal(got, chunk(full, 1, rank, ws))
    assert torch.equal(reader.read("adapter.gate"), rep)
    assert reader.shape("adapter.gate") == (5,)


def test_meta_shards_with_different_shapes_give_the_split(tmp_path: Path) -> None:
    full = torch.randn(6, 8)
    torch.save({"x": full[:, :3].clone()}, tmp_path / "consolidated.00.pth")
    torch.save({"x": full[:, 3:].clone()}, tmp_path / "consolidated.01.pth")
    reader = open_checkpoint(tmp_path)
    assert reader.shape("x") == (6, 8)
    assert torch.equal(reader.read("x"), full)
    assert torch.equal(reader.read("x", shard_dim=0, rank=1, world_size=2), full[3:])


def test_single_pth_file(tmp_path: Path) -> None:
    sd = make_state_dict(seed=3)
    write_meta_checkpoint(tmp_path, sd, params=PARAMS)
    reader = open_checkpoint(tmp_path / "consolidated.00.pth")
    assert reader.format == "meta" and reader.config == PARAMS
    for key in sd:
        assert torch.equal(reader.read(key), sd[key])


def test_meta_writer_does_not_save_whole_storages_of_views(tmp_path: Path) -> None:
    big = torch.randn(1000, 64)
    write_meta_checkpoint(tmp_path, {"norm.weight": big[0]}, params=PARAMS)
    assert (tmp_path / "consolidated.00.pth").stat().st_size < 64 * 4 * 20
    assert torch.equal(open_checkpoint(tmp_path).read("norm.weight"), big[0])


def test_truncated_pth(tmp_path: Path) -> None:
    write_meta_checkpoint(tmp_path, make_state_dict(), params=PARAMS)
    f = tmp_path / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "consolidated.00.pth")


def test_empty_pth(tmp_path: Path) -> None:
    (tmp_path / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated") as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "consolidated.00.pth")


def test_legacy_non_zip_pth(tmp_path: Path) -> None:
    torch.save({"norm.weight": torch.ones(4)}, tmp_path / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="zip format") as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "consolidated.00.pth")


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    torch.save({"norm.weight": torch.ones(4), "x": _RunsCode(marker)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refused") as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "consolidated.00.pth")
    assert not marker.exists()


def test_pth_that_is_not_a_dict_of_tensors(tmp_path: Path) -> None:
    torch.save({"model": {"norm.weight": torch.ones(4)}}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="flat dict") as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "consolidated.00.pth")


def test_missing_key_across_shards(tmp_path: Path) -> None:
    sd = make_state_dict()
    write_meta_checkpoint(tmp_path, sd, params=PARAMS, num_shards=2)
    shard1 = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    del shard1["layers.1.feed_forward.w2.weight"]
    torch.save(shard1, tmp_path / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="layers.1.feed_forward.w2.weight") as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "consolidated.01.pth")


def test_meta_shard_numbering_gap(tmp_path: Path) -> None:
    write_meta_checkpoint(tmp_path, make_state_dict(), params=PARAMS, num_shards=2)
    os.replace(tmp_path / "consolidated.01.pth", tmp_path / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="consolidated.02.pth"):
        open_checkpoint(tmp_path)
