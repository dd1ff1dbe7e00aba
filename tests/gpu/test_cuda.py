"""On a GPU (issue 16): every CUDA path the CPU suite cannot reach, one test or more per item of the issue, and what
scripts/gpu_check.sh reports (QLoRA steps, fp16 + GradScaler, resume, multimodal, greedy decoding equal to the CPU's).
Skipped without CUDA; tests/gpu/test_device_paths.py holds the CPU halves."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_finetune
from tests.finetune_env import make_env
from tests.helpers import params_of, random_state_dict, tiny_args
from tests.model.test_visual import BACKBONES, _weights
from tests.multiprocess import run_multiprocess
from util.build import build_model
from util.checkpoint import write_meta_checkpoint
from util.generate import SamplingParams, generate

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 means fp32 here (TF32 convolutions would make CPU and GPU differ in the 4th digit)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_ckpt")
    args = tiny_args(dim=256, n_heads=8, n_kv_heads=4, n_layers=3)
    write_meta_checkpoint(d, random_state_dict(args, seed=0), params=params_of(args))
    return d, args


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("cuda_env"))


@pytest.mark.parametrize("quant", ["4bit", "8bit", None])
def test_build_on_cuda(ckpt, quant):
    path, args = ckpt
    model, report = build_model(args, [path], quant=quant, dtype=torch.bfloat16, device="cuda")
    assert all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))
    sd = random_state_dict(args, seed=0)
    largest = max(v.numel() for v in sd.values()) * 4  # one fp32 tensor in flight (+ quantizer temporaries)
    assert report.peak_device_memory <= report.model_bytes + 4 * largest, report.summary()
    tokens = torch.randint(0, args.vocab_size, (2, 8), device="cuda")
    cpu_model, _ = build_model(args, [path], quant=quant, dtype=torch.bfloat16)
    with torch.no_grad():
        gpu_logits, cpu_logits = model(tokens), cpu_model(tokens.cpu())
    # different kernels, same weights: agree to bf16 precision
    assert (gpu_logits.cpu() - cpu_logits).abs().max() < 0.05 * cpu_logits.abs().max()


# --- 1. multimodal on CUDA: the backbone goes with the model


def test_multimodal_build_and_generate_with_an_image_on_cuda(env, tmp_path):
    weights, _ = _weights(tmp_path, "timm")
    spec, kwargs = BACKBONES["timm"]
    args = tiny_args(vocab_size=384, visual_backbone=spec, visual_kwargs=kwargs, visual_weights=str(weights))
    gpu, _ = build_model(args, [env.base], dtype=torch.float32, device="cuda")
    off = {n: str(t.device) for n, t in [*gpu.named_parameters(), *gpu.named_buffers()] if t.device.type != "cuda"}
    assert off == {}
    cpu, _ = build_model(args, [env.base], dtype=torch.float32)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(max_new_tokens=12, temperature=0)
    on_gpu = generate(gpu.eval(), [[1, 17, 42, 99]], params, images=image)[0]
    assert on_gpu == generate(cpu.eval(), [[1, 17, 42, 99]], params, images=image)[0]
    q, _ = build_model(args.replace(lora_rank=4, lora_alpha=8.0), [env.base], quant="4bit", device="cuda")
    loss = q(torch.tensor([[1, 5, 9]], device="cuda"), images=image.cuda()).float().logsumexp(-1).mean()
    loss.backward()  # a training step through the image path on one device
    assert q.visual.proj.fc1.weight.grad is not None


# --- 2. the demo's followers idle over gloo, not NCCL


def _nccl_idle_follower(rank: int, idle: float):
    import torch.distributed as dist

    os.environ["LAZYLLAMA_DIST_BACKEND"] = "nccl"
    from util.dist import gpu_index

    torch.cuda.set_device(gpu_index())
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=5))  # NCCL's watchdog, shortened
    from demo import Group

    group = Group(2)
    got = []
    for message in ["hello", None]:
        if rank == 0:
            time.sleep(idle)
        got.append(group.share(message if rank == 0 else None))
    return got


def test_idle_followers_survive_the_nccl_timeout():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (NCCL refuses two ranks on one GPU); test_device_paths covers the logic on gloo")
    assert run_multiprocess(_nccl_idle_follower, 2, 12.0) == [["hello", None]] * 2


def test_control_group_is_gloo_beside_an_nccl_world(monkeypatch):
    import torch.distributed as dist

    from util.dist import control_group, init_process_group

    monkeypatch.delenv("LAZYLLAMA_DIST_BACKEND", raising=False)
    init_process_group()
    assert dist.get_backend() == "nccl" and dist.get_backend(control_group()) == "gloo"


# --- 3. the CPU suite's workers on a GPU machine


def _worker_on_gpu_machine(rank: int, path: str):
    import torch.distributed as dist

    from util.dist import init_distributed, local_device

    init_distributed(2)
    model, _ = build_model(None, [path], dtype=torch.float32, device=local_device())
    logits = model(torch.tensor([[1, 2, 3]]))
    return dist.get_backend(), str(local_device()), logits.shape[-1]


def test_multiprocess_workers_compute_on_cpu_over_gloo_where_cuda_is_available(ckpt):
    path, args = ckpt
    assert run_multiprocess(_worker_on_gpu_machine, 2, str(path)) == [("gloo", "cpu", args.vocab_size)] * 2


# --- 4. the GPU index from the visible devices


def test_local_rank_beyond_the_visible_gpus_takes_the_one_bound_to_the_task():
    code = (
        "import torch; from util.dist import init_distributed, local_device; init_distributed(); "
        "print(local_device(), torch.cuda.current_device())"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", PYTHONPATH=str(REPO))
    env.pop("LAZYLLAMA_DIST_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["cuda:0", "0"], proc.stderr[-2000:]


# --- 5. the launch scripts' GPU count on a real nvidia-smi


def test_gpu_count_matches_torch():
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi on this machine")
    script = f"USAGE=test; source {REPO}/scripts/common.sh; gpu_count"
    base = {k: v for k, v in os.environ.items() if k not in ("NGPUS", "CUDA_VISIBLE_DEVICES")}
    n = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=base).stdout.strip()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        assert n == str(torch.cuda.device_count())
    one = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env={**base, "CUDA_VISIBLE_DEVICES": "0"}
    )
    assert one.stdout.strip() == "1"


# --- 6, 7: QLoRA steps with and without activation checkpointing, fp16 + GradScaler, resume on CUDA


def _argv_with(env, out, precision, *extra):
    argv = env.argv(out, "--quant", "4bit", "--accum_iter", "2", *extra)
    argv[argv.index("--precision") + 1] = precision
    return argv


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_qlora_steps_with_and_without_activation_checkpointing(env, tmp_path, precision):
    plain = main_finetune.main(_argv_with(env, tmp_path / "a", precision, "--max_iters", "3")).losses
    ckpt = main_finetune.main(_argv_with(env, tmp_path / "b", precision, "--max_iters", "3", "--checkpointing")).losses
    assert all(torch.isfinite(torch.tensor(plain))) and len(plain) == 3
    # recomputation replays the same dropout masks (the RNG state is kept): the same losses, up to kernel order
    assert torch.allclose(torch.tensor(ckpt), torch.tensor(plain), rtol=2e-3), (plain, ckpt)


def test_fp16_trainer_uses_the_group_scaler(env, tmp_path, monkeypatch):
    from util import train

    made = []
    original = train.GroupGradScaler.unscale_
    monkeypatch.setattr(train.GroupGradScaler, "unscale_", lambda self, opt: (made.append(1), original(self, opt)))
    losses = main_finetune.main(_argv_with(env, tmp_path / "o", "fp16", "--max_iters", "2")).losses
    assert len(made) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_resume_on_cuda_continues_exactly(env, tmp_path):
    """fp16 + GradScaler and LoRA dropout: the resumed run needs the scaler state and this GPU's RNG state."""
    first = tmp_path / "first"
    straight = main_finetune.main(
        _argv_with(env, first, "fp16", "--max_iters", "4", "--save_iteration_interval", "2")
    ).losses
    rng = torch.load(first / "checkpoint-0000002" / "rng.rank00000.pt", weights_only=True)
    assert isinstance(rng["cuda"], torch.Tensor)  # this device's state only, not a list over all GPUs
    resumed = main_finetune.main(
        _argv_with(env, tmp_path / "second", "fp16", "--max_iters", "4", "--resume", str(first / "checkpoint-0000002"))
    ).losses
    assert len(resumed) == 4 and torch.allclose(torch.tensor(resumed), torch.tensor(straight), rtol=1e-5), (
        straight,
        resumed,
    )


