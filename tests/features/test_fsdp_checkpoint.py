"""FSDP training checkpoints on real gloo process groups: the model written one gathered parameter at a time, the
optimizer state as DCP shards (every rank its own), resume at another data-parallel size, a save killed midway.

Every run is main_finetune (full fine-tuning, `--data_parallel fsdp`, fp32 on CPU) on 16 examples whose responses
are all cut at max_words, so each has the same number of labelled targets: a step's loss is then the same whatever
ranks its examples are dealt to (each rank divides by its own labelled tokens), and a run resumed at another
data-parallel size must give the uninterrupted run's losses and weights within fp32 reduction noise.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import weakref

import pytest
import torch

from tests.finetune_env import REPO, make_env, wait_until_paused
from tests.helpers import tiny_args
from tests.multiprocess import _free_port, run_multiprocess
from util.checkpoint import open_checkpoint
from util.data import ResumableDistributedSampler
from util.train import OPTIMIZER_DIR, SAVE_PAUSE_ENV, TRAIN_STATE, _sampler_state_at

STEPS = 6  # 16 examples, 4 per optimizer step: 4 steps an epoch, so the runs cross into a second epoch
GLOBAL_BATCH = 4
# (data-parallel size, batch_size, accum_iter): the same global batch of 4 at every size
LAYOUTS = {1: (2, 2), 2: (2, 1), 4: (1, 1)}


# --- the data position at another data-parallel size (no processes) ----------------------------------------------


def _consumed(num_samples: int, world_size: int, per_rank: int, epoch: int = 0) -> list[int]:
    """The examples every rank of `world_size` took in the first `per_rank` of its samples."""
    seen = []
    for rank in range(world_size):
        s = ResumableDistributedSampler(num_samples, rank=rank, world_size=world_size, seed=3)
        seen += s.indices(epoch)[:per_rank]
    return sorted(seen)


@pytest.mark.parametrize("num_samples", [16, 18])  # 18: padded by wrapping at sizes that do not divide it
@pytest.mark.parametrize("saved_size, size", [(2, 4), (2, 1), (4, 2), (1, 4)])
def test_a_resumed_position_continues_at_the_same_global_example(num_samples, saved_size, size):
    for steps in range(num_samples // GLOBAL_BATCH + 1):
        saved = ResumableDistributedSampler(num_samples, rank=0, world_size=saved_size, seed=3)
        saved.set_epoch(1, steps * GLOBAL_BATCH // saved_size)
        state = _sampler_state_at(saved.state_dict(), size, REPO)
        assert state["world_size"] == size and state["epoch"] == 1
        # the examples consumed before the save, and those each later step takes, are the same at both sizes
        before = _consumed(num_samples, saved_size, saved.position, epoch=1)
        assert _consumed(num_samples, size, state["position"], epoch=1) == before
        for later in range(steps + 1, num_samples // GLOBAL_BATCH + 1):
            n_saved, n_now = later * GLOBAL_BATCH // saved_size, later * GLOBAL_BATCH // size
            assert _consumed(num_samples, size, n_now, epoch=1) == _consumed(num_samples, saved_size, n_saved, epoch=1)


def test_a_position_the_new_size_cannot_share_is_refused():
    saved = ResumableDistributedSampler(16, rank=0, world_size=2, seed=3)
    saved.set_epoch(0, 3)  # 6 examples consumed: not a multiple of 4
    with pytest.raises(ValueError, match="6 examples of epoch 0 were consumed, which 4 data-parallel ranks cannot"):
        _sampler_state_at(saved.state_dict(), 4, REPO)


def test_ddp_checkpoints_resume_at_their_own_layout_and_mode_only(env, tmp_path):
    """DDP keeps its rule (the same data-parallel size), and a checkpoint resumes under the --data_parallel it was
    written with (their optimizer files differ). One process, a LoRA on the tiny base."""
    from util.build import build_model
    from util.data import InstructionDataset, load_data_config
    from util.train import TrainConfig, Trainer

    def trainer():
        args = tiny_args(vocab_size=384, lora_rank=4, lora_alpha=8.0)
        model = build_model(args, [env.base], dtype=torch.float32)[0]
        data = InstructionDataset(load_data_config(env.data_config), env.tokenizer, max_words=64, seed=0)
        cfg = TrainConfig(output_dir=tmp_path, batch_size=4, max_iters=2, save_iteration_interval=1, tensorboard=False)
        return Trainer(model, args, data, cfg)

    trainer().fit()
    ckpt = tmp_path / "checkpoint-0000001"
    state = torch.load(ckpt / TRAIN_STATE, weights_only=True)
    assert (state["data_parallel"], state["data_parallel_size"]) == ("ddp", 1)
    for change, message in [
        ({"data_parallel_size": 2}, "saved with data parallel 2 x model parallel 1; this run has 1 x 1"),
        ({"data_parallel": "fsdp"}, "saved with --data_parallel fsdp and this run has ddp"),
    ]:
        torch.save({**state, **change}, ckpt / TRAIN_STATE)
        with pytest.raises(ValueError, match=message):
            trainer().resume(ckpt)
    torch.save(state, ckpt / TRAIN_STATE)
    resumed = trainer()
    resumed.resume(ckpt)
    assert resumed.iteration == 1


# --- the runs ---------------------------------------------------------------------------------------------------


class _Probe:
    """Installed in a worker: the examples of each optimizer step, and for each model save the bytes of gathered
    (full) tensors alive at once, the count of gathers and the sizes of the model's parameters."""

    def __init__(self) -> None:
        from torch.distributed.tensor import DTensor

        from util.train import Trainer

        self.steps: list[list[tuple[int, ...]]] = []
        self.saves: list[dict[str, int]] = []
        self.live = self.peak = self.gathers = 0
        gather, step, write_model = DTensor.full_tensor, Trainer.train_step, Trainer._write_model

        def full_tensor(t, *args, **kwargs):
            out = gather(t, *args, **kwargs)
            nbytes = out.numel() * out.element_size()
            self.live += nbytes
            self.peak, self.gathers = max(self.peak, self.live), self.gathers + 1
            weakref.finalize(out, self._freed, nbytes)
            return out

        def train_step(trainer, micro_batches):
            self.steps.append([tuple(row.tolist()) for batch in micro_batches for row in batch[0]])
            return step(trainer, micro_batches)

        def _write_model(trainer, out):
            self.live = self.peak = self.gathers = 0
            write_model(trainer, out)
            sizes = [p.numel() * p.element_size() for p in trainer.module.parameters()]
            save = dict(peak=self.peak, gathers=self.gathers, params=len(sizes), largest=max(sizes), total=sum(sizes))
            self.saves.append(save)

        DTensor.full_tensor, Trainer.train_step, Trainer._write_model = full_tensor, train_step, _write_model

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


