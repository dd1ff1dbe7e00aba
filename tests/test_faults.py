"""Faults a new user ran into (issue 13), each as the behaviour that now holds: NaN in weights that get quantized,
a diverging run, invalid UTF-8 in the chat, two runs on one --output_dir, a config that would reach the network,
and mistakes that were tracebacks or silent."""

from __future__ import annotations

import math
import socket

import pytest
import torch

from model.args import ModelArgs
from tests.finetune_env import REPO
from tests.helpers import params_of, random_state_dict, tiny_args
from util.build import build_model
from util.checkpoint import write_meta_checkpoint

# --- 1. finiteness of every tensor after loading, quantized ones included ------------------------------


def _checkpoint_with(tmp_path, key: str, value: float | torch.Tensor, *, name: str = "ckpt"):
    args = tiny_args()
    sd = random_state_dict(args, seed=1)
    if isinstance(value, torch.Tensor):
        sd[key] = value
    else:
        sd[key][1, 3] = value
    path = tmp_path / name
    write_meta_checkpoint(path, sd, params=params_of(args))
    return path


@pytest.mark.parametrize("quant", [None, "4bit", "4bit_fp4", "8bit"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_or_inf_in_a_weight_that_gets_quantized_is_an_error_naming_key_and_file(tmp_path, quant, bad):
    path = _checkpoint_with(tmp_path, "layers.0.attention.wq.weight", bad)
    with pytest.raises(ValueError, match="NaN or Inf") as caught:
        build_model(None, [path], quant=quant, dtype=torch.float32)
    assert "layers.0.attention.wq.weight" in str(caught.value) and "consolidated.00.pth" in str(caught.value)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_a_value_that_overflows_the_model_dtype_on_the_way_to_the_quantizer_is_caught(tmp_path, quant):
    args = tiny_args()
    w = random_state_dict(args, seed=1)["layers.1.feed_forward.w2.weight"].clone()
    w[0, 0] = 1e6  # finite in the fp32 checkpoint, Inf in fp16 (8-bit always goes through fp16)
    path = _checkpoint_with(tmp_path, "layers.1.feed_forward.w2.weight", w)
    dtype = torch.float16 if quant == "4bit" else torch.float32
    with pytest.raises(ValueError, match="layers.1.feed_forward.w2.weight.*scales are NaN/Inf.*overflows"):
        build_model(None, [path], quant=quant, dtype=dtype)


def test_a_quantized_build_of_finite_weights_still_loads(tmp_path):
    path = _checkpoint_with(tmp_path, "norm.weight", torch.ones(64))
    model, report = build_model(None, [path], quant="4bit", dtype=torch.float32)
    assert report.quantized == 14 and torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_an_integer_tensor_where_the_model_has_floats_is_an_error(tmp_path):
    path = _checkpoint_with(tmp_path, "norm.weight", torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"'norm.weight' in .*consolidated.00.pth is stored as torch.int32"):
        build_model(None, [path], dtype=torch.float32)


# --- 5. offline by construction: no code path fetches from a hub ---------------------------------------

TINY_BACKBONES = {
    "timm": (
        "timm:vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2},
    ),
    "open_clip": (
        "open_clip:ViT-B-32",
        {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}},
    ),
}


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection attempt is recorded and refused; the hub's own offline switches are turned off so
    that nothing but the code itself keeps the build from downloading."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network blocked by the test: connect to {address}")

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise OSError(f"network blocked by the test: lookup of {host}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    except ImportError:
        pass
    return attempts


@pytest.mark.parametrize("kind", list(TINY_BACKBONES))
def test_building_a_model_with_a_visual_backbone_makes_no_network_call(kind, no_network, tmp_path):
    spec, kwargs = TINY_BACKBONES[kind]
    args = tiny_args(visual_backbone=spec, visual_kwargs=kwargs)
    model, _ = build_model(args, None, dtype=torch.float32)
    assert model.visual is not None and no_network == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("visual_backbone", "open_clip:hf-hub:someone/model"),
        ("visual_backbone", "timm:hf_hub:someone/vit"),
        ("visual_backbone", "timm:https://example.com/vit.pth"),
        ("visual_weights", "https://example.com/clip.safetensors"),
    ],
)
def test_a_checkpoint_config_naming_a_hub_model_or_url_is_refused_without_a_connection(
    field, value, no_network, tmp_path
):
    args = tiny_args()
    params = {**params_of(args), "visual_backbone": "timm:vit_tiny_patch16_224", field: value}
    write_meta_checkpoint(tmp_path / "ckpt", random_state_dict(args, seed=1), params=params)
    with pytest.raises(ValueError, match=f"{field}=.*refused because nothing may be downloaded") as caught:
        build_model(None, [tmp_path / "ckpt"], dtype=torch.float32)
    assert str(tmp_path / "ckpt") in str(caught.value) and no_network == []


