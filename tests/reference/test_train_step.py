"""One training step of util.train against transformers + peft on the same weights, batch and LoRA (fp32).

The checkpoint is written by transformers (save_pretrained of a tiny GQA LlamaForCausalLM); LoRA r8 on all
seven projections with the same non-zero A and B on both sides; the batch is right-padded with the prompt masked
(-100). The reference loss is transformers' own (mean next-token cross entropy over the labelled targets), the
reference gradients are peft's, the reference update is torch.optim.AdamW (after torch's clip_grad_norm_).
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_multiprocess
from tests.reference.hf import copy_lora_into, example, hf_loss_and_grads, lora_tensors, pad, with_lora, write_hf_model
from util.build import build_model, model_config
from util.checkpoint import open_checkpoint
from util.train import TrainConfig, Trainer

LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 0.02  # the project's AdamW: betas (0.9, 0.95), decay on matrices
# (length, prompt length): a padded batch of varied lengths, 7 + 5 + 6 + 6 labelled targets.
EXAMPLES = [example(n, p, seed=10 + i) for i, (n, p) in enumerate([(10, 3), (7, 2), (12, 6), (9, 3)])]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_llama")
    write_hf_model(path, seed=0)
    return path


def _reference(hf_dir, dropout: float = 0.0):
    """A fresh transformers model from the same file (what save_pretrained wrote) with peft's seeded LoRA."""
    from transformers import LlamaForCausalLM

    return with_lora(LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(), dropout=dropout)


def _ours(hf_dir, lora_values=None, rank: int = 0, world_size: int = 1, dropout: float = 0.0):
    """This project's model from the HF checkpoint, LoRA r8 alpha 24 on all seven, set to the reference's values
    (this rank's slice of each under model parallel)."""
    with open_checkpoint(hf_dir) as reader:
        args = model_config([reader]).replace(lora_rank=8, lora_alpha=24.0, lora_dropout=dropout)
    model, _ = build_model(args, [hf_dir], quant=None, dtype=torch.float32)
    if lora_values is not None:
        local = {}
        for name, full in lora_values.items():
            module_name, leaf = name.rsplit(".", 1)
            dim = model.get_submodule(module_name).shard_dims[leaf]
            local[name] = full if dim is None else full.chunk(world_size, dim)[rank]
        copy_lora_into(model, local)
    return model


class _Examples(torch.utils.data.Dataset):
    def __len__(self):
        return len(EXAMPLES)

    def __getitem__(self, i):
        return EXAMPLES[i]


def _trainer(model, tmp_path, **cfg):
    config = TrainConfig(
        output_dir=tmp_path,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        max_iters=100,
        save_interval=0,
        tensorboard=False,
        **cfg,
    )
    trainer = Trainer(model, model.args, _Examples(), config)
    grads = {}  # what AdamW is given (after clipping)
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.requires_grad})
    )
    return trainer, grads


def _assert_close(got, expected, name, rel=1e-5):
    """Equal to `rel` of the tensor's scale (fp32 sums in another order differ by a few ulps of the largest
    element, so small elements are not compared relative to themselves)."""
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * float(expected.abs().max()), msg=name)


def _micro_batches(examples, batch_size):
    return [pad(examples[i : i + batch_size])[:2] for i in range(0, len(examples), batch_size)]


def test_the_model_from_a_transformers_checkpoint_gives_transformers_logits(hf_dir):
    reference = _reference(hf_dir)
    ours = _ours(hf_dir, lora_tensors(reference))
    tokens = pad(EXAMPLES)[0]
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        got = ours(tokens)
        with reference.disable_adapter():
            base = reference(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float((expected - base).abs().max()) > 1e-2  # the LoRA delta is part of what is compared


@pytest.mark.parametrize(
    ("n_examples", "batch_size", "accum_iter"),
    [(1, 1, 1), (3, 3, 1), (4, 2, 2)],
    ids=["batch1", "padded-batch3", "accum2x2-vs-batch4"],
)
def test_loss_and_every_lora_gradient_equal_transformers_and_peft(hf_dir, tmp_path, n_examples, batch_size, accum_iter):
    examples = EXAMPLES[:n_examples]
    reference = _reference(hf_dir)
    expected_loss, expected_grads = hf_loss_and_grads(reference, examples)  # one batch of all n_examples
    model = _ours(hf_dir, lora_tensors(reference))
    trainer, grads = _trainer(model, tmp_path, batch_size=batch_size, accum_iter=accum_iter)
    result = trainer.train_step(_micro_batches(examples, batch_size))
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)  # the logged loss is the back-propagated one
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * 7 * 2
    for name, g in expected_grads.items():
        assert float(g.abs().max()) > 1e-4, name  # every LoRA tensor really has a gradient to compare
        _assert_close(grads[name], g, name)


