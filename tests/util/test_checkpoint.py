"""Tests for util/checkpoint.py: formats, resharding, views, release, atomic saves, bad inputs.

Pure tensor-level (no model/ imports); tiny random tensors, so the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import util.checkpoint as ckpt
from util.checkpoint import (
    CheckpointError,
    hf_permute_qk,
    hf_unpermute_qk,
    meta_split_dim,
    open_checkpoint,
    save_checkpoint,
    write_hf_checkpoint,
    write_meta_checkpoint,
)

PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 128,
    "multiple_of": 32,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_seq_len": 128,
}
HIDDEN = 192  # Meta's rule for dim 64, multiple_of 32: int(2 * 4 * 64 / 3) = 170 -> 192
HEAD_DIM = 16
LINUX = sys.platform.startswith("linux")


def make_state_dict(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim, kv = PARAMS["dim"], PARAMS["n_kv_heads"] * HEAD_DIM

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    sd = {"tok_embeddings.weight": r(128, dim)}
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        sd |= {
            p + "attention.wq.weight": r(dim, dim),
            p + "attention.wk.weight": r(kv, dim),
            p + "attention.wv.weight": r(kv, dim),
            p + "attention.wo.weight": r(dim, dim),
            p + "feed_forward.w1.weight": r(HIDDEN, dim),
            p + "feed_forward.w2.weight": r(dim, HIDDEN),
            p + "feed_forward.w3.weight": r(HIDDEN, dim),
            p + "attention_norm.weight": r(dim),
            p + "ffn_norm.weight": r(dim),
        }
    sd |= {"norm.weight": r(dim), "output.weight": r(128, dim), "rope.freqs": r(HEAD_DIM // 2)}
    return sd


def chunk(t: torch.Tensor, shard_dim: int | None, rank: int, world_size: int) -> torch.Tensor:
    return t if shard_dim is None else t.chunk(world_size, dim=shard_dim)[rank]


def shard_dims_of(sd: dict[str, torch.Tensor]) -> dict[str, int | None]:
    return {k: meta_split_dim(k) for k in sd}


def mapped_file(ptr: int) -> str | None:
    """The file whose mapping contains address `ptr` (Linux /proc/self/maps), or None for anonymous memory."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def assert_names_file(err: pytest.ExceptionInfo[CheckpointError], name: str) -> None:
    assert name in str(err.value), f"expected {name!r} in the message: {err.value}"


# ------------------------------------------------------------------------------------------------------
# Meta .pth
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict[int, Path]]:
    sd = make_state_dict()
    dirs = {}
    for n in (1, 2):
        dirs[n] = write_meta_checkpoint(tmp_path_factory.mktemp(f"meta{n}"), sd, params=PARAMS, num_shards=n)
    return sd, dirs


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


# ------------------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------------------


def _hf_variants():
    for dtype in (torch.float32, torch.bfloat16):
        for max_shard_bytes in (None, 40_000):
            yield pytest.param(dtype, max_shard_bytes, id=f"{str(dtype)[6:]}-{max_shard_bytes or 'single'}")


