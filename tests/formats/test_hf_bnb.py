"""Hugging Face bitsandbytes saves (util/checkpoint/hf_bnb.py): made on CPU by transformers + bitsandbytes
(`save_pretrained` of a load_in_4bit / load_in_8bit model), adopted packed, compared with transformers' quantized
model.

The transformers models run in train mode: in eval mode bitsandbytes' CPU kernel first repacks each 4-bit weight
for AVX512-BF16 (its absmax rounded to bf16), so its logits would carry that rounding; train mode (no dropout in
these models) computes with the saved weights as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.formats.hf_models import add_legacy_rope_theta, make_adapter, save_hf_llama
from util.build import build_model
from util.checkpoint import CheckpointError, hf_unpermute_qk, open_checkpoint
from util.quant import QuantLinear

TOKENS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))
NF4 = dict(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
)
HF_NAMES = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj",
    "w3": "mlp.up_proj",
    "w2": "mlp.down_proj",
}


def save_quantized_hf(base: Path, out: Path, **bnb) -> Path:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(**bnb), device_map="cpu")
    model.save_pretrained(out)
    add_legacy_rope_theta(out)
    return out


def load_quantized_hf(path: Path, compute_dtype: torch.dtype):
    """transformers' model of the save, computing in `compute_dtype`, in train mode (see the module docstring)."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=compute_dtype, device_map="cpu")
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = compute_dtype
        if isinstance(m, bnb.nn.Linear8bitLt):
            m.state.threshold = 0.0  # no outlier decomposition, like this project's 8-bit matmul
    return model.train()


def hf_dequantized(model) -> dict[str, torch.Tensor]:
    """Each quantized linear's weight as transformers' bitsandbytes layer holds it, in Meta's row order."""
    import bitsandbytes.functional as bnbF

    cfg = model.config
    out = {}
    for i, layer in enumerate(model.model.layers):
        for ours, theirs in HF_NAMES.items():
            lin = layer.get_submodule(theirs)
            w = lin.weight
            if hasattr(w, "quant_state"):
                full = bnbF.dequantize_4bit(w.data, w.quant_state).float()
            else:
                full = w.data.float() * w.SCB[:, None].float() / 127
            heads = {"wq": cfg.num_attention_heads, "wk": cfg.num_key_value_heads}.get(ours)
            out[f"layers.{i}.{ours}"] = hf_unpermute_qk(full, heads) if heads else full
    return out


