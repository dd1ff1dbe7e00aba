"""FSDP on the lazy path: the model is sharded by FSDP2 while still on meta, and each rank materializes only its
rows of every parameter - read from the checkpoint rows it owns, or initialized whole by its module's
reset_parameters (same seed) and cut to its rows. Checked against the unsharded build in the same process (real
gloo groups: data parallel 2 and 4, data parallel 2 x model parallel 2), on every path the rows can be read by
(safetensors by pread, Meta's .pth through the mapping, Hugging Face's permuted q/k, nothing: init only), with
uneven shards (a vocabulary of 306 rows: 77 + 77 + 77 + 75 at data parallel 4; 153 per model-parallel rank, 77 + 76
at dp 2 x mp 2)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import params_of, random_state_dict, tiny_args
from tests.multiprocess import run_multiprocess
from util.checkpoint import save_checkpoint, write_hf_checkpoint, write_meta_checkpoint

# LoRA and adapter tensors are in no checkpoint, so they come from reset_parameters whatever the checkpoint.
ARGS = dict(vocab_size=306, lora_rank=4, lora_targets=["wq", "wv", "w2"], adapter_len=3, adapter_layers=1)
PROBE = torch.randint(0, 306, (2, 7), generator=torch.Generator().manual_seed(1))


def _codes_and_state(model) -> dict:
    """Every 4-bit layer's packed codes (gathered where sharded) and quantization state, as plain tensors."""
    from util.quant import QuantLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            codes = m.weight.full_tensor() if hasattr(m.weight, "full_tensor") else m.weight.data
            qs = m.quant_state
            out[name] = [codes.reshape(-1), qs.absmax, qs.state2.absmax, qs.offset.reshape(1)]
    return out


def _worker(rank, ckpts: dict, args_dict: dict, mp: int, quant: str | None = None):
    from torch.distributed.tensor import DTensor

    from model.args import ModelArgs
    from util.build import build_model
    from util.dist import dp_group, init_distributed, init_process_group, position
    from util.train import wrap_fsdp

    init_process_group()
    init_distributed(mp)
    args = ModelArgs(**args_dict)
    out = {"position": position()}
    for name, paths in ckpts.items():
        ref, ref_report = build_model(args, paths, quant=quant, dtype=torch.float32, seed=7)
        model, report = build_model(
            args,
            paths,
            quant=quant,
            dtype=torch.float32,
            seed=7,
            shard=lambda m: wrap_fsdp(m, dp_group(), torch.device("cpu")),
        )
        expected = dict(ref.named_parameters())
        params = list(model.named_parameters())
        differ = [  # gathering is a collective: every rank, every parameter, in order
            n for n, p in params if not torch.equal(p.full_tensor().reshape(-1), expected[n].data.reshape(-1))
        ]
        if quant:  # codes and the whole quantization state as the unsharded quantized build's
            ours, theirs = _codes_and_state(model), _codes_and_state(ref)
            differ += [n for n in theirs if not all(torch.equal(a, b) for a, b in zip(ours[n], theirs[n]))]
        buffers = dict(ref.named_buffers())
        differ += [n for n, b in model.named_buffers() if not torch.equal(b, buffers[n])]
        with torch.no_grad():
            logits, ref_logits = model(PROBE), ref(PROBE)
        out[name] = dict(
            sharded=all(isinstance(p, DTensor) for _, p in params),
            names_equal=[n for n, _ in params] == list(expected),
            trainable_equal=[n for n, p in params if p.requires_grad]
            == [n for n, p in ref.named_parameters() if p.requires_grad],
            differ=differ,
            logits_max_diff=(logits - ref_logits).abs().max().item(),
            local_param_bytes=sum(p.to_local().numel() * p.element_size() for _, p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in ref.parameters()),
            report=(report.loaded, report.initialized, ref_report.loaded, ref_report.initialized),
        )
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_ckpts")
    base = tiny_args(vocab_size=ARGS["vocab_size"])
    sd = random_state_dict(base, seed=4)
    write_meta_checkpoint(root / "meta", sd, params=params_of(base))
    save_checkpoint(root / "lazy", sd, shard_dims={k: None for k in sd}, config=base.to_dict())
    # Hugging Face's layout, in two files: q/k rows come back through the rotary permutation, not straight bytes
    write_hf_checkpoint(root / "hf", sd, params=params_of(base), max_shard_bytes=200_000)
    return {"meta": [str(root / "meta")], "safetensors": [str(root / "lazy")], "hf": [str(root / "hf")], "init": []}


@pytest.mark.parametrize("world_size,mp", [(2, 1), (4, 1), (4, 2)], ids=["dp2", "dp4", "dp2xmp2"])
def test_fsdp_lazy_build_equals_the_unsharded_build(ckpts, world_size, mp):
    results = run_multiprocess(_worker, world_size, ckpts, tiny_args(**ARGS).to_dict(), mp)
    dp = world_size // mp
    for name in ckpts:
        for r in results:
            got = r[name]
            assert got["sharded"] and got["names_equal"] and got["trainable_equal"], (name, r["position"])
            assert got["differ"] == [], (name, r["position"], got["differ"][:5])
            assert got["logits_max_diff"] < 1e-5, (name, got["logits_max_diff"])
            loaded, initialized, ref_loaded, ref_initialized = got["report"]
            assert (loaded, initialized) == (ref_loaded, ref_initialized), name
        # each rank holds its rows only: over a model-parallel rank's data-parallel group, the shards add up to
        # the model-parallel slice exactly (nothing held twice, nothing missing)
        for mp_rank in range(mp):
            group = [r[name] for r in results if r["position"].model_parallel_rank == mp_rank]
            assert len(group) == dp
            assert sum(g["local_param_bytes"] for g in group) == group[0]["param_bytes"]
            assert max(g["local_param_bytes"] for g in group) < group[0]["param_bytes"] / dp * 1.1


def test_fsdp_lazy_4bit_build_equals_the_unsharded_quantized_build(ckpts):
    """QLoRA under FSDP on meta: each rank quantizes the whole weight as the unsharded build does and keeps its rows
    of the codes, with the whole quantization state (double-quantized absmax spans the weight)."""
    results = run_multiprocess(_worker, 2, ckpts, tiny_args(**ARGS).to_dict(), 1, "4bit")
    for name in ckpts:
        for r in results:
            got = r[name]
            assert got["sharded"] and got["names_equal"] and got["trainable_equal"], name
            assert got["differ"] == [], (name, r["position"], got["differ"][:5])
            assert got["logits_max_diff"] < 1e-5, (name, got["logits_max_diff"])
            assert got["report"][:2] == got["report"][2:], name
        assert sum(r[name]["local_param_bytes"] for r in results) == results[0][name]["param_bytes"]
