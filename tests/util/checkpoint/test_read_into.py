"""read_into of large tensors: the embedding (split on dim 1 under model parallel) is read with pread when the
whole tensor is wanted, and copies from the mapping (a cast, a column slice) go a block of rows at a time with the
pages released between blocks - same values either way."""

import torch

from tests.helpers import params_of, random_state_dict, tiny_args
from util.checkpoint import open_checkpoint, write_hf_checkpoint
from util.checkpoint import reader as reader_module

KEY = "tok_embeddings.weight"


def _checkpoint(tmp_path):
    args = tiny_args()
    sd = random_state_dict(args, seed=2, dtype=torch.bfloat16)
    write_hf_checkpoint(tmp_path, sd, params=params_of(args))
    return sd[KEY], open_checkpoint(tmp_path)


def test_the_whole_embedding_is_preread_at_model_parallel_size_1(tmp_path, monkeypatch):
    full, ckpt = _checkpoint(tmp_path)
    preads = []
    real = reader_module._pread_slice
    monkeypatch.setattr(reader_module, "_pread_slice", lambda *a: preads.append(real(*a)) or preads[-1])
    out = torch.empty_like(full)
    ckpt.read_into(KEY, out, shard_dim=1, rank=0, world_size=1)  # ParallelEmbedding's shard_dims
    assert preads == [True]
    assert torch.equal(out, full)


def test_copies_from_the_mapping_go_in_row_blocks_with_pages_released(tmp_path, monkeypatch):
    full, ckpt = _checkpoint(tmp_path)
    monkeypatch.setattr(reader_module, "READ_CHUNK_BYTES", 4096)  # 512 x 64 bf16 = 64 KiB: 16 blocks
    released = []
    real_release = ckpt.release
    monkeypatch.setattr(ckpt, "release", lambda key: released.append(key) or real_release(key))
    cast = torch.empty(full.shape, dtype=torch.float32)
    ckpt.read_into(KEY, cast)  # a cast: no pread
    assert torch.equal(cast, full.float())
    assert released.count(KEY) == 16
    for rank in (0, 1):  # a column slice (model parallel 2): not contiguous bytes, copied in blocks too
        released.clear()
        part = torch.empty(full.shape[0], full.shape[1] // 2, dtype=torch.bfloat16)
        ckpt.read_into(KEY, part, shard_dim=1, rank=rank, world_size=2)
        assert torch.equal(part, full.chunk(2, dim=1)[rank])
        assert len(released) == 8  # blocks of 4 KiB of the slice: 64 rows of 32 bf16 columns
