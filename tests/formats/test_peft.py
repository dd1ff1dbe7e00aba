"""peft LoRA adapters (util/checkpoint/peft.py) over a Hugging Face base: files written by transformers and peft,
logits compared with peft's own PeftModel."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.formats.hf_models import make_adapter, save_hf_llama
from util.build import build_model
from util.checkpoint import CheckpointError, open_checkpoint

TOKENS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("base")
    save_hf_llama(d)
    return d


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_a_peft_adapter_over_its_base_gives_peft_logits(hf_base, tmp_path, rslora: bool) -> None:
    peft_model = make_adapter(hf_base, tmp_path / "adapter", use_rslora=rslora)
    with torch.no_grad():
        expected = peft_model(TOKENS).logits
    model, report = build_model(None, [hf_base, tmp_path / "adapter"], dtype=torch.float32)
    assert model.args.rope_theta == 500000.0 and (model.args.lora_rank, model.args.n_kv_heads) == (8, 2)
    assert model.layers[0].attention.wq.lora.scale == pytest.approx(16 / math.sqrt(8) if rslora else 2.0)
    assert report.unexpected_keys == [] and report.missing_keys == []
    with torch.no_grad():
        got = model(TOKENS)
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()
    with peft_model.disable_adapter(), torch.no_grad():  # the adapter changes the logits: the test can fail
        assert (peft_model(TOKENS).logits - expected).abs().max() > 0.05


def test_an_adapter_on_some_projections_gets_lora_on_those_only(hf_base, tmp_path) -> None:
    peft_model = make_adapter(hf_base, tmp_path / "adapter", targets=["q_proj", "k_proj", "down_proj"])
    with open_checkpoint(tmp_path / "adapter") as r:
        assert r.format == "peft" and r.config["lora_targets"] == ["wq", "wk", "w2"]
    model, _ = build_model(None, [hf_base, tmp_path / "adapter"], dtype=torch.float32)
    assert not hasattr(model.layers[0].attention.wv, "lora") and hasattr(model.layers[1].feed_forward.w2, "lora")
    with torch.no_grad():
        assert (model(TOKENS) - peft_model(TOKENS).logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_an_adapter_config_field_that_is_not_implemented_is_an_error_naming_it(hf_base, tmp_path, change, field):
    make_adapter(hf_base, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(CheckpointError, match=rf"adapter_config\.json.*{field}"):
        build_model(None, [hf_base, tmp_path / "adapter"], dtype=torch.float32)


def test_an_adapter_for_a_deeper_base_is_an_error_naming_the_adapter_file(hf_base, tmp_path) -> None:
    other = tmp_path / "other"
    save_hf_llama(other, num_hidden_layers=3)
    make_adapter(other, tmp_path / "adapter")
    with pytest.raises(KeyError, match=r"adapter_model\.safetensors.*layers\.2\."):
        build_model(None, [hf_base, tmp_path / "adapter"], dtype=torch.float32)


def test_an_adapter_for_a_narrower_base_is_an_error_naming_the_adapter_file(hf_base, tmp_path) -> None:
    other = tmp_path / "other"
    save_hf_llama(other, hidden_size=32, intermediate_size=96)
    make_adapter(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"shape mismatch .* in .*adapter_model\.safetensors"):
        build_model(None, [hf_base, tmp_path / "adapter"], dtype=torch.float32)


def test_a_tensor_that_is_not_a_llama_lora_is_an_error_naming_the_file(tmp_path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file(
        {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 8)},
        d / "adapter_model.safetensors",
    )
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*transformer\.h\.0\.attn\.c_attn"):
        open_checkpoint(d)


def test_a_truncated_adapter_file_is_an_error_naming_it(hf_base, tmp_path) -> None:
    make_adapter(hf_base, tmp_path / "adapter")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 100])
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors"):
        build_model(None, [hf_base, tmp_path / "adapter"], dtype=torch.float32)


def test_q_k_rows_need_the_base_head_counts(hf_base, tmp_path) -> None:
    make_adapter(hf_base, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_name_or_path": "meta-llama/elsewhere"}))
    with open_checkpoint(tmp_path / "adapter") as r:
        r.read("layers.0.attention.wv.lora.lora_b")  # no permutation: readable alone
        with pytest.raises(CheckpointError, match="num_attention_heads.*build_model"):
            r.read("layers.0.attention.wq.lora.lora_b")
