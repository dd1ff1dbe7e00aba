"""The GPU paths' logic, on CPU (issue 16): what can be decided without a device is tested here; tests/gpu/test_cuda.py
runs the same paths on a GPU (marked gpu), and scripts/gpu_check.sh runs them all on a GPU machine."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import util.dist as udist
from model.layers.parallel import init_sharded_, uniform_fill
from tests.model.test_visual import BACKBONES, _weights
from tests.multiprocess import run_multiprocess
from util.lazy_init import _move_real_tensors, meta_init
from util.quant import QuantLinear, quant_spec
from util.train import GroupGradScaler, _norm_device, _rng_state, _set_rng_state

REPO = Path(__file__).resolve().parents[2]


# --- 1. the visual backbone goes where the model goes


def test_a_backbone_built_for_real_moves_to_the_build_device(tmp_path):
    from model.llama import Transformer
    from tests.helpers import tiny_args

    weights, _ = _weights(tmp_path, "timm")
    spec, kwargs = BACKBONES["timm"]
    args = tiny_args(vocab_size=384, visual_backbone=spec, visual_kwargs=kwargs, visual_weights=str(weights))
    with meta_init(torch.float32):
        model = Transformer(args)
    backbone = {n: p.requires_grad for n, p in model.visual.backbone.named_parameters()}
    assert all(p.device.type == "cpu" for p in model.visual.backbone.parameters())  # built for real, on the CPU
    # "meta" stands in for a second device here (the GPU test moves it to CUDA): every tensor must follow
    _move_real_tensors(model, torch.device("meta"))
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {n: t.device.type for n, t in tensors.items() if t.device.type != "meta"} == {}
    assert {n: p.requires_grad for n, p in model.visual.backbone.named_parameters()} == backbone  # frozen stays


def test_a_cpu_multimodal_build_has_every_tensor_on_the_cpu(tmp_path):
    from tests.helpers import tiny_args
    from util.build import build_model

    weights, _ = _weights(tmp_path, "timm")
    spec, kwargs = BACKBONES["timm"]
    args = tiny_args(vocab_size=384, visual_backbone=spec, visual_kwargs=kwargs, visual_weights=str(weights))
    model, _ = build_model(args, None, quant="4bit", dtype=torch.float32, device="cpu")
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    assert devices == {torch.device("cpu")}


# --- 2. the demo's control messages: gloo, long timeout


def _idle_follower(rank: int, idle: float):
    import torch.distributed as dist

    # the world group's timeout stands in for NCCL's watchdog: shorter than rank 0's idle time
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    from demo import Group

    group = Group(2)
    got = []
    for message in ["hello", None]:
        if rank == 0:
            time.sleep(idle)  # a person thinks
        got.append(group.share(message if rank == 0 else None))
    return got, dist.get_backend(group._control)


def test_demo_followers_wait_for_rank_0_longer_than_the_world_timeout():
    results = run_multiprocess(_idle_follower, 2, 4.0)
    assert results == [(["hello", None], "gloo")] * 2


class _Reply:
    def __init__(self, fail: bool, log: list):
        self.fail, self.log = fail, log

    def close(self):
        self.log.append("close")
        if self.fail:
            raise ValueError("prompt too long")


class _Chat:
    turns: list = []

    def __init__(self, log):
        self.log = log

    def send(self, message, params, images=None):
        return _Reply(message == "too long", self.log)


class _Group:
    def __init__(self, requests):
        self.requests = list(requests)

    def share(self, obj):
        return self.requests.pop(0)


def test_a_follower_survives_a_request_refused_while_generating():
    """decode refuses some requests only when the reply is consumed (reply.close() on a follower): the follower must
    go back to waiting, as rank 0 does, or rank 0 waits for it forever."""
    from demo import run_follower

    log: list = []
    group = _Group([([], "too long", None), ([], "fine", None), None])
    assert run_follower(_Chat(log), group) == 0
    assert log == ["close", "close"] and group.requests == []


# --- 3. the backend: an override the test workers set; gloo computes on the CPU


def test_backend_override_and_the_device_it_implies(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.delenv(udist.BACKEND_ENV, raising=False)
    assert udist.default_backend() == "nccl"
    monkeypatch.setenv(udist.BACKEND_ENV, "gloo")
    assert udist.default_backend() == "gloo" and udist.local_device() == torch.device("cpu")
    monkeypatch.setenv(udist.BACKEND_ENV, "mpi")
    with pytest.raises(ValueError, match="LAZYLLAMA_DIST_BACKEND='mpi'"):
        udist.default_backend()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(udist.BACKEND_ENV, "nccl")
    with pytest.raises(ValueError, match="CUDA is not available"):
        udist.default_backend()


def _as_on_a_gpu_machine(rank: int):
    """A test worker where CUDA is available: gloo and the CPU, never set_device; then an fp16 step (item 6)."""
    import torch.distributed as dist

    torch.cuda.is_available = lambda: True  # what the workers see on a GPU machine
    torch.cuda.set_device = lambda i: (_ for _ in ()).throw(AssertionError(f"set_device({i}) on a gloo worker"))
    from util.dist import init_distributed, local_device

    init_distributed(2)  # model parallel 2: each rank holds a different shard, so different gradients
    return dist.get_backend(), str(local_device()), _scaler_step(rank)


@pytest.fixture(scope="module")
def gpu_machine_workers():
    return run_multiprocess(_as_on_a_gpu_machine, 2)


def test_test_workers_use_gloo_and_the_cpu_on_a_gpu_machine(gpu_machine_workers):
    assert [r[:2] for r in gpu_machine_workers] == [("gloo", "cpu")] * 2


# --- 4. this rank's GPU from the visible devices


def test_gpu_index_comes_from_the_visible_devices(monkeypatch):
    assert udist.gpu_index(local_rank=3, visible=1) == 0  # SLURM binding one GPU per task
    assert udist.gpu_index(local_rank=3, visible=8) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=5 but only 4 GPUs .*CUDA_VISIBLE_DEVICES=0,1,2,3"):
        udist.gpu_index(local_rank=5, visible=4)
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        udist.gpu_index(local_rank=0, visible=0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert udist.gpu_index() == 0


# --- 5. the launch scripts' GPU count


def _gpu_count(tmp_path: Path, smi: str | None = None, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "grep", "dirname"):
        target = bin_dir / tool
        if not target.exists():
            target.symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    if smi is not None:  # a stand-in nvidia-smi: prints `smi` for --query-gpu (and MIG lines for -L)
        (bin_dir / "nvidia-smi").write_text(smi)
        (bin_dir / "nvidia-smi").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("NGPUS", "CUDA_VISIBLE_DEVICES")}
    script = f'USAGE=test; source {REPO}/scripts/common.sh; n="$(gpu_count)"; echo "n=$n"'
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env={**base, "PATH": str(bin_dir), **env}
    )


SMI_2_GPUS_WITH_MIG = """#!/bin/bash
if [[ "$1" == "-L" ]]; then
  printf 'GPU 0: A100 (UUID: x)\\n  MIG 3g.20gb Device 0: (UUID: y)\\nGPU 1: A100 (UUID: z)\\n'