def _train(rank, argv, refused_argv=None):
    """main_finetune in this worker (its process group already set up), probed; `refused_argv` first, expected to
    be refused at resume."""
    import main_finetune
    from util.dist import init_distributed, init_process_group

    init_process_group()
    init_distributed(1)
    refusal = None
    if refused_argv is not None:
        with pytest.raises(ValueError) as e:
            main_finetune.main(refused_argv)
        refusal = str(e.value)
    probe = _Probe()
    res = main_finetune.main(argv)
    return dict(losses=res.losses, final=res.final_dir, steps=probe.steps, saves=probe.saves, refusal=refusal)


def _steps(results):
    """Per optimizer step, the examples all ranks took (sorted)."""
    return [sorted(sum((r["steps"][i] for r in results), [])) for i in range(len(results[0]["steps"]))]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tokenizer and tiny base of the fine-tuning tests, and 16 alpaca records of one prompt whose responses
    are all longer than max_words (128 tokens): 55 labelled targets each."""
    env = make_env(tmp_path_factory.mktemp("fsdp_env"))
    words = " ".join(r["output"] for r in json.loads((REPO / "data" / "alpaca_tiny.json").read_text())).split()
    records = [
        {"instruction": "Continue the text.", "input": "", "output": " ".join(random.Random(i).choices(words, k=60))}
        for i in range(16)
    ]
    (env.root / "uniform.json").write_text(json.dumps(records))
    (env.root / "uniform.yaml").write_text(f"sources:\n  - {{path: {env.root / 'uniform.json'}, type: alpaca}}\n")
    return env


def _argv(env, out, dp, *extra):
    batch_size, accum_iter = LAYOUTS[dp]
    args = f"--data_config {env.root / 'uniform.yaml'} --max_words 128 --quant none --data_parallel fsdp"
    args += f" --max_iters {STEPS} --lr 1e-3 --clip_grad 1.0 --save_iteration_interval 2"
    args += f" --batch_size {batch_size} --accum_iter {accum_iter}"
    return env.argv(out, *args.split(), *extra, lora=False)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """Uninterrupted: 6 steps at data parallel 2, checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("fsdp_reference")
    results = run_multiprocess(_train, 2, _argv(env, out, 2))
    return dict(out=out, results=results, losses=results[0]["losses"], steps=_steps(results), final=out / "final")


