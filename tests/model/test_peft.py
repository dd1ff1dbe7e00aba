import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.adapter import AdapterGate
from model.args import ModelArgs
from model.layers import ColumnParallelLinear, RowParallelLinear
from model.peft import LoRA, add_lora, merge_lora
from tests.helpers import params_of, write_tiny_checkpoint
from util.build import build_model
from util.checkpoint import CheckpointError, export_meta, save_model
from util.quant import QUANT_MODES, QuantLinear

METHODS = {
    "lora": dict(lora_rank=4, lora_alpha=8.0),
    "adapter": dict(adapter_len=3, adapter_layers=1),
    "bias_norm": dict(bias_tuning=True, norm_tuning=True),
}
TOKENS = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    args, sd = write_tiny_checkpoint(path, seed=5)
    return args, sd, path


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("quant", [None, "4bit", "8bit"])
@pytest.mark.parametrize("method", list(METHODS))
def test_untrained_adapters_are_exact_noops(base, quant, method):
    args, _, path = base
    plain, _ = build_model(args, [path], quant=quant, dtype=torch.float32)
    adapted, report = build_model(args.replace(**METHODS[method]), [path], quant=quant, dtype=torch.float32)
    assert report.missing_keys  # the adapter tensors were initialized, not loaded
    assert torch.equal(_logits(adapted), _logits(plain))


def test_reset_parameters_zeroes_b_and_gates_and_draws_a():
    lora = LoRA(256, 64, rank=8, alpha=16, dropout=0.0, style="column")
    gate = AdapterGate(4)
    with torch.no_grad():
        lora.lora_b.fill_(1.23)
        gate.gate.fill_(1.23)
    lora.reset_parameters()
    gate.reset_parameters()
    assert torch.equal(lora.lora_b, torch.zeros_like(lora.lora_b)) and torch.equal(gate.gate, torch.zeros(4))
    bound = math.sqrt(6 / ((1 + 5) * 256))
    a = lora.lora_a
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert abs(a.mean()) < 0.1 * bound and abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound  # U(-b, b)
    assert a.dtype == torch.float32 and lora.lora_b.dtype == torch.float32  # fp32 master weights


def test_meta_build_initializes_adapters_and_loads_the_base(base):
    args, sd, path = base
    cfg = args.replace(lora_rank=4, adapter_len=3, adapter_layers=2, bias_tuning=True)
    model, report = build_model(cfg, [path], quant="4bit", dtype=torch.bfloat16)
    for name, t in model.named_parameters():
        assert not t.is_meta and (not t.is_floating_point() or torch.isfinite(t).all()), name
    wq = model.layers[0].attention.wq
    assert isinstance(wq, QuantLinear) and isinstance(wq.lora, LoRA)  # quantized first, then wrapped
    assert wq.lora.lora_a.abs().sum() > 0 and wq.lora.lora_b.abs().sum() == 0
    assert model.adapter.weight.std() > 0.5 and model.layers[1].attention.adapter_gate.gate.abs().sum() == 0
    assert torch.equal(model.norm.weight, sd["norm.weight"].bfloat16())
    assert sorted(report.missing_keys) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "method, expected",
    [
        ("lora", lambda n: n.endswith(("lora.lora_a", "lora.lora_b"))),
        ("adapter", lambda n: n == "adapter.weight" or n.endswith("adapter_gate.gate")),
        ("bias_norm", lambda n: n.endswith(("bias_tune.bias", "norm.weight"))),
    ],
)
def test_gradients_reach_exactly_the_configured_set(base, method, expected):
    args, _, path = base
    model, _ = build_model(args.replace(**METHODS[method]), [path], quant="4bit", dtype=torch.float32)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and trainable == sorted(n for n, _ in model.named_parameters() if expected(n))
    logits = model(TOKENS)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    # B and gates start at zero, so A / the prompt get no gradient at the very first step; their partners do
    assert all(
        model.get_parameter(n).grad.abs().sum() > 0 for n in trainable if not n.endswith(("lora_a", "adapter.weight"))
    )


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
@pytest.mark.parametrize("kind", [nn.Linear, ColumnParallelLinear, RowParallelLinear])
def test_lora_on_quantized_base_matches_dense(mode, kind):
    torch.manual_seed(0)
    base = QuantLinear.from_linear(kind(64, 96, bias=False), QUANT_MODES[mode])
    model = nn.Module()
    model.add_module("layers", nn.ModuleList([nn.Module()]))
    model.layers[0].add_module("attention", nn.Module())
    model.layers[0].attention.add_module("wq", base)
    add_lora(model, ModelArgs(dim=64, n_heads=4, lora_rank=4, lora_alpha=6.0, lora_targets=("wq",)))
    lora = base.lora
    with torch.no_grad():
        lora.lora_b.normal_()
    w = base.dequantized_weight().float()
    x = torch.randn(3, 64)
    dense = x @ w.T + 1.5 * (x @ lora.lora_a.T) @ lora.lora_b.T
    torch.testing.assert_close(base(x), dense, rtol=1e-4, atol=1e-4)
    base.eval()
    with torch.no_grad():  # 8-bit inference also quantizes the activations (LLM.int8): close, not equal
        tol = 1e-4 if mode == "4bit" else 3e-2
        torch.testing.assert_close(base(x), dense, rtol=tol, atol=tol)
    base.train()  # train-mode forward/backward after an eval forward
    out = base(x)
    out.sum().backward()
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lora.lora_b.grad, 1.5 * (x @ lora.lora_a.T).sum(0).expand(96, -1), rtol=1e-4, atol=1e-4)