# --- 6, 7. configuration mistakes: one `error:` line (no traceback), nothing silent ---------------------


def _error_line(capsys, main) -> str:
    from util.cli import run

    assert run(main) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dim": "64"}, "dim='64' is not a valid value: expected int"),
        ({"n_layers": "2"}, "n_layers='2' is not a valid value"),
        ({"n_heads": 0, "n_kv_heads": 0}, "n_heads=0 must be >= 1"),
        ({"lora_rank": -3}, "lora_rank=-3 must be >= 0"),
        ({"norm_eps": -1.0}, "norm_eps=-1.0 must be a finite number > 0"),
        ({"adapter_len": 4, "adapter_layers": 9}, "adapter_layers=9 exceeds n_layers=2"),
    ],
)
def test_a_wrong_config_value_is_one_error_line_naming_key_and_file(change, message, tmp_path, capsys):
    import main_finetune
    from tests.finetune_env import make_env

    env = make_env(tmp_path / "env")
    bad = tmp_path / "bad.json"
    bad.write_text(__import__("json").dumps(change))
    argv = env.argv(tmp_path / "out", "--llama_config", str(bad), "--max_iters", "1", lora=False)
    error = _error_line(capsys, lambda: main_finetune.main(argv))
    assert message in error and str(bad) in error and "--quant" not in error


def test_lora_rank_minus_three_in_model_args_is_named_not_blamed_on_quant():
    with pytest.raises(ValueError, match=r"lora_rank=-3 must be >= 0"):
        ModelArgs.from_dict({"lora_rank": -3, "dim": 64, "n_heads": 4})


@pytest.mark.parametrize("ratio", [".inf", "-.inf", ".nan", "1e400"])
def test_a_data_ratio_that_is_not_finite_is_an_error_naming_the_file(ratio, tmp_path):
    from util.data import DataError, load_data_config

    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"sources:\n  - {{path: {REPO / 'data' / 'alpaca_tiny.json'}, type: alpaca, ratio: {ratio}}}\n")
    with pytest.raises(DataError, match="ratio must be a number > 0 and finite") as caught:
        load_data_config(cfg)
    assert str(cfg) in str(caught.value)


def test_the_chat_with_a_nan_in_a_quantized_weight_is_one_error_line_not_garbage(tmp_path, capsys):
    """The issue: demo.py printed '⁇ ⁇ ⁇' from a NaN base built --quant 4bit."""
    import demo
    from tests.finetune_env import make_env

    env = make_env(tmp_path / "env")
    args = ModelArgs.from_json(env.base / "params.json")
    sd = random_state_dict(args, seed=1)
    sd["layers.0.attention.wq.weight"][0, 0] = math.nan
    write_meta_checkpoint(tmp_path / "nan", sd, params=params_of(args))
    argv = ["--tokenizer_path", str(env.tokenizer), "--pretrained_path", str(tmp_path / "nan"), "--prompt", "hi"]
    error = _error_line(capsys, lambda: demo.main(argv))
    assert "layers.0.attention.wq.weight" in error and "NaN or Inf" in error
