"""Reading GGUF back: `build_model(None, [file.gguf])` after `convert --to gguf` gives the source's logits (f16 to
half precision; q8_0 loads exactly the weights gguf's own dequantizer makes of the file), the config comes from the
llama.* metadata, and broken or foreign files are refused by name."""

from __future__ import annotations

import shutil

import gguf as gguf
import numpy as np
import pytest
import torch

from model.args import META_LLAMA3_ROPE_SCALING
from tests.formats.conftest import VOCAB, our_logits, tokens
from tests.helpers import params_of, random_state_dict, tiny_args
from util.build import build_model
from util.checkpoint import CheckpointError, model_state, open_checkpoint, write_meta_checkpoint
from util.checkpoint.gguf import meta_name


def _logits(path) -> torch.Tensor:
    model, _ = build_model(None, [path], dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens()).float()


def test_f16_round_trip_gives_the_sources_logits(base, export):
    out = export("gguf-base-f16", [base[2]], to="gguf", quant="f16", dtype="float32")
    with open_checkpoint(out) as reader:  # the directory holding the one .gguf
        assert reader.format == "gguf"
        args = base[0]
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "rope_theta", "norm_eps", "max_seq_len"):
            assert reader.config[field] == pytest.approx(getattr(args, field)), field
        assert reader.config["ffn_hidden_dim"] == args.hidden_dim and reader.config["vocab_size"] == args.vocab_size
        assert reader.config["tie_word_embeddings"] is False and reader.config["bos_token_id"] == 1
    want = our_logits([base[2]])
    got = _logits(out / "model.gguf")
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    # and exactly the source weights rounded to f16
    model, _ = build_model(None, [out / "model.gguf"], dtype=torch.float32)
    for key, value in model_state(model)[0].items():
        if key in base[1]:
            assert torch.equal(value, base[1][key].half().float() if value.dim() == 2 else base[1][key]), key


@pytest.mark.parametrize("quant, tol", [("q8_0", 2e-2), ("q4_0", 0.2), ("bf16", 5e-3)])
def test_quantized_files_load_exactly_what_gguf_dequantizes(base, export, quant, tol):
    name = "gguf-base-q8" if quant == "q8_0" else f"gguf-base-{quant}"
    out = export(name, [base[2]], to="gguf", quant=quant, dtype="float32")
    reader = gguf.GGUFReader(out / "model.gguf")
    model, _ = build_model(None, [out / "model.gguf"], dtype=torch.float32)
    state = model_state(model)[0]
    seen = 0
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        assert np.array_equal(state[meta_name(t.name)].numpy(), want), t.name
        seen += 1
    assert seen == len([k for k in state if k != "rope.freqs"])
    got, want = _logits(out / "model.gguf"), our_logits([base[2]])
    assert (got - want).abs().max() < tol * want.abs().max()


def test_tied_embeddings_and_llama3_scaling_come_back(tmp_path, tokenizer_path):
    from util.export import convert

    args = tiny_args(vocab_size=VOCAB, rope_theta=500000.0)
    sd = random_state_dict(args, seed=11)
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()  # tied: convert writes the embedding once
    write_meta_checkpoint(tmp_path / "src", sd, params={**params_of(args), "use_scaled_rope": True})  # Llama 3.1
    shutil.copyfile(tokenizer_path, tmp_path / "src" / "tokenizer.model")
    out = convert([str(tmp_path / "src")], out=tmp_path / "g", to="gguf", quant="f32", dtype="float32")
    with open_checkpoint(out / "model.gguf") as reader:
        assert reader.config["rope_scaling"] == {**META_LLAMA3_ROPE_SCALING, "factor": 8.0}
        assert reader.config["tie_word_embeddings"] is True and "output.weight" not in reader.keys()
    src, _ = build_model(None, [tmp_path / "src"], dtype=torch.float32)
    src.eval()
    with torch.no_grad():
        want = src(tokens(seed=1))
    back, _ = build_model(None, [out / "model.gguf"], dtype=torch.float32)
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(tokens(seed=1)), want)


def test_a_truncated_file_is_refused_naming_it(base, export, tmp_path):
    out = export("gguf-base-f16", [base[2]], to="gguf", quant="f16", dtype="float32")
    data = (out / "model.gguf").read_bytes()
    for cut in (len(data) - 100, 200):  # in the tensor data; in the metadata
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.gguf.*truncated"):
            open_checkpoint(bad)


def _tiny_gguf(path, arch: str = "llama", **skip: bool):
    w = gguf.GGUFWriter(path, arch)
    if not skip.get("embedding_length"):
        w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_feed_forward_length(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_missing_key_and_another_architecture_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nokey\.gguf: metadata key 'llama\.embedding_length' is missing"):
        open_checkpoint(_tiny_gguf(tmp_path / "nokey.gguf", embedding_length=True))
    with pytest.raises(CheckpointError, match=r"qwen\.gguf: general\.architecture is 'qwen2'"):
        open_checkpoint(_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2"))
    assert open_checkpoint(_tiny_gguf(tmp_path / "ok.gguf")).config["dim"] == 8


def test_a_directory_must_hold_exactly_one_gguf(tmp_path):
    _tiny_gguf(tmp_path / "a.gguf")
    assert open_checkpoint(tmp_path).config["n_layers"] == 1
    _tiny_gguf(tmp_path / "b.gguf")
    with pytest.raises(CheckpointError, match=r"exactly one \(found \['a\.gguf', 'b\.gguf'\]\)"):
        open_checkpoint(tmp_path)
