"""The trainer's guards (issue 13): a diverging run is stopped with the step named and never publishes a non-finite
checkpoint; damaged or foreign training-state files are refused with what to do; a resume that changes the
learning-rate schedule says so."""

from __future__ import annotations

import logging
import math
import pickle
import shutil

import pytest
import torch

from tests.finetune_env import make_env
from tests.helpers import tiny_args
from util.build import build_model
from util.data import InstructionDataset, load_data_config
from util.train import TRAIN_STATE, TrainConfig, Trainer, TrainingDiverged, _load_pt, list_checkpoints, resolve_resume


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("guard_env"))


def _trainer(env, out, checkpoints=(), *, lr=1e-2, **cfg):
    args = tiny_args(vocab_size=384, lora_rank=4, lora_alpha=8.0)
    model = build_model(args, [env.base, *checkpoints], quant="4bit", dtype=torch.float32)[0]
    dataset = InstructionDataset(load_data_config(env.data_config), env.tokenizer, max_words=96, seed=0)
    config = TrainConfig(output_dir=out, batch_size=2, lr=lr, tensorboard=False, **cfg)
    return Trainer(model, args, dataset, config)


def _poison(trainer, first: int, last: int = 10**9):
    """Logits are NaN in optimizer steps first..last (1-based), as a model that diverged gives them."""

    def hook(module, inputs, output):
        return output * math.nan if first <= trainer.iteration + 1 <= last else output

    return trainer.module.register_forward_hook(hook)


def test_a_non_finite_step_is_skipped_and_training_goes_on(env, tmp_path):
    trainer = _trainer(env, tmp_path, max_iters=6)
    _poison(trainer, 3, 3)
    updates, snapshots = [], {}
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (updates.append(trainer.iteration + 1), step(*a, **k))[1]
    original = trainer.train_step

    def train_step(batches):  # the trainable tensors before and after each step
        before = {n: p.detach().clone() for n, p in trainer.module.named_parameters() if p.requires_grad}
        result = original(batches)
        snapshots[trainer.iteration] = (before, result)
        return result

    trainer.train_step = train_step
    losses = trainer.fit()
    assert not math.isfinite(losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)
    assert updates == [1, 2, 4, 5, 6]  # step 3 made no update; the run went on
    before, result = snapshots[3]
    assert result.skipped and trainer.bad_steps == 0
    unchanged = snapshots[4][0]  # the weights step 4 started from are those step 3 started from
    assert all(torch.equal(before[n], unchanged[n]) for n in before)
    assert all(torch.isfinite(v).all() for s in trainer.optimizer.state.values() for v in s.values())


def test_n_bad_steps_in_a_row_stop_the_run_naming_the_step_and_keep_the_good_checkpoint(env, tmp_path):
    trainer = _trainer(env, tmp_path, max_iters=12, save_iteration_interval=2, keep_last=1, max_bad_steps=3)
    _poison(trainer, 5)
    with pytest.raises(TrainingDiverged, match=r"iterations 5-7 .* stopped at iteration 7 \(--max_bad_steps 3\)") as e:
        trainer.fit()
    good = tmp_path / "checkpoint-0000004"
    assert f"The last checkpoint, {good}, is intact" in str(e.value)
    # iteration 6 fell in the bad streak: not saved, so checkpoint 4 was not rotated out by --keep_last 1
    assert list_checkpoints(tmp_path) == [good]
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_real_diverging_run_with_a_huge_learning_rate_stops_with_finite_checkpoints(env, tmp_path):
    """The issue's reproduction: --lr 1e4 gave losses 2.9, 6.2, 6.2, 6.2, nan, nan, exit 0 and NaN checkpoints."""
    trainer = _trainer(env, tmp_path, lr=1e4, max_iters=40, save_iteration_interval=1, keep_last=2, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match="training diverged"):
        trainer.fit()
    saved = list_checkpoints(tmp_path)
    assert saved, "the steps before the divergence were saved"
    for ckpt in saved:
        model = build_model(None, [env.base, ckpt], quant="4bit", dtype=torch.float32)[0]  # checks finiteness
        assert all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point())


def test_a_checkpoint_of_non_finite_weights_is_refused_and_the_last_good_one_stays(env, tmp_path):
    trainer = _trainer(env, tmp_path, max_iters=2, save_iteration_interval=2, keep_last=1)
    trainer.fit()
    with torch.no_grad():
        trainer.module.layers[1].attention.wv.lora.lora_a[0, 0] = math.inf
    trainer.iteration = 4
    with pytest.raises(TrainingDiverged, match=r"iteration 4: checkpoint-0000004 not written: .*lora_a' holds NaN"):
        trainer.save_checkpoint()
    with pytest.raises(TrainingDiverged, match="final not written"):
        trainer.save_final(tmp_path / "final")
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-0000002"]
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.fixture(scope="module")
def saved(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    _trainer(env, out, max_iters=4, save_iteration_interval=2).fit()
    return out / "checkpoint-0000004"


def _copy(saved, tmp_path):
    ckpt = tmp_path / saved.name
    shutil.copytree(saved, ckpt)
    return ckpt


@pytest.mark.parametrize("name", [TRAIN_STATE, "optimizer.mp00.pt", "rng.rank00000.pt"])
def test_a_truncated_training_state_file_is_named_with_what_to_do(saved, tmp_path, name):
    ckpt = _copy(saved, tmp_path)
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{ckpt / name}: truncated or corrupt .* resume from an earlier checkpoint"):
        _load_pt(ckpt / name)


class _Payload:
    def __reduce__(self):
        return (print, ("this code ran",))


def test_a_malicious_pickle_in_a_training_checkpoint_is_refused_without_torchs_advice(saved, tmp_path, capsys):
    ckpt = _copy(saved, tmp_path)
    torch.save({"iteration": 4, "x": _Payload()}, ckpt / TRAIN_STATE)
    with pytest.raises(ValueError, match="refused, it holds objects other than tensors") as caught:
        resolve_resume(ckpt, tmp_path)  # before the model is built
    assert "weights_only=False" not in str(caught.value) and str(ckpt / TRAIN_STATE) in str(caught.value)
    assert "this code ran" not in capsys.readouterr().out
    with open(ckpt / "optimizer.mp00.pt", "wb") as f:
        pickle.dump(_Payload(), f)
    with pytest.raises(ValueError, match="optimizer.mp00.pt: refused"):
        _load_pt(ckpt / "optimizer.mp00.pt")


def test_resuming_with_another_max_iters_warns_and_one_already_reached_is_an_error(env, saved, tmp_path, caplog):
    trainer = _trainer(env, tmp_path, [saved], max_iters=8)
    with caplog.at_level(logging.WARNING, logger="util.train"):
        trainer.resume(saved)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "another learning-rate schedule (total optimizer steps 4 -> 8)" in warning
    done = _trainer(env, tmp_path / "done", [saved], max_iters=3)
    with pytest.raises(ValueError, match="is at iteration 4 and this run has 3 optimizer steps .* raise --max_iters"):
        done.resume(saved)
    caplog.clear()
    same = _trainer(env, tmp_path / "same", [saved], max_iters=4 + 0)
    with pytest.raises(ValueError, match="nothing is left to train"):
        same.resume(saved)