class _GivenDropout(torch.nn.Module):
    """peft's dropout module replaced by a given multiplier (0 or 1 / (1 - p) per element)."""

    def __init__(self, noise: torch.Tensor):
        super().__init__()
        self.noise = noise

    def forward(self, x):
        return x * self.noise


def test_lora_dropout_in_training_equals_peft_given_the_same_masks(hf_dir, monkeypatch):
    """LoRA dropout (p 0.3) in train mode. Ours draws each adapter's mask from a seed and draws it again in
    backward (model.layers.lean.dropout_linear keeps x, not the dropped-out copy); the masks ours drew in forward
    (in the order q, k, v, o, gate, up, down per layer) are given to peft's adapters, and loss and gradients must
    be peft's: this checks the forward and the rebuilt product in backward against peft's graph."""
    import model.layers.lean as lean
    from util.loss import model_token_loss

    reference = _reference(hf_dir, dropout=0.3)
    tokens, labels, mask = pad(EXAMPLES)
    with torch.no_grad():
        no_dropout = float(reference(input_ids=tokens, attention_mask=mask, labels=labels).loss)  # eval mode
    ours = _ours(hf_dir, lora_tensors(reference), dropout=0.3).train()
    drawn = []
    draw = lean._noise
    monkeypatch.setattr(lean, "_noise", lambda x, p, seed: drawn.append(draw(x, p, seed)) or drawn[-1])
    loss_sum, n = model_token_loss(ours, ours, tokens, labels)
    forward_masks = list(drawn)
    (loss_sum / n).backward()
    assert len(forward_masks) == 7 * 2 and len(drawn) == 2 * len(forward_masks)  # each drawn again in backward
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}
    adapters = [(n.split("."), m) for n, m in reference.named_modules() if hasattr(m, "lora_dropout")]
    adapters.sort(key=lambda item: (int(item[0][4]), order.index(item[0][6])))
    assert len(adapters) == len(forward_masks)
    for (_, module), noise in zip(adapters, forward_masks):
        module.lora_dropout["default"] = _GivenDropout(noise)
    expected_loss, expected_grads = hf_loss_and_grads(reference.train(), EXAMPLES)
    assert abs(expected_loss - no_dropout) > 1e-3  # the masks change the loss: they are part of what is compared
    assert float(loss_sum.detach() / n) == pytest.approx(expected_loss, rel=1e-6)
    params = dict(ours.named_parameters())
    for name, g in expected_grads.items():
        _assert_close(params[name].grad, g, name)


def _reference_steps(reference, batches_per_step, lrs, clip):
    """peft's gradients, torch's clip_grad_norm_, torch.optim.AdamW with the project's settings, step by step:
    (LoRA tensors after each step, clipped gradients, norms before clipping), under this project's names."""
    params = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    after, clipped, norms = [], [], []
    for examples, lr in zip(batches_per_step, lrs):
        hf_loss_and_grads(reference, examples)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))))
        clipped.append(lora_tensors(reference, grads=True))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        after.append(lora_tensors(reference))
    return after, clipped, norms