@pytest.fixture(scope="module")
def killed(env, tmp_path_factory):
    """The same run as two real processes (this test's own launch of the ranks), both SIGKILLed while rank 0 pauses
    in the save of iteration 4 after the model and optimizer files are written."""
    out = tmp_path_factory.mktemp("fsdp_killed")
    port = _free_port()
    procs = []
    for rank in range(2):
        rank_env = dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        rank_env |= dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAZYLLAMA_DIST_BACKEND="gloo")
        rank_env |= {SAVE_PAUSE_ENV: "4:120", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "main_finetune.py"), *_argv(env, out, 2)],
                cwd=REPO,
                stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                env={**os.environ, **rank_env},
            )
        )
    try:
        wait_until_paused(procs[0], timeout=180, what="pausing in the save of iteration 4")
        tmp = out / ".tmp-checkpoint-0000004"
        midway = sorted(p.name for p in (tmp / OPTIMIZER_DIR / "mp00").iterdir())
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
        assert [proc.wait(timeout=30) for proc in procs] == [-signal.SIGKILL] * 2
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return dict(out=out, midway=midway)


# --- (c) no rank holds the whole model while saving; every rank writes its own optimizer shards -------------------


def test_a_save_gathers_one_parameter_at_a_time(reference):
    for rank, result in enumerate(reference["results"]):
        saves = result["saves"]
        assert len(saves) == 4  # checkpoints 2, 4, 6 and final/
        for save in saves:
            assert save["gathers"] == save["params"], (rank, save)  # every rank joined every gather
            # one full tensor alive at a time: the largest parameter, never the model (the embedding and head are
            # the largest here, a quarter of it)
            assert save["peak"] <= save["largest"] < save["total"] / 3, (rank, save)


def test_every_rank_writes_its_own_optimizer_shards(reference):
    shards = reference["out"] / "checkpoint-0000002" / OPTIMIZER_DIR / "mp00"
    files = sorted(p.name for p in shards.iterdir())
    # safetensors files and a weights-only torch file: no pickled DCP .metadata. A file per rank and transformer
    # block or other parameter (the embedding, the final norm, the head): 2 ranks x (2 blocks + 3)
    assert files == ["param_groups.pt"] + [
        f"shard-{rank:05d}-model-{i:05d}-of-00005.safetensors" for rank in (1, 2) for i in range(1, 6)
    ], files
    per_rank = [sum((shards / f).stat().st_size for f in files if f.startswith(f"shard-{r:05d}")) for r in (1, 2)]
    with open_checkpoint(reference["final"]) as final:
        model_bytes = sum(final.read(k).numel() * 4 for k in final.keys())
    # AdamW's two moments of every parameter, split over two ranks: each rank about one model's bytes
    assert all(0.8 * model_bytes < s < 1.2 * model_bytes for s in per_rank), (per_rank, model_bytes)
    state = torch.load(reference["out"] / "checkpoint-0000002" / TRAIN_STATE, weights_only=True)
    assert (state["data_parallel"], state["data_parallel_size"], state["examples_per_step"]) == ("fsdp", 2, 2)