@pytest.mark.parametrize(("dtype", "max_shard_bytes"), list(_hf_variants()))
def test_hf_round_trip_bitwise(tmp_path: Path, dtype: torch.dtype, max_shard_bytes: int | None) -> None:
    sd = make_state_dict(dtype)
    write_hf_checkpoint(tmp_path, sd, params=PARAMS, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_bytes is None:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
    # the files are real HF safetensors: the official library reads them, under HF names, permuted
    stored = {}
    for f in files:
        stored |= safetensors.torch.load_file(tmp_path / f)
    assert "model.layers.0.self_attn.q_proj.weight" in stored and "rope.freqs" not in stored
    assert torch.equal(
        stored["model.layers.1.self_attn.k_proj.weight"], hf_permute_qk(sd["layers.1.attention.wk.weight"], 2)
    )
    assert not torch.equal(stored["model.layers.1.self_attn.k_proj.weight"], sd["layers.1.attention.wk.weight"])

    reader = open_checkpoint(tmp_path)
    assert reader.format == "hf"
    assert reader.keys() == set(sd) - {"rope.freqs"}
    for key in sorted(reader.keys()):
        full = sd[key]
        assert reader.shape(key) == tuple(full.shape) and reader.dtype(key) == dtype
        assert torch.equal(reader.read(key), full), key
        for ws in (2, 4):  # wk at 4: 8 rows per rank = half a kv head
            for shard_dim in range(full.dim()):
                for rank in range(ws):
                    got = reader.read(key, shard_dim=shard_dim, rank=rank, world_size=ws)
                    assert torch.equal(got, chunk(full, shard_dim, rank, ws)), (key, shard_dim, rank, ws)


def test_hf_writer_accepts_a_stream(tmp_path: Path) -> None:
    sd = make_state_dict(seed=5)
    write_hf_checkpoint(tmp_path, ((k, v) for k, v in sd.items()), params=PARAMS, max_shard_bytes=30_000)
    reader = open_checkpoint(tmp_path)
    for key in sorted(reader.keys()):
        assert torch.equal(reader.read(key), sd[key]), key


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_hf_reads_are_views_except_permuted_qk(tmp_path: Path) -> None:
    sd = make_state_dict()
    write_hf_checkpoint(tmp_path, sd, params=PARAMS)
    reader = open_checkpoint(tmp_path)
    wv = reader.read("layers.0.attention.wv.weight", shard_dim=0, rank=1, world_size=2)
    assert mapped_file(wv.data_ptr()) == str(tmp_path / "model.safetensors")
    wq = reader.read("layers.0.attention.wq.weight")
    assert mapped_file(wq.data_ptr()) != str(tmp_path / "model.safetensors")


def test_hf_permutation_round_trip_and_inverse() -> None:
    w = torch.randn(4 * HEAD_DIM, 64)
    assert torch.equal(hf_unpermute_qk(hf_permute_qk(w, 4), 4), w)
    assert torch.equal(hf_permute_qk(hf_unpermute_qk(w, 4), 4), w)
    # HF row j of a head is Meta row 2j; row head_dim/2 + j is Meta row 2j + 1
    hf = hf_permute_qk(w, 4)
    assert torch.equal(hf[HEAD_DIM + 1], w[HEAD_DIM + 2])
    assert torch.equal(hf[HEAD_DIM + HEAD_DIM // 2 + 1], w[HEAD_DIM + 3])


def _rope_meta(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Meta's RoPE: consecutive pairs (2j, 2j+1) rotated as complex numbers. x: [seq, heads, head_dim]."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cis = torch.polar(torch.ones(len(pos), hd // 2, dtype=torch.float64), torch.outer(pos, freqs))
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
    return torch.view_as_real(xc * cis[:, None, :]).flatten(-2)


def _rope_hf(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """HF's RoPE: x * cos + rotate_half(x) * sin, pairing j with j + head_dim/2."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(pos, freqs)
    emb = torch.cat([ang, ang], dim=-1)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def test_hf_permutation_matches_rotate_half_rope() -> None:
    """Meta weights + Meta RoPE give the same scores as HF-permuted weights + HF RoPE (checks direction)."""
    g = torch.Generator().manual_seed(0)
    wq = torch.randn(4 * HEAD_DIM, 64, generator=g, dtype=torch.float64)
    wk = torch.randn(2 * HEAD_DIM, 64, generator=g, dtype=torch.float64)
    x = torch.randn(7, 64, generator=g, dtype=torch.float64)
    pos = torch.arange(7, dtype=torch.float64)

    def scores(wq: torch.Tensor, wk: torch.Tensor, rope) -> torch.Tensor:
        q = rope((x @ wq.T).view(7, 4, HEAD_DIM), pos)
        k = rope((x @ wk.T).view(7, 2, HEAD_DIM), pos).repeat_interleave(2, dim=1)  # GQA
        return torch.einsum("qhd,khd->hqk", q, k)

    meta = scores(wq, wk, _rope_meta)
    hf = scores(hf_permute_qk(wq, 4), hf_permute_qk(wk, 2), _rope_hf)
    torch.testing.assert_close(hf, meta)
    wrong = scores(hf_unpermute_qk(wq, 4), hf_unpermute_qk(wk, 2), _rope_hf)
    assert not torch.allclose(wrong, meta)


def test_hf_config_mapping(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, make_state_dict(), params=PARAMS)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["intermediate_size"] == HIDDEN and cfg["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == "float32"
    reader = open_checkpoint(tmp_path)
    assert reader.config == {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_hidden_dim": HIDDEN,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": 128,
        "max_seq_len": 128,
        "tie_word_embeddings": False,
    }
    # a config without num_key_value_heads means no GQA; fields at their implemented values are accepted
    (tmp_path / "config.json").write_text(
        json.dumps({"hidden_size": 64, "num_attention_heads": 4, "hidden_act": "silu", "rope_scaling": None})
    )
    assert ckpt.hf_config_to_params(json.loads((tmp_path / "config.json").read_text())) == {
        "dim": 64,
        "n_heads": 4,
        "n_kv_heads": 4,
    }


def test_hf_ffn_multiplier_rule(tmp_path: Path) -> None:
    params = {k: v for k, v in PARAMS.items() if k != "vocab_size"} | {"ffn_dim_multiplier": 1.3}
    write_hf_checkpoint(tmp_path, {"tok_embeddings.weight": torch.zeros(10, 64)}, params=params)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["intermediate_size"] == 224  # int(1.3 * 170) = 221 -> 224
    assert cfg["vocab_size"] == 10  # taken from the embedding when params has none


def test_hf_tied_embeddings_and_ignored_inv_freq(tmp_path: Path) -> None:
    emb = torch.randn(16, 8)
    safetensors.torch.save_file(
        {"model.embed_tokens.weight": emb, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)},
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "tie_word_embeddings": True}))
    reader = open_checkpoint(tmp_path)
    # no alias for the head: the config builds a model whose head is the embedding (tests/formats/test_hf_config.py)
    assert reader.keys() == {"tok_embeddings.weight"} and reader.config["tie_word_embeddings"] is True
    assert torch.equal(reader.read("tok_embeddings.weight"), emb)


def test_single_safetensors_file_with_meta_names_is_read_as_is(tmp_path: Path) -> None:
    sd = make_state_dict(torch.bfloat16)
    safetensors.torch.save_file(sd, tmp_path / "weights.safetensors")  # written by the official library
    reader = open_checkpoint(tmp_path / "weights.safetensors")
    assert reader.format == "hf" and reader.keys() == set(sd)
    for key in sd:  # Meta-named wq/wk are not unpermuted
        assert torch.equal(reader.read(key), sd[key]), key


def test_misaligned_safetensors_offsets_are_copied(tmp_path: Path) -> None:
    a = torch.tensor([1, 2, 3], dtype=torch.uint8)
    b = torch.randn(5).to(torch.bfloat16)
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "BF16", "shape": [5], "data_offsets": [3, 13]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = a.numpy().tobytes() + b.view(torch.uint8).numpy().tobytes()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    reader = open_checkpoint(tmp_path / "x.safetensors")
    assert torch.equal(reader.read("b"), b) and torch.equal(reader.read("a"), a)
    reader.release("b")  # releases file pages only, never the copy's heap memory
    assert torch.equal(reader.read("b"), b)


# ------------------------------------------------------------------------------------------------------
# Own format
# ------------------------------------------------------------------------------------------------------


def _save_own(out: Path, sd: dict[str, torch.Tensor], world_size: int, **kw) -> None:
    dims = shard_dims_of(sd)
    for rank in range(world_size):
        local = {k: chunk(v, dims[k], rank, world_size) for k, v in sd.items()}
        save_checkpoint(out, local, shard_dims=dims, rank=rank, world_size=world_size, **kw)


@pytest.mark.parametrize("saved", [1, 2, 4])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_own_round_trip_across_world_sizes(tmp_path: Path, saved: int, world_size: int) -> None:
    sd = make_state_dict(torch.bfloat16)
    sd["layers.0.attention.wq.lora_a"] = torch.randn(8, 64)  # an extra key, split on dim 0, other dtype
    _save_own(tmp_path, sd, saved, config=PARAMS, extra={"step": 7})
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


def test_own_rank_files_replicate_nothing_and_load_in_safetensors(tmp_path: Path) -> None:
    sd = make_state_dict()
    _save_own(tmp_path, sd, 2, config=PARAMS)
    r0 = safetensors.torch.load_file(tmp_path / "consolidated.00.safetensors")
    r1 = safetensors.torch.load_file(tmp_path / "consolidated.01.safetensors")
    assert "norm.weight" in r0 and "norm.weight" not in r1  # replicated keys: written once, by rank 0
    assert torch.equal(r1["layers.0.feed_forward.w2.weight"], sd["layers.0.feed_forward.w2.weight"][:, HIDDEN // 2 :])


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_own_reads_are_views(tmp_path: Path) -> None:
    sd = make_state_dict()
    _save_own(tmp_path, sd, 2)
    reader = open_checkpoint(tmp_path)
    got = reader.read("layers.1.feed_forward.w1.weight", shard_dim=0, rank=1, world_size=2)
    assert mapped_file(got.data_ptr()) == str(tmp_path / "consolidated.01.safetensors")
    got = reader.read("norm.weight")
    assert mapped_file(got.data_ptr()) == str(tmp_path / "consolidated.00.safetensors")


def test_own_save_accepts_views_and_noncontiguous(tmp_path: Path) -> None:
    base = torch.randn(8, 6)
    tensors = {"t": base.t(), "row": base[2], "also": base[3:5]}  # all share one storage
    save_checkpoint(tmp_path, tensors, shard_dims=dict.fromkeys(tensors), trainable_only=True)
    reader = open_checkpoint(tmp_path / "consolidated.00.safetensors")  # a single-rank file on its own
    assert reader.format == "lazyllama"
    for k, v in tensors.items():
        assert torch.equal(reader.read(k), v)
    assert open_checkpoint(tmp_path).info["trainable_only"] is True


def test_own_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = make_state_dict(seed=1), make_state_dict(seed=2)
    _save_own(tmp_path, old, 1, config=PARAMS)
    before = sorted(p.name for p in tmp_path.iterdir())
    real, calls = ckpt._tensor_bytes, []

    def crash_half_way(t: torch.Tensor) -> memoryview:
        calls.append(1)
        if len(calls) > len(new) // 2:
            raise OSError("disk full (simulated)")
        return real(t)

    monkeypatch.setattr(ckpt, "_tensor_bytes", crash_half_way)
    with pytest.raises(OSError, match="simulated"):
        _save_own(tmp_path, new, 1, config=PARAMS | {"dim": 999})
    assert len(calls) > 1  # it really failed mid-file
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp files left behind
    reader = open_checkpoint(tmp_path)
    assert reader.config == PARAMS
    for key in old:
        assert torch.equal(reader.read(key), old[key]), key


def test_own_save_at_smaller_world_size_removes_stale_rank_files(tmp_path: Path) -> None:
    _save_own(tmp_path, make_state_dict(seed=1), 4)
    sd = make_state_dict(seed=2)
    _save_own(tmp_path, sd, 2)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "consolidated.00.safetensors",
        "consolidated.01.safetensors",
    ]
    reader = open_checkpoint(tmp_path)
    assert torch.equal(reader.read("layers.0.attention.wo.weight"), sd["layers.0.attention.wo.weight"])


def test_own_mixed_saves_are_detected(tmp_path: Path) -> None:
    sd = make_state_dict()
    _save_own(tmp_path / "a", sd, 2)
    _save_own(tmp_path / "b", sd, 4)
    os.replace(tmp_path / "b" / "consolidated.01.safetensors", tmp_path / "a" / "consolidated.01.safetensors")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path / "a")
    assert_names_file(err, "consolidated.01.safetensors")


# ------------------------------------------------------------------------------------------------------
# release()
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["meta", "hf", "lazyllama"])
def test_release_then_read_again(tmp_path: Path, fmt: str) -> None:
    sd = make_state_dict()
    if fmt == "meta":
        write_meta_checkpoint(tmp_path, sd, params=PARAMS, num_shards=2)
    elif fmt == "hf":
        write_hf_checkpoint(tmp_path, sd, params=PARAMS)
    else:
        _save_own(tmp_path, sd, 2)
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


# ------------------------------------------------------------------------------------------------------
# Bad inputs: every one is a CheckpointError naming the file
# ------------------------------------------------------------------------------------------------------


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


def test_truncated_safetensors(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, make_state_dict(), params=PARAMS)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "model.safetensors")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 10**9) + b"{}", "beyond the file size"),
        (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    ],
)
def test_broken_safetensors_headers(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "model.safetensors")


def test_unknown_safetensors_dtype(tmp_path: Path) -> None:
    raw = json.dumps({"norm.weight": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="unknown dtype") as err:
        open_checkpoint(tmp_path / "w.safetensors")
    assert_names_file(err, "w.safetensors")
    assert_names_file(err, "norm.weight")


def test_hf_qk_without_config(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, make_state_dict(), params=PARAMS)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json") as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, str(tmp_path))


def test_hf_index_pointing_at_a_missing_file(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, make_state_dict(), params=PARAMS, max_shard_bytes=40_000)
    second = sorted(tmp_path.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(CheckpointError, match=second.name):
        open_checkpoint(tmp_path)


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


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout") as err:
        open_checkpoint(tmp_path)
    for looked_for in ("lazyllama.json", "consolidated.NN.pth", "safetensors", str(tmp_path)):
        assert looked_for in str(err.value)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="unknown checkpoint file type"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="format="):
        open_checkpoint(tmp_path, format="gguf")


def test_own_missing_rank_file(tmp_path: Path) -> None:
    _save_own(tmp_path, make_state_dict(), 2)
    (tmp_path / "consolidated.01.safetensors").unlink()
    with pytest.raises(CheckpointError, match="consolidated.01.safetensors"):
        open_checkpoint(tmp_path)


def test_own_rank_file_opened_alone(tmp_path: Path) -> None:
    _save_own(tmp_path, make_state_dict(), 2)
    with pytest.raises(CheckpointError, match="open its directory") as err:
        open_checkpoint(tmp_path / "consolidated.01.safetensors")
    assert_names_file(err, "consolidated.01.safetensors")


def test_own_rank_files_without_index(tmp_path: Path) -> None:
    _save_own(tmp_path, make_state_dict(), 2)
    (tmp_path / "lazyllama.json").unlink()
    with pytest.raises(CheckpointError, match="lazyllama.json"):
        open_checkpoint(tmp_path)


def test_closed_reader(tmp_path: Path) -> None:
    _save_own(tmp_path, make_state_dict(), 1)
    with open_checkpoint(tmp_path) as reader:
        kept = reader.read("norm.weight")
    with pytest.raises(CheckpointError, match="closed"):
        reader.read("norm.weight")
    assert torch.isfinite(kept).all()  # views handed out before close stay valid
