"""The training loop's parts: optimizer groups, clipping, activation checkpointing, precisions, checkpoint files.
(Two-process behaviour - DDP, FSDP, model parallel, resume - is in tests/test_main_finetune.py.)"""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from tests.finetune_env import TOKENS, make_env
from tests.helpers import tiny_args
from util.build import build_model
from util.data import InstructionDataset, load_data_config
from util.train import (
    TrainConfig,
    Trainer,
    _rng_state,
    _set_rng_state,
    clip_grad_norm_,
    enable_activation_checkpointing,
    list_checkpoints,
    param_groups,
    publish_dir,
    resolve_resume,
    shard_dims_of,
)

LORA = dict(lora_rank=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("train_env"))


def _model(env, quant="4bit", **overrides):
    args = tiny_args(vocab_size=384, **{**LORA, **overrides})
    return build_model(args, [env.base], quant=quant, dtype=torch.float32)[0]


def test_weight_decay_only_on_matrices(env):
    model = _model(env, quant=None, bias_tuning=True, norm_tuning=True)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)].rsplit(".", 1)[-1] for p in decay["params"]} == {"lora_a", "lora_b"}
    assert {names[id(p)].rsplit(".", 2)[-2] for p in no_decay["params"]} >= {"bias_tune", "ffn_norm", "norm"}
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*lora_r16.json"):
        param_groups(model, 0.1)


def _loss_and_grads(model):
    model.zero_grad()
    logits = model(TOKENS)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_changes_nothing_but_memory(env, dropout):
    """With LoRA dropout too: the recomputed forward draws the same mask seeds (checkpointing restores the random
    state), and backward draws the same masks from them."""
    model = _model(env, lora_dropout=dropout).train()
    with torch.no_grad():  # non-zero B, so every LoRA tensor gets a gradient
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.02)
    keys = list(model.state_dict())
    torch.manual_seed(4)
    loss, grads = _loss_and_grads(model)
    assert enable_activation_checkpointing(model) == 2
    assert enable_activation_checkpointing(model) == 0  # idempotent
    assert list(model.state_dict()) == keys  # names (and so checkpoints) unchanged
    torch.manual_seed(4)
    loss_ckpt, grads_ckpt = _loss_and_grads(model)
    if dropout:
        torch.manual_seed(5)
        assert not torch.equal(_loss_and_grads(model)[0], loss)  # dropout is on: another seed, another loss
    assert torch.equal(loss, loss_ckpt)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7)