def test_rng_state_round_trip_on_this_device():
    from util.train import _rng_state, _set_rng_state

    device = torch.device("cuda", torch.cuda.current_device())
    state = _rng_state(device)
    a = torch.rand(4, device=device)
    _set_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), a)


# --- 8. clipping's device, 8-bit to("cuda"), init equal to the CPU's, greedy equal to the CPU's


def test_grad_norm_without_gradients_stays_on_the_gpu():
    from util.train import _norm_device, clip_grad_norm_

    p = torch.nn.Parameter(torch.ones(3, device="cuda"))
    assert _norm_device([(p, None)], None).type == "cuda"
    assert clip_grad_norm_([(p, None)], 1.0) == 0.0


def test_an_8bit_model_moved_to_cuda_computes_like_one_built_there(ckpt):
    path, args = ckpt
    moved, _ = build_model(args, [path], quant="8bit", dtype=torch.float16)
    moved.to("cuda")
    built, _ = build_model(args, [path], quant="8bit", dtype=torch.float16, device="cuda")
    tokens = torch.randint(0, args.vocab_size, (2, 8), device="cuda")
    with torch.no_grad():
        a, b = moved.eval()(tokens), built.eval()(tokens)
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_random_init_on_cuda_equals_the_cpu_init():
    args = tiny_args(lora_rank=4, lora_alpha=8.0, adapter_len=2, adapter_layers=1)
    cpu, _ = build_model(args, None, dtype=torch.float32, seed=5)
    gpu, _ = build_model(args, None, dtype=torch.float32, seed=5, device="cuda")
    differ = [
        n for (n, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()) if not torch.equal(a, b.cpu())
    ]
    assert differ == []


def test_greedy_decoding_on_cuda_gives_the_cpu_tokens(ckpt):
    path, args = ckpt
    cpu, _ = build_model(args, [path], dtype=torch.float32)
    gpu, _ = build_model(args, [path], dtype=torch.float32, device="cuda")
    prompts = [[1, 5, 9, 200], [1, 7]]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    assert generate(gpu.eval(), prompts, params) == generate(cpu.eval(), prompts, params)
