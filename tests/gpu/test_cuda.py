"""On a GPU: materialize straight onto the device, quantize there; peak GPU memory ~ model + one tensor."""

import pytest
import torch

from tests.helpers import params_of, random_state_dict, tiny_args
from util.build import build_model
from util.checkpoint import write_meta_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("quant", ["4bit", "8bit", None])
def test_build_on_cuda(tmp_path, quant):
    args = tiny_args(dim=256, n_heads=8, n_kv_heads=4, n_layers=3)
    sd = random_state_dict(args, seed=0)
    write_meta_checkpoint(tmp_path, sd, params=params_of(args))
    model, report = build_model(args, [tmp_path], quant=quant, dtype=torch.bfloat16, device="cuda")
    assert all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))
    largest = max(v.numel() for v in sd.values()) * 4  # one fp32 tensor in flight (+ quantizer temporaries)
    assert report.peak_device_memory <= report.model_bytes + 4 * largest, report.summary()
    tokens = torch.randint(0, args.vocab_size, (2, 8), device="cuda")
    cpu_model, _ = build_model(args, [tmp_path], quant=quant, dtype=torch.bfloat16)
    with torch.no_grad():
        gpu_logits, cpu_logits = model(tokens), cpu_model(tokens.cpu())
    # different kernels, same weights: agree to bf16 precision
    assert (gpu_logits.cpu() - cpu_logits).abs().max() < 0.05 * cpu_logits.abs().max()