def our_dequantized(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[name.replace("attention.", "").replace("feed_forward.", "")] = m.dequantized_weight().float()
    return out


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bnb")
    save_hf_llama(root / "base")
    return {
        "base": root / "base",
        "nf4": save_quantized_hf(root / "base", root / "nf4", **NF4),
        "int8": save_quantized_hf(root / "base", root / "int8", load_in_8bit=True, llm_int8_threshold=0.0),
    }


def test_a_4bit_save_is_adopted_packed_and_gives_transformers_logits(saves) -> None:
    with open_checkpoint(saves["nf4"]) as r:
        assert r.format == "hf_bnb" and r.quantization["mode"] == "4bit" and r.quantization["compress_statistics"]
        assert r.info["renested"] == []  # tiny heads: every absmax keeps its double-quantization group
    model, report = build_model(None, [saves["nf4"]], quant="4bit", dtype=torch.float32)
    assert (report.prequantized, report.quantized) == (14, 0) and model.args.rope_theta == 500000.0
    ref = load_quantized_hf(saves["nf4"], torch.float32)
    expected_w = hf_dequantized(ref)
    for key, w in our_dequantized(model).items():  # bitwise the weights transformers computes with
        assert torch.equal(w, expected_w[key]), key
    with torch.no_grad():
        got, expected = model(TOKENS), ref(TOKENS).logits
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()  # measured 1.3e-7


def test_a_4bit_save_in_bf16_agrees_with_transformers_in_bf16(saves) -> None:
    model, _ = build_model(None, [saves["nf4"]], quant="4bit", dtype=torch.bfloat16)
    ref = load_quantized_hf(saves["nf4"], torch.bfloat16)
    full = load_quantized_hf(saves["base"], torch.float32)
    with torch.no_grad():
        got, expected = model(TOKENS).float(), ref(TOKENS).logits.float()
        quant_noise = (expected - full(TOKENS).logits).abs().max()
    # bf16 attention and norms round differently in the two implementations; measured 3.5e-3 (4-bit noise ~0.1)
    assert (got - expected).abs().max() <= 1e-2 and (got - expected).abs().max() < quant_noise / 4


def test_q_k_scales_are_double_quantized_again_where_rows_move_between_groups(tmp_path) -> None:
    # head_dim 64 x 512 columns: 512 absmax per head, more than one 256-group, so un-permuting rows moves scales
    # between groups; the codes still move exactly
    base = tmp_path / "base"
    save_hf_llama(
        base, hidden_size=512, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4
    )
    nf4 = save_quantized_hf(base, tmp_path / "nf4", **NF4)
    with open_checkpoint(nf4) as r:
        assert sorted(r.info["renested"]) == ["layers.0.attention.wk.weight", "layers.0.attention.wq.weight"]
    model, report = build_model(None, [nf4], quant="4bit", dtype=torch.float32)
    assert (report.prequantized, report.quantized) == (7, 0)
    ref = load_quantized_hf(nf4, torch.float32)
    expected_w, got_w = hf_dequantized(ref), our_dequantized(model)
    for key in got_w:
        if key.endswith(("wq", "wk")):  # each block's scale off by at most the 8-bit rounding of the scale
            rel = ((got_w[key] - expected_w[key]).abs().amax() / expected_w[key].abs().amax()).item()
            assert 0 < rel < 0.02, (key, rel)
        else:
            assert torch.equal(got_w[key], expected_w[key]), key
    saved = ref.model.layers[0].self_attn.q_proj.weight.data.reshape(512, -1)  # the codes: bitwise, rows un-permuted
    assert torch.equal(model.layers[0].attention.wq.weight.data.reshape(512, -1), hf_unpermute_qk(saved, 8))
    full = load_quantized_hf(base, torch.float32)
    with torch.no_grad():
        got, expected = model(TOKENS), ref(TOKENS).logits
        quant_noise = (expected - full(TOKENS).logits).abs().max()
    assert (got - expected).abs().max() < quant_noise / 4, ((got - expected).abs().max(), quant_noise)


def test_an_8bit_save_is_adopted_packed_and_gives_transformers_logits(saves) -> None:
    with open_checkpoint(saves["int8"]) as r:
        assert r.quantization["mode"] == "8bit"
    model, report = build_model(None, [saves["int8"]], quant="8bit", dtype=torch.float32)
    assert (report.prequantized, report.quantized) == (14, 0)
    ref = load_quantized_hf(saves["int8"], torch.float32)
    expected_w = hf_dequantized(ref)
    for key, w in our_dequantized(model).items():
        assert torch.equal(w, expected_w[key]), key
    with torch.no_grad():
        got, expected = model(TOKENS), ref(TOKENS).logits
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()


@pytest.mark.parametrize("quant", ["8bit", "4bit_fp4", None])
def test_a_build_with_other_quantization_settings_is_told_what_to_do(saves, quant) -> None:
    with pytest.raises(ValueError, match=r"nf4.*pre-quantized|pre-quantized.*nf4") as e:
        build_model(None, [saves["nf4"]], quant=quant, dtype=torch.float32)
    assert str(saves["nf4"]) in str(e.value) and "--quant 4bit" in str(e.value)


def test_4bit_blocks_spanning_rows_of_q_k_are_refused_with_what_to_do(tmp_path) -> None:
    base = tmp_path / "base"
    save_hf_llama(base, hidden_size=96, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    nf4 = save_quantized_hf(base, tmp_path / "nf4", **NF4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*span rows.*full-precision"):
        open_checkpoint(nf4)


def test_other_quantization_methods_are_refused_by_name(saves, tmp_path) -> None:
    d = tmp_path / "gptq"
    d.mkdir()
    cfg = json.loads((saves["base"] / "config.json").read_text()) | {"quantization_config": {"quant_method": "gptq"}}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((saves["base"] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"config\.json.*quant_method='gptq'"):
        open_checkpoint(d)


def test_a_peft_adapter_over_the_4bit_save_gives_peft_logits_over_transformers_4bit_model(saves, tmp_path) -> None:
    from peft import PeftModel

    make_adapter(saves["base"], tmp_path / "adapter")
    reference = PeftModel.from_pretrained(load_quantized_hf(saves["nf4"], torch.float32), tmp_path / "adapter").train()
    model, report = build_model(None, [saves["nf4"], tmp_path / "adapter"], quant="4bit", dtype=torch.float32)
    assert (report.prequantized, report.quantized) == (14, 0) and model.args.lora_rank == 8
    with torch.no_grad():
        got, expected = model(TOKENS), reference(TOKENS).logits
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()


def test_an_fp4_save_without_double_quantization_loads_with_the_matching_spec(saves, tmp_path) -> None:
    from util.quant import QuantSpec

    fp4 = save_quantized_hf(saves["base"], tmp_path / "fp4", load_in_4bit=True, bnb_4bit_quant_type="fp4")
    with pytest.raises(ValueError, match=r"plain absmax.*compress_statistics=False"):  # no named mode has it
        build_model(None, [fp4], quant="4bit_fp4", dtype=torch.float32)
    spec = QuantSpec("fp4_plain", 4, "fp4", compress_statistics=False)
    model, report = build_model(None, [fp4], quant=spec, dtype=torch.float32)
    assert (report.prequantized, report.quantized) == (14, 0)
    with torch.no_grad():
        got, expected = model(TOKENS), load_quantized_hf(fp4, torch.float32)(TOKENS).logits
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()  # measured 1.8e-7