else
  printf '0\\n1\\n'
fi
"""


@pytest.mark.parametrize(
    ("env", "smi", "expected"),
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, SMI_2_GPUS_WITH_MIG, "n=3"),  # the visible list, not the machine
        ({"CUDA_VISIBLE_DEVICES": "2,-1,3"}, None, "n=1"),  # CUDA stops at -1
        ({}, SMI_2_GPUS_WITH_MIG, "n=2"),  # GPUs, not MIG lines
        ({"NGPUS": "4", "CUDA_VISIBLE_DEVICES": "0"}, None, "n=4"),  # the user's choice wins
        ({}, None, "n=1"),  # no nvidia-smi: a CPU machine, one process
    ],
    ids=["visible-list", "visible-list-cut-at-minus-1", "smi-gpus-not-mig", "NGPUS-wins", "no-smi"],
)
def test_gpu_count(tmp_path, env, smi, expected):
    proc = _gpu_count(tmp_path, smi, **env)
    assert proc.returncode == 0 and proc.stdout.strip() == expected, proc.stderr


@pytest.mark.parametrize(
    ("env", "smi", "message"),
    [
        ({"CUDA_VISIBLE_DEVICES": ""}, None, "hides every GPU"),
        ({}, "#!/bin/bash\nexit 9\n", "nvidia-smi failed"),
        ({}, "#!/bin/bash\nexit 0\n", "nvidia-smi lists no GPU"),
        ({"NGPUS": "two"}, None, "NGPUS must be a positive integer"),
    ],
    ids=["empty-visible-list", "smi-fails", "smi-lists-nothing", "bad-NGPUS"],
)
def test_no_gpu_is_an_error_never_a_silent_zero(tmp_path, env, smi, message):
    proc = _gpu_count(tmp_path, smi, **env)
    assert proc.returncode == 2 and message in proc.stderr and "n=" not in proc.stdout, (proc.stdout, proc.stderr)


def test_finetune_sh_stops_when_no_gpu_is_visible(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "c.json").write_text("{}")
    (tmp_path / "t.model").write_bytes(b"")
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "finetune.sh"),
            str(tmp_path / "ckpt"),
            str(tmp_path / "c.json"),
            str(tmp_path / "t.model"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": "/bin/echo"},
    )
    assert proc.returncode == 2 and "hides every GPU" in proc.stderr and proc.stdout == ""


def test_slurm_tasks_get_the_cpus_per_task(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "c.json").write_text("{}")
    (tmp_path / "t.model").write_bytes(b"")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\necho srun "$@"\n')
    (fake / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "PYTHON": "/bin/echo"}
    argv = [
        "bash",
        str(REPO / "scripts" / "finetune_slurm.sh"),
        str(tmp_path / "ckpt"),
        str(tmp_path / "c.json"),
        str(tmp_path / "t.model"),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**env, "SLURM_CPUS_PER_TASK": "8"})
    assert proc.returncode == 0 and proc.stdout.startswith("srun --kill-on-bad-exit=1 --cpus-per-task 8 /bin/echo")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("srun --kill-on-bad-exit=1 /bin/echo"), proc.stderr


# --- 6. fp16 loss scaling: every rank skips the same steps


def _scaler_step(rank: int):
    layer = nn.Linear(4, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = GroupGradScaler("cpu", init_scale=1024.0)
    loss = layer(torch.ones(1, 4)).sum()
    scaler.scale(loss).backward()
    if rank == 1:
        layer.weight.grad[0, 0] = float("inf")  # this shard overflowed, the other did not
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    skipped = all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    return skipped, scaler.get_scale()


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(gpu_machine_workers):
    """Model parallel: rank 1's shard overflows alone; both ranks skip the step and halve the scale (the workers of
    the fixture above run it)."""
    assert [r[2] for r in gpu_machine_workers] == [(True, 512.0)] * 2


# --- 7. CUDA RNG: this rank's device only


class _FakeCuda:
    """Records the CUDA RNG calls (this machine has no GPU)."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d="cuda": self._get(d))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d="cuda": self.calls.append(("set", str(d), s)))
        for name in ("get_rng_state_all", "set_rng_state_all"):  # touching every device is the bug
            monkeypatch.setattr(torch.cuda, name, lambda *a, n=name: (_ for _ in ()).throw(AssertionError(n)))

    def _get(self, device):
        self.calls.append(("get", str(device)))
        return torch.tensor([7], dtype=torch.uint8)


