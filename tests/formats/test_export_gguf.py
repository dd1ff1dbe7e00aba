"""--to gguf, checked with llama.cpp's own gguf package: every tensor as its reader dequantizes it equals ours
(f16/bf16 exact after the cast, q8_0/q4_0 equal to gguf's reference quantizer), q/k in the layout llama.cpp's
converter produces from a Hugging Face checkpoint, the llama metadata and the tokenizer complete."""

from __future__ import annotations

import gguf as gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from tests.formats.conftest import VOCAB
from util.build import build_model
from util.checkpoint import CheckpointError, model_state
from util.export.gguf import gguf_name, llama3_rope_factors, write_gguf
from util.export.tokenizer import tokenizer_export

T = gguf.GGMLQuantizationType


def _read(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        fields[name] = f.contents()
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _dequantized(t) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


@pytest.fixture(scope="module")
def merged(base, delta):
    """Our merged model's tensors (fp32), what every GGUF export is compared with."""
    from model.peft import merge_lora

    model, _ = build_model(None, [base[2], delta[1]], dtype=torch.float32)
    merge_lora(model)
    return model_state(model)[0]


@pytest.mark.parametrize("quant, qtype", [("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0)])
def test_every_tensor_dequantizes_to_ours(base, delta, export, merged, quant, qtype):
    out = export(f"gguf-{quant}", [base[2], delta[1]], to="gguf", quant=quant, dtype="float32")
    _, tensors = _read(out / "model.gguf")
    expected_names = {gguf_name(k) for k in merged if k != "rope.freqs"}
    assert set(tensors) == expected_names
    for key, ours in merged.items():
        if key == "rope.freqs":
            continue
        t = tensors[gguf_name(key)]
        got = _dequantized(t)
        if ours.dim() == 1:
            assert t.tensor_type == T.F32 and np.array_equal(got, ours.numpy()), key
            continue
        assert t.tensor_type == qtype, key
        if quant == "f16":
            want = ours.half().float().numpy()
        elif quant == "bf16":
            want = ours.bfloat16().float().numpy()
        else:  # llama.cpp's reference quantizer on our fp32 weights
            want = gguf.quants.dequantize(gguf.quants.quantize(ours.numpy(), qtype), qtype)
            assert np.abs(got - ours.numpy()).max() <= (0.02 if quant == "q8_0" else 0.3) * np.abs(ours.numpy()).max()
        assert np.array_equal(got.astype(np.float32), want.astype(np.float32)), key


def test_qk_layout_is_what_llama_cpp_makes_of_the_hf_export(base, delta, export):
    """llama.cpp's converter reshapes each HF q/k head into (2, head_dim / 2) rows and swaps the two axes: our GGUF
    must hold exactly that (checked in f32, so the comparison is exact)."""
    hf = export("hf-merged", [base[2], delta[1]], to="hf", dtype="float32")
    out = export("gguf-f32", [base[2], delta[1]], to="gguf", quant="f32", dtype="float32")
    _, tensors = _read(out / "model.gguf")
    with safe_open(hf / "model.safetensors", "pt") as f:
        for proj, heads in (("q_proj", 4), ("k_proj", 2)):
            w = f.get_tensor(f"model.layers.1.self_attn.{proj}.weight")
            llama_cpp = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
            name = f"blk.1.attn_{proj[0]}.weight"
            assert np.array_equal(_dequantized(tensors[name]), llama_cpp.numpy())


def test_metadata_and_tokenizer_are_complete(base, export, tokenizer_path):
    args = base[0]
    out = export("gguf-base-q8", [base[2]], to="gguf", quant="q8_0", dtype="float32")
    fields, tensors = _read(out / "model.gguf")
    assert fields["general.architecture"] == "llama"
    expected = {
        "llama.context_length": args.max_seq_len,
        "llama.embedding_length": args.dim,
        "llama.block_count": args.n_layers,
        "llama.feed_forward_length": args.hidden_dim,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 500000.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
        "llama.vocab_size": VOCAB,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == VOCAB
    n = sp.GetPieceSize()
    assert tokens[:n] == [sp.IdToPiece(i) for i in range(n)]
    assert scores[:n] == pytest.approx([sp.GetScore(i) for i in range(n)])
    assert types[0] == 2 and types[1] == types[2] == 3  # unk, control (bos, eos)
    assert types[3:259] == [6] * 256  # sentencepiece's byte fallback pieces <0x00>..<0xFF>
    assert set(types[n:]) == {5} and tokens[n] == f"[PAD{n}]"  # padding rows: unused tokens
    assert "output.weight" in tensors and "rope_freqs.weight" not in tensors


def test_tied_embeddings_write_no_output(tied_base, export):
    out = export("gguf-tied", [tied_base[2]], to="gguf", quant="f16", dtype="float32")
    _, tensors = _read(out / "model.gguf")
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def _tiny(merged):
    return {k: v for k, v in merged.items() if k != "rope.freqs"}


def test_rope_scaling_llama3_writes_the_factors_and_linear_the_metadata(merged, tokenizer_path, tmp_path):
    vocab = tokenizer_export(tokenizer_path).gguf_vocab(VOCAB)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "rope_theta": 500000.0, "max_seq_len": 128}
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    write_gguf(tmp_path / "l3.gguf", _tiny(merged), params={**params, "rope_scaling": scaling}, vocab=vocab)
    _, tensors = _read(tmp_path / "l3.gguf")
    factors = _dequantized(tensors["rope_freqs.weight"])
    assert np.array_equal(factors, llama3_rope_factors(16, 500000.0, scaling))
    # Meta's apply_scaling, written out: the scaled frequency is freq / factor for each
    freqs = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    wavelen = 2 * np.pi / freqs
    smooth = np.clip((64 / wavelen - 1.0) / (4.0 - 1.0), 0, 1)
    scaled = np.where(
        wavelen < 64 / 4.0, freqs, np.where(wavelen > 64, freqs / 32, (1 - smooth) * freqs / 32 + smooth * freqs)
    )
    np.testing.assert_allclose(freqs / factors, scaled, rtol=1e-6)
    assert factors[0] == 1.0 and factors[-1] == 32.0

    linear = {"rope_type": "linear", "factor": 4.0}
    write_gguf(tmp_path / "lin.gguf", _tiny(merged), params={**params, "rope_scaling": linear}, vocab=vocab)
    fields, tensors = _read(tmp_path / "lin.gguf")
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0
    assert "rope_freqs.weight" not in tensors


def test_refusals_name_the_problem(merged, tokenizer_path, tmp_path, base):
    vocab = tokenizer_export(tokenizer_path).gguf_vocab(VOCAB)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}
    with pytest.raises(CheckpointError, match="'dynamic' has no llama.cpp equivalent"):
        write_gguf(tmp_path / "x.gguf", _tiny(merged), params={**params, "rope_scaling": dynamic}, vocab=vocab)
    with pytest.raises(ValueError, match="choose one of"):
        write_gguf(tmp_path / "x.gguf", _tiny(merged), params=params, vocab=vocab, quant="q4_k")
    with pytest.raises(CheckpointError, match="lora"):
        gguf_name("layers.0.attention.wq.lora.lora_a")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))  # nothing half-written


def test_a_normalizing_tokenizer_is_refused(tmp_path):
    from util.tokenizer import train_tokenizer

    tok = train_tokenizer(["some text\nwith  spaces"] * 50, tmp_path / "tokenizer.model", vocab_size=300)
    with pytest.raises(ValueError, match="normalizes text"):
        tokenizer_export(tok.path).gguf_vocab(512)