@pytest.mark.parametrize("clip", [0.0, 1e-6], ids=["no-clip", "tiny-clip"])
def test_adamw_steps_equal_torch_adamw_on_the_same_gradients(hf_dir, tmp_path, monkeypatch, clip):
    """Two steps (the second shows betas and AdamW's state). The gradients before clipping are peft's; from them,
    torch's clip_grad_norm_ then torch.optim.AdamW (fed exactly our gradients, so AdamW's sign-like first step
    on near-zero gradients cannot amplify fp32 noise) give our clipped gradients and updated tensors. A tiny
    --clip_grad brings per-element gradients near AdamW's eps, so the update itself shows whether clipping
    happened."""
    import util.train

    reference = _reference(hf_dir)
    start = lora_tensors(reference)
    _, peft_grads = hf_loss_and_grads(reference, EXAMPLES)
    model = _ours(hf_dir, start)
    trainer, grads = _trainer(model, tmp_path, batch_size=2, accum_iter=2, clip_grad=clip)
    names = {id(p): n for n, p in trainer.module.named_parameters()}
    unclipped = []
    real_clip = util.train.clip_grad_norm_

    def recording_clip(params, max_norm, **kwargs):
        unclipped.append({names[id(p)]: p.grad.clone() for p, _ in params})
        return real_clip(params, max_norm, **kwargs)

    monkeypatch.setattr(util.train, "clip_grad_norm_", recording_clip)
    mine = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}  # torch's AdamW on our gradients
    optimizer = torch.optim.AdamW(list(mine.values()), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    for step in range(2):
        result = trainer.train_step(_micro_batches(EXAMPLES, 2))
        assert result.lr == (LR if step == 0 else pytest.approx(LR, rel=1e-3)) and result.lr <= LR
        if step == 0:  # the gradients AdamW starts from are transformers + peft's
            for name, g in peft_grads.items():
                _assert_close(unclipped[0][name], g, name)
        for n, p in mine.items():
            p.grad = unclipped[step][n].clone()
        norm = torch.nn.utils.clip_grad_norm_(list(mine.values()), clip if clip else float("inf"))
        assert result.grad_norm == pytest.approx(float(norm), rel=1e-6)
        for n, p in mine.items():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-6, atol=0, msg=n)  # what AdamW was given
        for group in optimizer.param_groups:
            group["lr"] = result.lr
        optimizer.step()
        for n, p in trainer.module.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.detach(), mine[n].detach(), rtol=1e-6, atol=1e-9, msg=n)
    if clip:
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
        assert float(total) == pytest.approx(clip, rel=1e-4) and result.grad_norm > 1e3 * clip
    else:
        assert all(torch.equal(unclipped[1][n], grads[n]) for n in grads)  # nothing clipped


# --- clipping under model parallel 2 and data parallel 2 (two real processes, gloo) ---------------------------------


def _clip_worker(rank, hf_dir, model_parallel, lora_values, clip, expected_loss, expected_params, tmp):
    from util.dist import init_distributed

    info = init_distributed(model_parallel_size=model_parallel)
    mp_rank, mp_size = info.model_parallel_rank, info.model_parallel_size
    model = _ours(hf_dir, lora_values, rank=mp_rank, world_size=mp_size)
    # data parallel: rank 0 takes one example (7 labelled targets), rank 1 the other three (17): the step must
    # still be the one batch of four (the group's tokens divide, not each rank's own); model parallel: all four
    dp_rank, dp_size = info.data_parallel_rank, info.data_parallel_size
    mine = EXAMPLES if dp_size == 1 else (EXAMPLES[:1] if dp_rank == 0 else EXAMPLES[1:])
    # (the trainer is handed the micro-batches: its accum_iter only sizes its own data loader, unused here)
    trainer, _ = _trainer(model, f"{tmp}/rank{rank}", batch_size=1, accum_iter=1, clip_grad=clip)
    result = trainer.train_step(_micro_batches(mine, 1))
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    assert result.grad_norm > 100 * clip  # clipping really scaled the gradients down
    for name, p in trainer.module.named_parameters():
        if not p.requires_grad:
            continue
        module_name, leaf = name.rsplit(".", 1)
        dim = trainer.module.get_submodule(module_name).shard_dims[leaf]
        full = expected_params[name]
        want = full if dim is None else full.chunk(mp_size, dim)[mp_rank]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-8, msg=f"rank {rank}: {name}")
    return result.grad_norm


@pytest.mark.parametrize("model_parallel", [2, 1], ids=["model-parallel-2", "data-parallel-2"])
def test_clipping_under_two_processes_equals_torch_clip_grad_norm(hf_dir, tmp_path, model_parallel):
    clip = 1e-6
    reference = _reference(hf_dir)
    start = lora_tensors(reference)
    expected_loss, _ = hf_loss_and_grads(reference, EXAMPLES)  # one batch of four (see EXAMPLES)
    (expected_params,), _, (expected_norm,) = _reference_steps(reference, [EXAMPLES], [LR], clip)
    norms = run_multiprocess(
        _clip_worker, 2, hf_dir, model_parallel, start, clip, expected_loss, expected_params, str(tmp_path)
    )
    assert norms[0] == pytest.approx(expected_norm, rel=1e-5) and norms[1] == pytest.approx(norms[0], rel=1e-9)
