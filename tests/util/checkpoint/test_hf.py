"""Hugging Face's format (util/checkpoint/hf.py): names, the q/k permutation, config mapping, sharded files.

Tiny random tensors; runs in seconds on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import util.checkpoint as ckpt
from tests.util.checkpoint.helpers import (
    HEAD_DIM,
    HIDDEN,
    LINUX,
    PARAMS,
    assert_names_file,
    chunk,
    make_state_dict,
    mapped_file,
)
from util.checkpoint import CheckpointError, hf_permute_qk, hf_unpermute_qk, open_checkpoint, write_hf_checkpoint


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