def _train(model, steps=12, lr=2e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        logits = model(batch)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "method, quant", [("lora", "4bit"), ("adapter", "4bit"), ("bias_norm", "4bit"), ("lora", "8bit")]
)
def test_a_few_steps_reduce_the_loss(base, method, quant):
    args, _, path = base
    torch.manual_seed(0)
    model, _ = build_model(args.replace(**METHODS[method]), [path], quant=quant, dtype=torch.float32)
    # gates start at zero (a slow start through tanh): the adapter gets a larger step
    losses = _train(model, lr=0.1 if method == "adapter" else 2e-2)
    assert all(b < a for a, b in zip(losses[:3], losses[1:4])) and losses[-1] < 0.98 * losses[0], losses


def test_trainable_only_round_trip_and_merged_export(base, tmp_path):
    args, sd, path = base
    cfg = args.replace(lora_rank=4, lora_alpha=8.0)
    model, _ = build_model(cfg, [path], dtype=torch.float32)
    _train(model, steps=3)
    expected = _logits(model)
    save_model(model, tmp_path / "delta", config=cfg.to_dict(), trainable_only=True)
    saved = sorted(p.name for p in (tmp_path / "delta").iterdir())
    assert "consolidated.00.safetensors" in saved
    reloaded, report = build_model(cfg, [path, tmp_path / "delta"], dtype=torch.float32)
    assert report.missing_keys == [] and torch.equal(_logits(reloaded), expected)

    assert merge_lora(reloaded) == 7 * args.n_layers
    export_meta(reloaded, tmp_path / "merged", params=params_of(args))
    plain, _ = build_model(None, [tmp_path / "merged"], dtype=torch.float32)
    assert not any(isinstance(m, LoRA) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-5, atol=1e-5)


def test_merge_refuses_quantized_base(base):
    args, _, path = base
    model, _ = build_model(args.replace(lora_rank=2), [path], quant="4bit", dtype=torch.float32)
    with pytest.raises(ValueError, match="quantized base"):
        merge_lora(model)


def test_export_refuses_unmerged_adapters(base, tmp_path):
    args, _, path = base
    model, _ = build_model(args.replace(lora_rank=2), [path], dtype=torch.float32)
    with pytest.raises(CheckpointError, match="merge LoRA first"):
        export_meta(model, tmp_path, params=params_of(args))


# --- bad input ---
def test_lora_on_missing_projection_is_refused(base):
    args, _, path = base
    with pytest.raises(ValueError, match=r"'wx'.*wq"):
        build_model(args.replace(lora_rank=2, lora_targets=("wq", "wx")), [path], dtype=torch.float32)


def test_delta_with_other_shapes_is_refused(base, tmp_path):
    args, _, path = base
    model, _ = build_model(args.replace(lora_rank=8), [path], dtype=torch.float32)
    save_model(model, tmp_path, trainable_only=True)
    with pytest.raises(ValueError, match=r"lora\.lora_a.*\[4, 64\].*\[8, 64\]"):
        build_model(args.replace(lora_rank=4), [path, tmp_path], dtype=torch.float32)


def test_adapter_delta_on_model_without_adapters_is_refused(base, tmp_path):
    args, _, path = base
    model, _ = build_model(args.replace(adapter_len=2, adapter_layers=1), [path], dtype=torch.float32)
    save_model(model, tmp_path, trainable_only=True)
    with pytest.raises(KeyError, match=r"adapter\.weight"):
        build_model(args, [path, tmp_path], dtype=torch.float32)


def test_quantizing_after_lora_is_refused(base):
    args, _, path = base
    model, _ = build_model(args.replace(lora_rank=2), [path], dtype=torch.float32)
    from util.quant import quantize_model

    with pytest.raises(ValueError, match="before adding LoRA"):
        quantize_model(model, "4bit")
