"""main_finetune under --data_parallel fsdp (sharded on meta, each rank materializes its rows) against DDP on the
same data: LoRA on a frozen full-precision base (the base sharded too, only the adapters train) and QLoRA (the 4-bit
base built whole, then its codes sharded) at data parallel 2, and full fine-tuning and LoRA at data parallel 2 x
model parallel 2. The loss sequences must agree within fp32
reduction noise and the saved models within the noise of a few AdamW steps."""

from __future__ import annotations

import pytest
import torch

import main_finetune
from tests.finetune_env import make_env
from tests.multiprocess import run_multiprocess
from util.checkpoint import open_checkpoint

STEPS = 3


def _session(rank, env, out, mp: int, runs: list[tuple[str, bool, str]]):
    from fairscale.nn.model_parallel import initialize as fs_mp

    from util.dist import init_distributed, init_process_group

    init_process_group()
    init_distributed(mp)
    results = {}
    for name, lora, quant in runs:
        for dp in ("ddp", "fsdp"):
            extra = f"--quant {quant} --data_parallel {dp} --max_iters {STEPS} --lr 1e-3 --clip_grad 0.5"
            extra += f" --model_parallel_size {mp} --save_interval 0"
            res = main_finetune.main(env.argv(out / f"{name}-{dp}", *extra.split(), lora=lora))
            trainable = sorted(n for n, p in res.model.named_parameters() if p.requires_grad)
            results[f"{name}-{dp}"] = {"losses": res.losses, "final": res.final_dir, "trainable": trainable}
    fs_mp.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("fsdp_env"))


@pytest.fixture(scope="module")
def dp2(env, tmp_path_factory):
    runs = [("lora", True, "none"), ("qlora", True, "4bit")]
    return run_multiprocess(_session, 2, env, tmp_path_factory.mktemp("fsdp_dp2"), 1, runs)


@pytest.fixture(scope="module")
def dp2xmp2(env, tmp_path_factory):
    runs = [("full", False, "none"), ("lora", True, "none")]
    return run_multiprocess(_session, 4, env, tmp_path_factory.mktemp("fsdp_dp2xmp2"), 2, runs, timeout=480)


def _check_same_training(session, name):
    ddp, fsdp = session[0][f"{name}-ddp"], session[0][f"{name}-fsdp"]
    assert len(ddp["losses"]) == STEPS and ddp["losses"] != pytest.approx([ddp["losses"][0]] * STEPS)  # it trained
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-5)
    assert fsdp["trainable"] == ddp["trainable"]
    for rank in session:  # every rank logs the same losses
        assert rank[f"{name}-fsdp"]["losses"] == fsdp["losses"]
    with open_checkpoint(fsdp["final"]) as a, open_checkpoint(ddp["final"]) as b:
        assert a.keys() == b.keys() and a.keys()
        for key in a.keys():
            torch.testing.assert_close(a.read(key), b.read(key), rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp_lora_on_a_sharded_frozen_base_trains_as_ddp(dp2):
    _check_same_training(dp2, "lora")
    assert all(".lora." in n for n in dp2[0]["lora-fsdp"]["trainable"])  # only the adapters train


def test_fsdp_qlora_shards_the_4bit_base_and_trains_as_ddp(dp2):
    _check_same_training(dp2, "qlora")  # the 4-bit codes sharded as bytes, each rank its quantization state


@pytest.mark.parametrize("name", ["full", "lora"])
def test_fsdp_with_model_parallel_trains_as_ddp(dp2xmp2, name):
    _check_same_training(dp2xmp2, name)
