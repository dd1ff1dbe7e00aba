"""Faults a new user ran into (issue 13), each as the behaviour that now holds: NaN in weights that get quantized,
a diverging run, invalid UTF-8 in the chat, two runs on one --output_dir, a config that would reach the network,
and mistakes that were tracebacks or silent."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

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