def test_clip_grad_norm_matches_torch_on_one_process(env):
    model = _model(env, quant=None, lora_rank=0)  # full fine-tuning: every parameter has a gradient
    _, grads = _loss_and_grads(model)
    ours = clip_grad_norm_(shard_dims_of(model), 0.05)
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    theirs = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.05)
    assert ours == pytest.approx(float(theirs), rel=1e-6) and ours > 0.05
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours_grads[n], p.grad, rtol=1e-5, atol=1e-8)
    assert clip_grad_norm_(shard_dims_of(model), 0.0) == pytest.approx(0.05, rel=1e-4)  # 0: measure only


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_publish_and_list_checkpoints(tmp_path):
    (tmp_path / "checkpoint-0000010").mkdir()
    (tmp_path / "checkpoint-0000002").mkdir()
    (tmp_path / ".tmp-checkpoint-0000011").mkdir()  # an interrupted save: not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000010"]
    new = tmp_path / ".tmp-x"
    new.mkdir()
    (new / "a").write_text("new")
    old = tmp_path / "final"
    old.mkdir()
    (old / "a").write_text("old")
    (old / "stale").write_text("gone after the replace")
    publish_dir(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["a"] and (old / "a").read_text() == "new" and not new.exists()
    assert not list(tmp_path.glob(".old-*"))
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        resolve_resume(tmp_path / "checkpoint-0000010", tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint-"):
        resolve_resume("latest", tmp_path / "empty")


def _trainer(env, tmp_path, **cfg):
    model = _model(env)
    dataset = InstructionDataset(load_data_config(env.data_config), env.tokenizer, max_words=64, seed=0)
    config = TrainConfig(output_dir=tmp_path, batch_size=2, lr=1e-2, **{"tensorboard": False, **cfg})
    return Trainer(model, model.args, dataset, config)


def test_keep_last_and_epoch_checkpoints(env, tmp_path):
    saves = dict(save_iteration_interval=3, save_interval=1, keep_last=2)
    trainer = _trainer(env, tmp_path, max_iters=7, accum_iter=2, tensorboard=True, **saves)
    assert len(trainer.dataset) == 16 and trainer.steps_per_epoch == 4  # 2 x 2 examples per step
    trainer.fit()
    # saved at 3, 4 (end of epoch 0), 6; the newest two kept
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000004", "checkpoint-0000006"]
    state = torch.load(tmp_path / "checkpoint-0000004" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["sampler"]["position"]) == (0, 4, 16)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in logged] == list(range(1, 8))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes"} <= logged[0].keys()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_close_to_fp32(env, tmp_path, precision):
    losses = {}
    for p in ("fp32", precision):
        trainer = _trainer(env, tmp_path / p, max_iters=2, precision=p, save_interval=0, save_iteration_interval=2)
        losses[p] = trainer.fit()
    assert all(np.isfinite(losses[precision]))
    assert losses[precision] == pytest.approx(losses["fp32"], rel=0.05)
    state = torch.load(tmp_path / precision / "checkpoint-0000002" / "train_state.pt", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")  # the loss scale is part of the checkpoint


def _reference_step(model, examples, clip=0.0):
    """An independent computation of one optimizer step's loss and gradients: each example alone (no padding),
    position t predicting token t + 1, the summed cross entropy over the step's labelled targets divided by their
    count; the gradients clipped by torch's clip_grad_norm_."""
    model.zero_grad()
    loss_sum, count = 0.0, 0
    for tokens, labels in examples:
        logits = model(tokens[None])[0]
        keep = labels[1:] != -100
        loss_sum = loss_sum + torch.nn.functional.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum")
        count += int(keep.sum())
    loss = loss_sum / count
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("batch_size", "accum_iter", "clip"), [(4, 1, 0.0), (2, 2, 0.0), (2, 2, 1e-3)])
def test_the_logged_loss_and_gradients_equal_an_independent_step(env, tmp_path, batch_size, accum_iter, clip):
    """Accumulation 2 x 2 is one batch of 4; the logged loss is the back-propagated one; clipping is applied."""
    model = _model(env, quant=None)
    with torch.no_grad():  # non-zero B, so every LoRA tensor gets a gradient
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    reference_model = copy.deepcopy(model)
    dataset = InstructionDataset(load_data_config(env.data_config), env.tokenizer, max_words=64, seed=0)
    sizes = dict(batch_size=batch_size, accum_iter=accum_iter, clip_grad=clip)
    config = TrainConfig(output_dir=tmp_path, max_iters=1, save_interval=0, tensorboard=False, **sizes)
    trainer = Trainer(model, model.args, dataset, config)
    first_step = [dataset[i] for i in trainer.sampler.indices(0)[:4]]
    grads = {}
    trainer.optimizer.step = lambda: grads.update(
        {n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.requires_grad}
    )
    (logged,) = trainer.fit()

    loss, expected = _reference_step(reference_model, first_step, clip)
    assert logged == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == expected.keys() and len(grads) == 2 * 7 * 2
    for name in expected:
        # rtol 1e-4: with the frozen head util.loss scales the head's input gradient by 1/count after the head
        # matmul, the reference before it (same math, another rounding order: measured up to 4e-5 relative on
        # single near-cancelling elements, 1.6e-8 absolute, depending on the thread count)
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-8)
    if clip:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert float(total) == pytest.approx(clip, rel=1e-4)


def test_the_trainer_leaves_the_callers_config_alone(env, tmp_path):
    config = TrainConfig(output_dir=tmp_path, batch_size=2, max_iters=1, only_save_trainable=False, tensorboard=False)
    model = _model(env)  # 4-bit base: saves hold the trainable tensors whatever the config says
    dataset = InstructionDataset(load_data_config(env.data_config), env.tokenizer, max_words=64, seed=0)
    trainer = Trainer(model, model.args, dataset, config)
    assert trainer.only_save_trainable and not config.only_save_trainable
    assert trainer.dataset is dataset  # text data is used as given