# --- (b) a save killed midway ------------------------------------------------------------------------------------


def test_a_save_killed_midway_leaves_the_previous_checkpoint_intact(killed, reference):
    out = killed["out"]
    assert "param_groups.pt" in killed["midway"]  # killed after the optimizer shards were written, before publishing
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-0000002"]
    ckpt, same = out / "checkpoint-0000002", reference["out"] / "checkpoint-0000002"
    with open_checkpoint(ckpt) as a, open_checkpoint(same) as b:  # the model: the uninterrupted run's, exactly
        assert a.keys() == b.keys() and "layers.1.feed_forward.w2.weight" in a.keys()
        assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())
    assert torch.load(ckpt / TRAIN_STATE, weights_only=True)["iteration"] == 2


def _same_run(resumed, reference, start):
    """The resumed run's steps took the uninterrupted run's examples, with its losses and final weights."""
    assert _steps(resumed) == reference["steps"][start:]  # none seen again, none skipped
    losses = resumed[0]["losses"]
    assert len(losses) == STEPS and losses[:start] == reference["losses"][:start]  # the checkpoint's own
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference["losses"]), rtol=1e-6, atol=0)
    assert reference["losses"][-1] < 0.95 * reference["losses"][0]  # it trains
    with open_checkpoint(resumed[0]["final"]) as a, open_checkpoint(reference["final"]) as b:
        assert a.keys() == b.keys() and len(a.keys()) == 3 + 2 * 9
        for k in a.keys():
            torch.testing.assert_close(a.read(k), b.read(k), rtol=1e-5, atol=1e-6, msg=k)


def test_the_killed_run_resumes_at_data_parallel_4(killed, reference, env, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed["out"], out)
    resumed = run_multiprocess(_train, 4, _argv(env, out, 4, "--resume", "latest"))
    _same_run(resumed, reference, start=2)
    assert not list(out.glob(".tmp-*"))  # the next save cleaned up the interrupted one
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in logged] == [1, 2, 3, 4, 3, 4, 5, 6]


class _RunsCode:
    """A pickle that runs code when loaded (creates a file): what a foreign DCP .metadata file could hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_at_data_parallel_1_unpickles_nothing_and_refuses_another_global_batch(reference, env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "checkpoint-0000004"  # at the end of the first epoch
    shutil.copytree(reference["out"] / ckpt.name, ckpt)
    payload = pickle.dumps(_RunsCode(tmp_path / "proof"))
    pickle.loads(payload)
    assert (tmp_path / "proof").exists()  # the payload does run code when unpickled
    (ckpt / OPTIMIZER_DIR / "mp00" / ".metadata").write_bytes(pickle.dumps(_RunsCode(tmp_path / "ran")))
    wrong = _argv(env, out, 1, "--resume", str(ckpt), "--accum_iter", "1")  # 2 examples a step, not 4
    resumed = run_multiprocess(_train, 1, _argv(env, out, 1, "--resume", str(ckpt)), wrong)
    assert not (tmp_path / "ran").exists()  # DCP's pickled metadata file is never read
    refusal = resumed[0]["refusal"]
    assert "each optimizer step took 4 examples" in refusal and "would take 2 now" in refusal, refusal
    _same_run(resumed, reference, start=4)
