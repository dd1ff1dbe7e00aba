"""--to meta (params.json with Meta's keys only; the feed-forward size by Meta's rule; model-parallel files) and
--to peft (PeftModel.from_pretrained over the hf export of the base gives our LoRA model's logits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from model.peft import LoRA
from tests.formats.conftest import our_logits, tokens
from util.build import build_model
from util.checkpoint import CheckpointError, open_checkpoint, save_checkpoint
from util.checkpoint.modules import META_PARAMS_KEYS, meta_params

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import peft as peft
import transformers as transformers


def _hf_converter_intermediate_size(p: dict) -> int:
    """The size Hugging Face's convert_llama_weights_to_hf computes from a params.json."""
    multiple_of, mult = p.get("multiple_of", 256), p.get("ffn_dim_multiplier", 1)
    return multiple_of * ((int(mult * int(8 * p["dim"] / 3)) + multiple_of - 1) // multiple_of)


def test_meta_export_has_meta_keys_only_and_reloads_exactly(base, delta, export):
    out = export("meta-merged", [base[2], delta[1]], to="meta", dtype="float32")
    params = json.loads((out / "params.json").read_text())
    assert set(params) <= set(META_PARAMS_KEYS), set(params) - set(META_PARAMS_KEYS)
    assert params["rope_theta"] == 500000.0 and params["n_kv_heads"] == 2
    assert json.loads((out / "extra_params.json").read_text()) == {
        "max_seq_len": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert (out / "tokenizer.model").is_file()
    model, report = build_model(None, [out], dtype=torch.float32)
    assert not any(isinstance(m, LoRA) for m in model.modules())  # no fresh adapters from the config
    assert model.args.max_seq_len == 128 and report.missing_keys == []
    torch.testing.assert_close(our_logits([out]), our_logits([base[2], delta[1]]), rtol=0, atol=1e-5)


def test_meta_export_in_two_model_parallel_files(base, export):
    out = export("meta-mp2", [base[2]], to="meta", dtype="float32", shards=2)
    assert sorted(p.name for p in out.glob("consolidated.*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    with open_checkpoint(out) as r:
        assert torch.equal(r.read("layers.0.attention.wq.weight"), base[1]["layers.0.attention.wq.weight"])
        assert r.read("layers.0.attention.wq.weight", shard_dim=0, rank=1, world_size=2).shape == (32, 64)
    torch.testing.assert_close(our_logits([out]), our_logits([base[2]]), rtol=0, atol=0)


def test_source_saved_at_model_parallel_two_converts(base, fmt_dir, export):
    """A lazyllama save written by 2 model-parallel ranks converts like the single-file original."""
    args, sd, base_dir = base
    src = fmt_dir / "lazy-mp2"
    from util.checkpoint import meta_split_dim

    for rank in range(2):
        local = {k: (v if (d := meta_split_dim(k)) is None else v.chunk(2, dim=d)[rank]) for k, v in sd.items()}
        save_checkpoint(
            src, local, shard_dims={k: meta_split_dim(k) for k in sd}, rank=rank, world_size=2, config=args.to_dict()
        )
    (src / "tokenizer.model").write_bytes((base_dir / "tokenizer.model").read_bytes())
    out = export("hf-from-mp2", [src], to="hf", dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(tokens()).logits
    torch.testing.assert_close(theirs, our_logits([base_dir]), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "dim, hidden",
    [(64, 192), (64, 100), (64, 256), (4096, 11008), (4096, 14336), (2048, 5632), (8192, 28672), (96, 7)],
)
def test_meta_params_express_any_feed_forward_size(dim, hidden):
    p, _ = meta_params({"dim": dim, "n_layers": 1, "n_heads": 8, "ffn_hidden_dim": hidden, "multiple_of": 256})
    assert _hf_converter_intermediate_size(p) == hidden
    from model.args import ModelArgs

    assert ModelArgs.from_dict(p).hidden_dim == hidden  # and our reading of Meta's rule agrees


def test_meta_params_refuse_what_meta_cannot_express():
    with pytest.raises(CheckpointError, match="lora_rank=4"):
        meta_params({"dim": 64, "n_layers": 1, "n_heads": 4, "lora_rank": 4})
    with pytest.raises(CheckpointError, match="head_size=32"):
        meta_params({"dim": 64, "n_layers": 1, "n_heads": 4, "head_size": 32})
    with pytest.raises(CheckpointError, match="rope_scaling"):
        meta_params({"dim": 64, "n_layers": 1, "n_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})


def test_peft_adapter_loads_over_the_hf_base_with_our_logits(base, delta, export):
    base_hf = export("hf-base", [base[2]], to="hf", dtype="float32")
    adapter = export("peft", [base[2], delta[1]], to="peft", dtype="float32")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and len(config["target_modules"]) == 7
    model = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        theirs = model(tokens()).logits
    torch.testing.assert_close(theirs, our_logits([base[2], delta[1]]), rtol=0, atol=2e-5)


def test_peft_export_without_lora_is_refused(base, fmt_dir):
    from util.export import convert

    with pytest.raises(CheckpointError, match="no LoRA"):
        convert([base[2]], to="peft", out=fmt_dir / "no-lora")
    assert not (fmt_dir / "no-lora").exists()


def test_tied_model_gets_its_own_output_matrix_in_meta(tied_base, export):
    tied_hf = export("hf-tied", [tied_base[2]], to="hf", dtype="float32")
    model, _ = build_model(None, [tied_hf], dtype=torch.float32)
    assert model.args.tie_word_embeddings and model.output is None  # the head is the embedding
    out = export("meta-from-tied", [tied_hf], to="meta", dtype="float32")
    with open_checkpoint(out) as r:
        assert torch.equal(r.read("output.weight"), r.read("tok_embeddings.weight"))
    torch.testing.assert_close(our_logits([out]), our_logits([tied_base[2]]), rtol=0, atol=0)


def test_llama3_scaling_other_than_metas_is_refused_for_meta(tmp_path):
    from util.export import convert

    src = tmp_path / "l3"
    import make_llama3_like

    shape = ["--dim", "64", "--n_layers", "1", "--n_heads", "4", "--n_kv_heads", "2", "--intermediate_size", "96"]
    assert make_llama3_like.main(["--out", str(src), "--head_dim", "16", *shape]) == 0
    with pytest.raises(CheckpointError, match="rope_scaling=.*use_scaled_rope"):
        convert([src], to="meta", out=tmp_path / "meta")
