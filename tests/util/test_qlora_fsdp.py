"""QLoRA under FSDP2: a 4-bit base's codes sharded across data parallel (QuantLinear.make_shardable_, wrap_fsdp),
held to the unsharded model on two real gloo processes. The findings behind the design: bench/qlora_fsdp_probe.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.finetune_env import make_env
from tests.multiprocess import run_multiprocess
from util.quant import QuantLinear, quant_spec

LORA = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)


def _matmul_and_grad(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = layer(x)
    y.float().square().sum().backward()
    return y.detach(), x.grad


def test_make_shardable_keeps_the_codes_and_the_math_bit_for_bit():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(256, 96, bias=False).to(torch.bfloat16), quant_spec("4bit"))
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    y0, g0 = _matmul_and_grad(q, x)
    before, state, codes = q.packed_tensors(), q.quant_state, q.weight.data

    q.make_shardable_()
    assert type(q.weight) is nn.Parameter and q.weight.dtype == torch.uint8 and not q.weight.requires_grad
    assert q.weight.data.data_ptr() == codes.data_ptr(), "the same storage, not a copy"
    assert q.quant_state is state and q.is_quantized and q.local_shape == (96, 256)
    after = q.packed_tensors()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    y1, g1 = _matmul_and_grad(q, x)
    assert torch.equal(y1, y0) and torch.equal(g1, g0)
    torch.testing.assert_close(q.dequantized_weight(), bnb_dequantized(codes, state), rtol=0, atol=0)
    q.make_shardable_()  # idempotent
    assert q.quant_state is state

    q8 = QuantLinear.from_linear(nn.Linear(64, 32, bias=False), quant_spec("8bit"))
    with pytest.raises(ValueError, match="only 4-bit weights can be sharded.*--data_parallel ddp"):
        q8.make_shardable_()


def bnb_dequantized(codes, state):
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_4bit(codes, state)


def test_reinstalling_a_weight_after_make_shardable_uses_the_new_state():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(128, 64, bias=False), quant_spec("4bit"))
    q.make_shardable_()
    q.reset_parameters()  # quantizes a fresh init: a Params4bit again, whose own state must win
    assert q.quant_state is q.weight.quant_state
    x = torch.randn(2, 128)
    torch.testing.assert_close(q(x), x @ q.dequantized_weight().t(), rtol=1e-5, atol=1e-5)


# --- two processes ------------------------------------------------------------------------------------------------


class _Scaled(nn.Module):
    """A 4-bit 70 -> 3 linear (210 codes in 105 bytes: rows that 2 ranks do not divide) times a trainable scale."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = QuantLinear.from_linear(nn.Linear(70, 3, bias=False), quant_spec("4bit"))
        self.scale = nn.Parameter(torch.full((3,), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * self.scale


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _tiny_qlora(base):
    from tests.helpers import tiny_args
    from util.build import build_model
    from util.train import upcast_trainable_

    model, _ = build_model(tiny_args(vocab_size=384, **LORA), [base], quant="4bit", dtype=torch.bfloat16)
    upcast_trainable_(model)
    with torch.no_grad():  # B != 0: every LoRA tensor gets a gradient
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _loss_and_grads(model):
    tokens = torch.randint(3, 384, (2, 16), generator=torch.Generator().manual_seed(2))  # the same on every rank
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(env, out, data_parallel: str):
    from tests.helpers import tiny_args
    from util.build import build_model
    from util.data import InstructionDataset, load_data_config
    from util.train import TrainConfig, Trainer

    model, _ = build_model(tiny_args(vocab_size=384, **LORA), [env.base], quant="4bit", dtype=torch.float32)
    dataset = InstructionDataset(load_data_config(env.data_config), env.tokenizer, max_words=64, seed=0)
    cfg = TrainConfig(
        output_dir=out,
        batch_size=2,
        accum_iter=2,
        lr=1e-2,
        max_iters=3,
        clip_grad=1.0,
        save_interval=0,
        save_iteration_interval=3,
        data_parallel=data_parallel,
        tensorboard=False,
    )
    trainer = Trainer(model, model.args, dataset, cfg)
    return trainer.fit()


def _session(rank, env, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from util.dist import dp_group, init_distributed
    from util.train import wrap_fsdp

    init_distributed(1)
    results = {}

    ref_loss, ref_grads = _loss_and_grads(_tiny_qlora(env.base))
    model = wrap_fsdp(_tiny_qlora(env.base), dp_group(), torch.device("cpu"))
    codes = model.layers[0].feed_forward.w1.weight
    results["codes"] = (tuple(codes.shape), tuple(codes.to_local().shape), codes.dtype)
    loss, grads = _loss_and_grads(model)
    results["step"] = dict(ref_loss=ref_loss, loss=loss, ref_grads=ref_grads, grads=grads)

    mesh = DeviceMesh.from_group(dist.group.WORLD, device_type="cpu")
    x = torch.randn(4, 70, generator=torch.Generator().manual_seed(3))
    ref = _Scaled()
    y_ref, gx_ref = _matmul_and_grad(ref, x)
    padded = _Scaled()
    padded.q.make_shardable_()
    fully_shard(padded.q, mesh=mesh)
    fully_shard(padded, mesh=mesh)
    y, gx = _matmul_and_grad(padded, x)
    results["padding"] = dict(
        local_rows=padded.q.weight.to_local().shape[0],
        y=(y, y_ref),
        gx=(gx, gx_ref),
        scale_grad=(_full(padded.scale.grad), ref.scale.grad),
    )

    results["train"] = {dp: _train(env, out / dp, dp) for dp in ("ddp", "fsdp")}
    return results


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    env = make_env(tmp_path_factory.mktemp("qlora_fsdp_env"))
    out = tmp_path_factory.mktemp("qlora_fsdp_runs")
    return run_multiprocess(_session, 2, env, out), out


def test_fsdp_shards_the_4bit_codes_and_keeps_loss_and_lora_grads_bit_for_bit(session):
    results, _ = session
    for rank in results:
        (full, local, dtype) = rank["codes"]
        assert dtype == torch.uint8 and local[0] * 2 == full[0], "each rank holds half of the codes"
        step = rank["step"]
        assert torch.equal(step["loss"], step["ref_loss"])
        assert step["grads"].keys() == step["ref_grads"].keys() and len(step["grads"]) == 28  # 7 LoRA x 2 x 2 blocks
        for name, g in step["grads"].items():
            assert torch.equal(g, step["ref_grads"][name]), name


def test_fsdp_pads_codes_whose_rows_the_ranks_do_not_divide(session):
    results, _ = session
    assert [r["padding"]["local_rows"] for r in results] == [53, 52]  # 105 packed rows
    for rank in results:
        for what in ("y", "gx", "scale_grad"):
            got, expected = rank["padding"][what]
            assert torch.equal(got, expected), what


def test_qlora_training_with_fsdp_follows_ddp(session):
    results, out = session
    ddp, fsdp = results[0]["train"]["ddp"], results[0]["train"]["fsdp"]
    assert len(fsdp) == 3 and results[1]["train"]["fsdp"] == fsdp
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(ddp), rtol=1e-5, atol=1e-5)
    from util.checkpoint import open_checkpoint

    with (
        open_checkpoint(out / "fsdp" / "checkpoint-0000003") as a,
        open_checkpoint(out / "ddp" / "checkpoint-0000003") as b,
    ):
        keys = sorted(a.keys())
        assert keys == sorted(b.keys()) and keys and all(".lora." in k for k in keys), "trainable-only: LoRA tensors"
        for k in keys:
            torch.testing.assert_close(a.read(k), b.read(k), rtol=1e-4, atol=1e-6)