def test_rng_state_is_saved_and_restored_for_this_ranks_device_only(monkeypatch, tmp_path):
    fake = _FakeCuda(monkeypatch)
    state = _rng_state(torch.device("cuda", 1))
    assert fake.calls == [("get", "cuda:1")]
    torch.save(state, tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    _set_rng_state(state, torch.device("cuda", 0))  # resumed with fewer GPUs visible: rank's own device
    assert fake.calls[1][:2] == ("set", "cuda:0") and fake.calls[1][2].tolist() == [7]
    assert _rng_state("cpu")["cuda"] is None and len(fake.calls) == 2  # a CPU run saves no CUDA state


def test_an_older_all_devices_rng_state_restores_this_ranks_entry(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    old = {**_rng_state("cpu"), "cuda": [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]}
    _set_rng_state(old, torch.device("cuda", 1))
    assert fake.calls[-1][:2] == ("set", "cuda:1") and fake.calls[-1][2].tolist() == [2]
    n = len(fake.calls)
    _set_rng_state(old, torch.device("cuda", 5))  # that device's state was never saved: left as it is
    assert len(fake.calls) == n


# --- 8. clipping's device, 8-bit scales, init draws


def test_grad_norm_sums_live_on_the_parameters_device_when_no_gradient_exists():
    meta = nn.Parameter(torch.empty(3, device="meta"))
    assert _norm_device([(meta, None)], None) == torch.device("meta")  # not the CPU: nccl cannot reduce that
    assert _norm_device([(meta, None)], torch.device("cpu")) == torch.device("cpu")  # the trainer's device wins
    cpu = nn.Parameter(torch.ones(3))
    cpu.grad = torch.ones(3)
    assert _norm_device([(meta, None), (cpu, None)], None) == torch.device("cpu")


def test_8bit_scales_follow_the_weight_and_stay_fp32():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 32, bias=False), quant_spec("8bit"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = q(x)
    q._apply(lambda t: t.clone())  # what model.to(other device) does: new storage for every tensor
    assert q.state.CB.data_ptr() == q.weight.data_ptr()  # the matmul reads the weight model.to() moved
    q.to(torch.bfloat16)  # a dtype cast leaves the packed codes and the fp32 row scales alone
    assert q.weight.dtype == torch.int8 and q.state.SCB.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(q(x), y)


def test_init_draws_come_from_the_cpu_generator_whatever_the_device():
    seen = []
    fill = uniform_fill(0.1)
    local = torch.empty(4, 8, device="meta")  # stands in for a GPU tensor
    init_sharded_(
        local,
        lambda t, g: (seen.append((t.device.type, g.device.type)), fill(t, g)),
        shard_dim=None,
        rank=0,
        world_size=1,
        base_seed=3,
    )
    assert seen and set(seen) == {("cpu", "cpu")}
    cpu = init_sharded_(torch.empty(4, 8), fill, shard_dim=None, rank=0, world_size=1, base_seed=3)
    again = init_sharded_(
        torch.empty(4, 8, dtype=torch.float64), fill, shard_dim=None, rank=0, world_size=1, base_seed=3
    )
    assert torch.equal(cpu.double(), again)


# --- the GPU check script


def _multiprocess_tests_listed() -> list[str]:
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    block = re.search(r"MULTIPROCESS_TESTS=\((.*?)\)", text, re.S).group(1)
    return block.split()


def test_gpu_check_lists_every_multiprocess_test():
    """scripts/gpu_check.sh runs the CPU suite's multiprocess tests on a GPU machine: a new one must be listed."""
    listed = _multiprocess_tests_listed()
    for entry in listed:
        path, _, name = entry.partition("::")
        assert (REPO / path).is_file(), entry
        assert not name or re.search(rf"def {re.escape(name)}\(", (REPO / path).read_text()), entry
    files = {e.partition("::")[0] for e in listed}
    # not the CPU suite's: test_scripts only echoes a torchrun command; test_cuda is gpu-marked (the script's step 1)
    elsewhere = {"tests/test_scripts.py", "tests/gpu/test_cuda.py"}
    using = {
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("test_*.py")
        if re.search(r"run_multiprocess\(|torch\.distributed\.run", p.read_text())
    }
    assert using - elsewhere <= files, sorted(using - elsewhere - files)


def test_gpu_check_without_a_gpu_says_so_and_runs_nothing_heavy():
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "pytest -q -m gpu" in proc.stdout and "test_model_parallel_2_under_torchrun" in proc.stdout
    assert re.search(r"build_memory\.py --shape 7B .*--device cuda", proc.stdout)
