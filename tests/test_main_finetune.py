"""main_finetune end to end: two real gloo processes (data parallel 2, model parallel 2, FSDP), resume, a save
killed midway, the quickstart default and the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from fairscale.nn.model_parallel import initialize as fs_mp

import main_finetune
from model.args import ModelArgs
from tests.finetune_env import REPO, TOKENS, make_env, wait_until_paused
from tests.multiprocess import run_multiprocess
from util.build import build_model
from util.checkpoint import open_checkpoint
from util.train import SAVE_PAUSE_ENV, TRAIN_STATE, clip_grad_norm_, shard_dims_of

STEPS = 8


def _session(rank, env, out):
    """Everything that needs two processes, in one spawn: QLoRA at dp 2 and at mp 2, full fine-tuning with DDP and
    with FSDP, and the model-parallel grad norm."""
    from util.dist import init_distributed, init_process_group, mp_group, position

    init_process_group()
    results = {}
    for name, mp in [("dp2", 1), ("mp2", 2)]:
        init_distributed(mp)
        extra = f"--quant 4bit --max_iters {STEPS} --model_parallel_size {mp} --accum_iter 2 --checkpointing"
        extra += " --clip_grad 1.0 --save_iteration_interval 4"
        res = main_finetune.main(env.argv(out / name, *extra.split()))
        model = res.model.eval()
        reloaded, _ = build_model(None, [env.base, res.final_dir], quant="4bit", dtype=torch.float32)  # this layout
        with torch.no_grad():
            logits, logits_reloaded = model(TOKENS), reloaded.eval()(TOKENS)
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = dict(
            losses=res.losses,
            logits=logits,
            logits_reloaded=logits_reloaded,
            trainable=trainable,
            final=res.final_dir,
            position=position(),
        )
        fs_mp.destroy_model_parallel()

    init_distributed(1)
    for dp in ("ddp", "fsdp"):  # full fine-tuning of the unquantized base
        extra = f"--quant none --data_parallel {dp} --max_iters 3 --lr 1e-3 --clip_grad 0.5 --save_iteration_interval 2"
        res = main_finetune.main(env.argv(out / dp, *extra.split(), lora=False))
        results[dp] = {"losses": res.losses, "final": res.final_dir}
    fs_mp.destroy_model_parallel()

    init_distributed(2)  # grad norm of a model-parallel model: split parameters summed, replicated counted once
    model, _ = build_model(None, [env.base], dtype=torch.float32)
    model(TOKENS).logsumexp(-1).mean().backward()
    results["mp2_norm"] = clip_grad_norm_(shard_dims_of(model), 0.0, mp=mp_group())
    clip_grad_norm_(shard_dims_of(model), results["mp2_norm"] / 2, mp=mp_group())
    results["mp2_norm_after_clip"] = clip_grad_norm_(shard_dims_of(model), 0.0, mp=mp_group())
    return results


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("ft_env"))


@pytest.fixture(scope="module")
def session(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_runs")
    return run_multiprocess(_session, 2, env, out)


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("layout", ["dp2", "mp2"])
def test_qlora_two_processes_reduce_the_loss_and_reload_with_the_same_logits(session, env, layout):
    run = session[0][layout]
    losses = run["losses"]
    assert len(losses) == STEPS and _mean(losses[-3:]) < 0.9 * _mean(losses[:3]), losses
    assert session[1][layout]["losses"] == losses  # every rank logs the data-parallel mean

    final = run["final"]
    index = json.loads((final / "lazyllama.json").read_text())
    assert index["trainable_only"] and index["model_parallel_size"] == (2 if layout == "mp2" else 1)
    assert all(".lora." in k for k in index["shard_dims"]), "a trainable-only save holds the LoRA tensors only"
    assert (final / "tokenizer.model").read_bytes() == env.tokenizer.read_bytes()
    config = json.loads((final / "params.json").read_text())
    assert config["lora_rank"] == 16 and config["dim"] == 64  # the full config: build_model(None, ...) needs it

    # loads back for inference, in the layout it was trained in, with the same logits
    torch.testing.assert_close(run["logits_reloaded"], run["logits"], rtol=1e-5, atol=1e-5)
    # and at model parallel 1 in this process: the delta is the trained adapters, put together from the shards
    reloaded, report = build_model(None, [env.base, final], quant="4bit", dtype=torch.float32)
    assert report.missing_keys == [] and report.unexpected_keys == []
    params = dict(reloaded.named_parameters())
    for name, t0 in run["trainable"].items():
        t1 = session[1][layout]["trainable"][name]
        dim = reloaded.get_submodule(name.rsplit(".", 1)[0]).shard_dims[name.rsplit(".", 1)[1]]
        whole = t0 if layout == "dp2" or dim is None else torch.cat([t0, t1], dim=dim)
        assert torch.equal(params[name].detach(), whole), name
    if layout == "dp2":  # same layout as training: the same logits here too
        with torch.no_grad():
            torch.testing.assert_close(reloaded.eval()(TOKENS), run["logits"], rtol=1e-5, atol=1e-5)
    untrained, _ = build_model(None, [env.base], quant="4bit", dtype=torch.float32)
    with torch.no_grad():
        assert (untrained.eval()(TOKENS) - run["logits"]).abs().max() > 1e-2  # the delta does change the model


def test_data_parallel_ranks_hold_identical_adapters(session):
    a, b = session[0]["dp2"]["trainable"], session[1]["dp2"]["trainable"]
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    assert [s["dp2"]["position"].writes for s in session] == [True, False]  # one replica writes the files
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_parallel_ranks_hold_their_shards(session):
    a, b = session[0]["mp2"]["trainable"], session[1]["mp2"]["trainable"]
    wq_b = "layers.0.attention.wq.lora.lora_b"  # column-parallel: B split by rows, A replicated
    assert a[wq_b].shape == (32, 16) and not torch.equal(a[wq_b], b[wq_b])
    assert torch.equal(a["layers.0.attention.wq.lora.lora_a"], b["layers.0.attention.wq.lora.lora_a"])


def test_fsdp_full_finetuning_matches_ddp(session, env):
    ddp, fsdp = session[0]["ddp"], session[0]["fsdp"]
    assert len(ddp["losses"]) == 3
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-5)
    assert ddp["losses"] != pytest.approx([ddp["losses"][0]] * 3)  # it trained
    with open_checkpoint(fsdp["final"]) as a, open_checkpoint(ddp["final"]) as b:  # FSDP saves gathered tensors
        assert a.keys() == b.keys() and "layers.0.attention.wq.weight" in a.keys()
        for key in a.keys():
            torch.testing.assert_close(a.read(key), b.read(key), rtol=1e-4, atol=1e-5)


def test_model_parallel_grad_norm_counts_replicated_parameters_once(session, env):
    model, _ = build_model(None, [env.base], dtype=torch.float32)
    model(TOKENS).logsumexp(-1).mean().backward()
    dense = torch.nn.utils.clip_grad_norm_([p for p in model.parameters()], float("inf"))
    for rank in (0, 1):
        assert session[rank]["mp2_norm"] == pytest.approx(float(dense), rel=1e-5)
        assert session[rank]["mp2_norm_after_clip"] == pytest.approx(float(dense) / 2, rel=1e-4)


# --- a save killed midway, and resume ------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed(env, tmp_path_factory):
    """A real process fine-tuning 6 steps (checkpoints every 2), SIGKILLed while it saves iteration 4."""
    out = tmp_path_factory.mktemp("killed")
    argv = env.argv(out, "--quant", "4bit", "--max_iters", "6", "--accum_iter", "2", "--save_iteration_interval", "2")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "main_finetune.py"), *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, SAVE_PAUSE_ENV: "4:120", "PYTHONPATH": str(REPO)},
    )
    try:
        wait_until_paused(proc, timeout=120, what="pausing in the save of iteration 4")
        assert (out / ".tmp-checkpoint-0000004" / "consolidated.00.safetensors").is_file()  # midway: weights written
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    return out


def test_a_save_killed_midway_leaves_the_previous_checkpoint_intact(killed, env):
    published = sorted(p.name for p in killed.iterdir() if p.name.startswith("checkpoint-"))
    assert published == ["checkpoint-0000002"]  # the interrupted save was never published
    ckpt = killed / "checkpoint-0000002"
    state = torch.load(ckpt / TRAIN_STATE, weights_only=True)
    assert state["iteration"] == 2 and len(state["losses"]) == 2
    model, report = build_model(None, [env.base, ckpt], quant="4bit", dtype=torch.float32)
    assert report.missing_keys == []
    assert model.layers[0].attention.wq.lora.lora_b.abs().sum() > 0  # trained adapters, not the zero init
    for name in ("optimizer.mp00.pt", "rng.rank00000.pt"):
        torch.load(ckpt / name, weights_only=True)


def test_resume_continues_exactly(killed, env, tmp_path):
    argv = env.argv(tmp_path / "straight", "--quant", "4bit", "--max_iters", "6", "--accum_iter", "2")
    straight = main_finetune.main(argv).losses  # 16 examples, 2 x 2 per step: resumed at 2, crosses an epoch at 4
    extra = "--quant 4bit --max_iters 6 --accum_iter 2 --save_iteration_interval 2 --resume latest"
    resumed = main_finetune.main(env.argv(killed, *extra.split())).losses
    assert len(straight) == len(resumed) == 6
    assert resumed == straight  # the killed run's first 2 (from its checkpoint), then 4 more: bit for bit
    logged = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    # the killed process logged 1-4 (and died saving 4); the resumed one continued from checkpoint 2
    assert [e["iteration"] for e in logged] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert [e["loss"] for e in logged[4:]] == straight[2:]
    assert not list(killed.glob(".tmp-*"))  # the next save cleaned up the interrupted one


# --- the quickstart default and the command line -------------------------------------------------------


def test_quickstart_default_makes_its_inputs_and_a_lora_delta(tmp_path, capsys):
    out = tmp_path / "qs"
    res = main_finetune.main(["--output_dir", str(out), "--pretrain_steps", "4", "--max_iters", "3", "--epochs", "1"])
    assert (out / "tokenizer.model").is_file() and (out / "base" / "consolidated.00.pth").is_file()
    base_config = ModelArgs.from_json(out / "base" / "params.json")
    assert base_config.dim == 64 and base_config.lora_rank == 0
    assert res.final_dir == out / "final" and (out / "final" / "tokenizer.model").is_file()
    printed = capsys.readouterr().out
    assert f"written to {out / 'final'}" in printed and "demo.py" in printed
    model, _ = build_model(None, [out / "base", out / "final"], quant="4bit")
    assert model.args.lora_rank == 16 and model.args.vocab_size == base_config.vocab_size

    stamp = (out / "base" / "consolidated.00.pth").stat().st_mtime_ns
    main_finetune.main(["--output_dir", str(out), "--max_iters", "1"])  # second use: nothing made again
    assert (out / "base" / "consolidated.00.pth").stat().st_mtime_ns == stamp


def _main_finetune(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "main_finetune.py", *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


def test_command_line_errors_name_the_problem(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - {path: nowhere.json, type: alpaca}\n")
    error = _one_error_line(_main_finetune(*env.argv(tmp_path / "o", "--data_config", str(bad))))
    assert "nowhere.json" in error and str(bad) in error
    bad_value = tmp_path / "bad_value.json"
    bad_value.write_text('{"lora_rank": "16"}')
    error = _one_error_line(_main_finetune(*env.argv(tmp_path / "o", "--llama_config", str(bad_value))))
    assert error == f"error: {bad_value}: lora_rank='16' is not a valid value: expected int"


def test_a_checkpoint_that_does_not_fit_the_config_is_one_error_line(killed, env, tmp_path):
    """A LoRA delta on a config with fewer LoRA targets: its other adapters fit no tensor (a KeyError inside)."""
    only_wq = tmp_path / "only_wq.json"
    only_wq.write_text('{"lora_targets": ["wq"]}')
    argv = env.argv(tmp_path / "o", "--llama_config", str(REPO / "configs" / "lora_r16.json"), str(only_wq))
    argv[argv.index(str(env.base)) + 1 : argv.index(str(env.base)) + 1] = [str(killed / "checkpoint-0000002")]
    error = _one_error_line(_main_finetune(*argv))
    assert "are not in the model" in error and "layers.0.attention.wk.lora" in error


def test_configuration_mistakes_fail_before_the_build(env, tmp_path):
    with pytest.raises(ValueError, match="freezes the base, and the config adds no adapters"):
        main_finetune.main(env.argv(tmp_path, "--quant", "4bit", lora=False))
    with pytest.raises(ValueError, match="--data_parallel fsdp cannot shard 8-bit weights"):
        main_finetune.main(env.argv(tmp_path, "--quant", "8bit", "--data_parallel", "fsdp", "--max_iters", "1"))
    with pytest.raises(FileNotFoundError, match="--resume latest: no checkpoint-"):
        main_finetune.main(env.argv(tmp_path / "empty", "--resume", "latest"))
    with pytest.raises(ValueError, match=str(env.base)):  # --pretrained_format reaches open_checkpoint
        main_finetune.main(env.argv(tmp_path, "--pretrained_format", "hf"))
